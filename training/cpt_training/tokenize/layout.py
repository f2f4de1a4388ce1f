"""Names and constants of the tokenized-data layout shared by the stage's parts: the shard,
held-out and done names, the manifest and its format version, and the stage's error."""

from __future__ import annotations

MANIFEST = "manifest.json"
FORMAT = "cpt-tokens/v2"
"""v2: a block never spans two sources (each source's remainder in a shard is dropped), and
the manifest records the blocks of every source (``sources``, ``shards[].runs``)."""
DOC_BATCH = 1024
"""Documents per encode_batch call (and per worker task)."""


class TokenizeError(RuntimeError):
    """The tokenize stage cannot proceed; the message says why and what to change."""


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}"


def heldout_name(i: int, n: int) -> str:
    return f"heldout-{i:05d}-of-{n:05d}"


def done_name(i: int, n: int) -> str:
    return f"{shard_name(i, n)}.done.json"
