"""Which files of a committed tag a node needs: per-rank selections, unioned per node.

Why: a tag holds every rank's shards, but a rank loads only its own. The seed's Llama-2-70B
NxD run (TP=8, PP=8, ZeRO-1 over DP=16, 32 trn1 nodes) writes ~1 TB per tag, while a node
loads one pipeline stage's model files (1/8) and its own 32 ranks' optimizer files (1/32).
Restore therefore asks a *selector* on every rank which files that rank will read, gathers
the answers, and each node downloads and verifies the union of its ranks' files only.

Selectors are backend knowledge (``nxd.layout`` for NxD's file names and rank grid, the DCP
load plan for native checkpoints); this module is the torch-free contract between them and
restore. The rule that keeps a node from ever missing a file: a selector that cannot decide
returns :meth:`Selection.whole` (with the reason), a selector that raises or names a file the
manifest lacks counts as "cannot decide", and one undecided rank makes its node restore the
whole tag, logging why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from cpt_training.checkpoint.manifest import Manifest, digest_bytes
from cpt_training.storage import Storage, TransferSettings, open_storage

log = logging.getLogger(__name__)

_READ_LIMIT = 256 * 1024 * 1024


@dataclass(frozen=True)
class Selection:
    """The files of a tag one rank (or node) needs; ``paths`` None means the whole tag, and
    ``reason`` then says why no narrower choice was possible."""

    paths: frozenset[str] | None
    reason: str = ""

    @classmethod
    def of(cls, paths: Iterable[str]) -> Selection:
        return cls(frozenset(paths))

    @classmethod
    def whole(cls, reason: str) -> Selection:
        return cls(None, reason)

    @property
    def is_whole(self) -> bool:
        return self.paths is None

    def to_wire(self) -> dict[str, Any]:
        """A small picklable form for the restore gather."""
        return {"paths": None if self.paths is None else sorted(self.paths), "reason": self.reason}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Selection:
        paths = d.get("paths")
        return cls(None if paths is None else frozenset(paths), str(d.get("reason", "")))


class TagFiles:
    """What a selector sees of a candidate tag: its verified manifest, and small files of the
    tag read straight from storage and checked against the manifest before anyone parses them
    (a DCP ``.metadata`` is a pickle)."""

    def __init__(
        self, tag_uri: str, manifest: Manifest, settings: TransferSettings | None = None
    ) -> None:
        self.uri = tag_uri
        self.manifest = manifest
        self.settings = settings
        self._by_path = manifest.by_path()
        self._paths = frozenset(self._by_path)
        self._storage: Storage | None = None

    @property
    def tag(self) -> str:
        return self.manifest.tag

    @property
    def paths(self) -> frozenset[str]:
        return self._paths

    def read_bytes(self, rel: str) -> bytes:
        entry = self._by_path.get(rel)
        if entry is None:
            raise KeyError(f"{rel!r} is not a file of {self.uri}")
        if entry.size > _READ_LIMIT:
            raise ValueError(f"{rel!r} ({entry.size} bytes) is too large to read for selection")
        if self._storage is None:
            self._storage = open_storage(self.uri, self.settings)
        data = self._storage.read_bytes(rel)
        if len(data) != entry.size or digest_bytes(data, entry.algorithm) != entry.digest:
            raise ValueError(f"{self.uri}/{rel} does not match the manifest")
        return data


FileSelector = Callable[[TagFiles], Selection]
"""Called on every rank with each candidate tag; returns the files that rank will read."""


def choose(selector: FileSelector, view: TagFiles) -> Selection:
    """Run a selector without letting it fail the restore: an exception, or a path the
    manifest does not list, turns into "whole tag" with the reason."""
    try:
        sel = selector(view)
    except Exception as exc:
        return Selection.whole(f"file selection failed: {type(exc).__name__}: {exc}")
    if sel.paths is not None:
        unknown = sorted(sel.paths - view.paths)
        if unknown:
            return Selection.whole(
                f"file selection named {len(unknown)} file(s) not in the manifest of "
                f"{view.tag}: {', '.join(unknown[:3])}"
            )
    return sel


def union(selections: Iterable[Selection]) -> Selection:
    """A node's selection: the union of its ranks' files, or the whole tag if any rank
    could not decide (the first such reason is kept)."""
    out: set[str] = set()
    for sel in selections:
        if sel.paths is None:
            return sel
        out |= sel.paths
    return Selection.of(out)


def node_ranks(node_rank: int, local_world_size: int) -> range:
    """Global ranks of a torchrun node (torchrun numbers ranks node by node)."""
    return range(node_rank * local_world_size, (node_rank + 1) * local_world_size)


def select_for_ranks(
    view: TagFiles, ranks: Collection[int], selector_for: Callable[[int], FileSelector]
) -> Selection:
    """The union over ``ranks`` of ``selector_for(rank)`` (planning and tests; training
    gathers each rank's own answer instead)."""
    return union(choose(selector_for(r), view) for r in ranks)


def selected_entries(manifest: Manifest, sel: Selection) -> Manifest:
    """The manifest restricted to a selection (the whole manifest for "whole tag")."""
    if sel.paths is None:
        return manifest
    by_path = manifest.by_path()
    return Manifest(manifest.tag, manifest.step, [by_path[p] for p in sorted(sel.paths)])
