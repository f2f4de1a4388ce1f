"""A shard's result (its done file), the check against data of another config, and the
manifest written once every shard is done."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from cpt_training.config import (
    TokenizeStage,
    source_name,
)
from cpt_training.storage import Storage
from cpt_training.tokenize.layout import (
    FORMAT,
    MANIFEST,
    TokenizeError,
    done_name,
    heldout_name,
    shard_name,
)

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    shard: int
    num_shards: int
    config_hash: str
    docs: int
    tokens: int
    blocks: int
    dropped_tokens: int
    heldout_docs: int
    heldout_tokens: int
    heldout_blocks: int
    block_size: int
    seconds: float
    skipped: bool = False
    runs: list[tuple[int, int]] = field(default_factory=list)
    """``(source, blocks)`` in stored order (format v2)."""
    heldout_runs: list[tuple[int, int]] = field(default_factory=list)
    source_docs: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("skipped")
        return {
            "runs": [list(r) for r in self.runs],
            "heldoutRuns": [list(r) for r in self.heldout_runs],
            "sourceDocs": {str(k): v for k, v in sorted(self.source_docs.items())},
            "format": FORMAT,
            "shard": d["shard"],
            "numShards": d["num_shards"],
            "configHash": d["config_hash"],
            "docs": d["docs"],
            "tokens": d["tokens"],
            "blocks": d["blocks"],
            "droppedTokens": d["dropped_tokens"],
            "heldoutDocs": d["heldout_docs"],
            "heldoutTokens": d["heldout_tokens"],
            "heldoutBlocks": d["heldout_blocks"],
            "blockSize": d["block_size"],
            "seconds": round(d["seconds"], 3),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardResult:
        return cls(
            shard=int(d["shard"]),
            num_shards=int(d["numShards"]),
            config_hash=str(d["configHash"]),
            docs=int(d["docs"]),
            tokens=int(d["tokens"]),
            blocks=int(d["blocks"]),
            dropped_tokens=int(d["droppedTokens"]),
            heldout_docs=int(d["heldoutDocs"]),
            heldout_tokens=int(d["heldoutTokens"]),
            heldout_blocks=int(d["heldoutBlocks"]),
            block_size=int(d["blockSize"]),
            seconds=float(d.get("seconds", 0.0)),
            runs=[(int(a), int(b)) for a, b in d.get("runs", [])],
            heldout_runs=[(int(a), int(b)) for a, b in d.get("heldoutRuns", [])],
            source_docs={int(k): int(v) for k, v in d.get("sourceDocs", {}).items()},
        )


def _check_existing(out: Storage, chash: str) -> None:
    """Fail before any work if the output holds data from a different config."""
    try:
        manifest = out.read_json(MANIFEST)
    except FileNotFoundError:
        manifest = None
    found: list[tuple[str, str]] = []
    if manifest is not None:
        found.append((MANIFEST, str(manifest.get("configHash"))))
    for key in out.list_sizes():
        if key.endswith(".done.json") and "/" not in key:
            found.append((key, str(out.read_json(key).get("configHash"))))
    bad = [(k, h) for k, h in found if h != chash]
    if bad:
        k, h = bad[0]
        raise TokenizeError(
            f"outputUri {out.uri} already holds data tokenized with a different config "
            f"({k}: configHash {h}, this run: {chash}). Use a new outputUri or delete the old "
            "data; nothing was changed."
        )


def _source_totals(cfg: TokenizeStage, results: list[ShardResult]) -> list[dict[str, Any]]:
    """Blocks, tokens and documents of every source over all shards (training reads its
    mixture's sizes from here, ``cpt plan`` its epochs per source)."""
    out = []
    for i, src in enumerate(cfg.sources):
        blocks = sum(b for r in results for s, b in r.runs if s == i)
        held = sum(b for r in results for s, b in r.heldout_runs if s == i)
        out.append(
            {
                "index": i,
                "name": source_name(i, src),
                "blocks": blocks,
                "tokens": blocks * cfg.block_size,
                "docs": sum(r.source_docs.get(i, 0) for r in results),
                "heldoutBlocks": held,
                "heldoutTokens": held * cfg.block_size,
            }
        )
    return out


def _maybe_write_manifest(out: Storage, cfg: TokenizeStage, chash: str) -> dict[str, Any] | None:
    """Write (or re-check) ``manifest.json`` once every shard's done file exists."""
    n = cfg.num_shards
    results: list[ShardResult] = []
    for i in range(n):
        try:
            results.append(ShardResult.from_json(out.read_json(done_name(i, n))))
        except FileNotFoundError:
            return None
    for r in results:
        if r.config_hash != chash:
            raise TokenizeError(
                f"{out.join(done_name(r.shard, n))} has configHash {r.config_hash}, expected "
                f"{chash}; delete the output or use a new outputUri"
            )
    manifest = {
        "format": FORMAT,
        "configHash": chash,
        "blockSize": cfg.block_size,
        "numShards": n,
        "columns": ["input_ids", "labels", "attention_mask"],
        "totalTokens": sum(r.tokens for r in results),
        "totalBlocks": sum(r.blocks for r in results),
        "totalDocs": sum(r.docs for r in results),
        "droppedTokens": sum(r.dropped_tokens for r in results),
        "heldoutTokens": sum(r.heldout_tokens for r in results),
        "heldoutBlocks": sum(r.heldout_blocks for r in results),
        "heldoutDocs": sum(r.heldout_docs for r in results),
        "shards": [
            {
                "name": shard_name(r.shard, n),
                "blocks": r.blocks,
                "tokens": r.tokens,
                "runs": [list(x) for x in r.runs],
            }
            for r in results
        ],
        "heldoutShards": [
            {
                "name": heldout_name(r.shard, n),
                "blocks": r.heldout_blocks,
                "runs": [list(x) for x in r.heldout_runs],
            }
            for r in results
            if cfg.held_out_fraction > 0
        ],
        "sources": _source_totals(cfg, results),
    }
    try:
        existing = out.read_json(MANIFEST)
    except FileNotFoundError:
        existing = None
    if existing != manifest:
        if existing is not None:
            log.warning("rewriting %s: it did not match the shard done files", out.join(MANIFEST))
        out.write_json(MANIFEST, manifest)
        log.info(
            "wrote %s: %d blocks, %d tokens",
            out.join(MANIFEST),
            manifest["totalBlocks"],
            manifest["totalTokens"],
        )
    return manifest
