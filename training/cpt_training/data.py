"""Token blocks for the trainers: load the tokenize stage's output and hand each data-parallel
rank exactly its micro-batches, deterministically and resumably.

Stable API::

    blocks = TokenBlocks(data_uri, local_cache_dir=None, seed=1234)
    blocks.block_size, len(blocks), blocks.manifest
    for sb in blocks.batches(dp_rank, dp_size, micro_batch, grad_accum, start_step=k):
        sb.step                  # optimizer step this batch belongs to
        sb.micro_batches         # grad_accum arrays, int64 [micro_batch, block_size]
    blocks.step_indices(step, dp_rank, dp_size, micro_batch, grad_accum)  # block ids, pure
    for arr in blocks.held_out(batch_size): ...   # held-out blocks, in order, int64

Only ``manifest.json`` is trusted: a dataset without it is not finished. From S3 the listed
shard dirs are downloaded once per node into ``local_cache_dir`` (a file lock makes the
node's ranks share one download) and memory-mapped (HF ``load_from_disk``); a local
``data_uri`` is read in place. ``labels`` equal ``input_ids`` (the model shifts), so batches
carry ``input_ids`` only.

Order: global sample position ``p`` maps to block ``perm_e[p % n]`` with ``e = p // n`` and
``perm_e`` a permutation of all ``n`` blocks seeded by ``(seed, e)``: every block once per
epoch, a fresh order each epoch. Optimizer step ``s`` consumes positions
``[s*G, (s+1)*G)`` with ``G = dp_size * micro_batch * grad_accum``; micro-step ``m`` of rank
``r`` takes positions ``s*G + (m*dp_size + r)*micro_batch + [0, micro_batch)``. So resuming at
step ``k`` is an O(1) seek that yields the very batches an uninterrupted run would have seen,
and the set of blocks of a step depends only on ``G`` (not on how it is split over ranks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt_training import podenv
from cpt_training.storage import Storage, open_storage

MANIFEST = "manifest.json"


class DataError(RuntimeError):
    """The tokenized dataset is missing, unfinished or unusable; the message says which."""


@dataclass(frozen=True)
class StepBatch:
    """The micro-batches one DP rank consumes for one optimizer step."""

    step: int
    micro_batches: list[np.ndarray]


def default_cache_dir() -> Path:
    return podenv.data_cache_dir()


def _read_manifest(st: Storage) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = st.read_json(MANIFEST)
    except FileNotFoundError as exc:
        raise DataError(
            f"{st.join(MANIFEST)} does not exist: the tokenize stage has not finished "
            "(every shard writes its done file; the last one writes the manifest)"
        ) from exc
    for key in ("blockSize", "shards", "configHash"):
        if key not in manifest:
            raise DataError(f"{st.join(MANIFEST)} lacks {key!r}; is it a cpt tokenized dataset?")
    return manifest


def _ensure_local(st: Storage, manifest: dict[str, Any], cache: Path) -> Path:
    """Download the manifest's shard dirs once per node; returns the local root."""
    local = st.local_path()
    if local is not None:
        return local
    key = hashlib.sha256(f"{st.uri}|{manifest['configHash']}".encode()).hexdigest()[:16]
    root = cache / key
    root.mkdir(parents=True, exist_ok=True)
    marker = root / ".complete"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other local ranks wait for the one downloading
        try:
            if marker.exists() and json.loads(marker.read_text()) == manifest:
                return root
            names = [s["name"] for s in manifest["shards"]]
            names += [s["name"] for s in manifest.get("heldoutShards", [])]
            for name in names:
                st.download_dir(name, root / name)
            (root / MANIFEST).write_text(json.dumps(manifest))
            marker.write_text(json.dumps(manifest))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def _load(root: Path, names: list[str]) -> Any:
    """Memory-map the Arrow files of HF ``save_to_disk`` shard dirs as one pyarrow table.

    Read with pyarrow directly rather than ``datasets.load_from_disk``: the Neuron training
    container pins an old ``datasets`` that cannot read newer dataset dirs, and the trainer
    needs nothing from ``datasets`` beyond the Arrow IPC files listed in ``state.json``.
    """
    import pyarrow as pa

    tables = []
    for name in names:
        state = json.loads((root / name / "state.json").read_text())
        for entry in state["_data_files"]:
            # The table's buffers point into the map: keep it open (it closes with them).
            source = pa.memory_map(str(root / name / entry["filename"]))
            table = pa.ipc.open_stream(source).read_all()
            if table.num_rows:
                tables.append(table)
    if not tables:
        return None
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _rows(table: Any, indices: np.ndarray, block: int) -> np.ndarray:
    import pyarrow as pa

    col = table.take(pa.array(indices, type=pa.int64())).column("input_ids").combine_chunks()
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).reshape(
        -1, block
    )


class TokenBlocks:
    """A tokenized dataset (tokenize stage output) as fixed-size token blocks."""

    def __init__(
        self,
        data_uri: str,
        local_cache_dir: str | os.PathLike[str] | None = None,
        *,
        seed: int = 1234,
    ) -> None:
        st = open_storage(data_uri)
        self.uri = st.uri
        self.manifest = _read_manifest(st)
        self.block_size = int(self.manifest["blockSize"])
        self.seed = int(seed)
        cache = Path(local_cache_dir) if local_cache_dir is not None else default_cache_dir()
        self.root = _ensure_local(st, self.manifest, cache)
        self._train = _load(self.root, [s["name"] for s in self.manifest["shards"]])
        self._held = _load(self.root, [s["name"] for s in self.manifest.get("heldoutShards", [])])
        self.num_blocks = 0 if self._train is None else len(self._train)
        expected = int(self.manifest.get("totalBlocks", self.num_blocks))
        if self.num_blocks != expected:
            raise DataError(
                f"{self.uri}: shards hold {self.num_blocks} blocks, manifest says {expected}"
            )
        if self.num_blocks == 0:
            raise DataError(f"{self.uri} has no training blocks (corpus smaller than a block?)")
        self.num_held_out = 0 if self._held is None else len(self._held)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_blocks

    # -- order -----------------------------------------------------------------------------------

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.num_blocks)
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def positions_to_blocks(self, positions: np.ndarray) -> np.ndarray:
        """Global sample positions -> block ids."""
        n = self.num_blocks
        epochs = positions // n
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch_permutation(int(e))[positions[sel] % n]
        return out

    def step_indices(
        self, step: int, dp_rank: int, dp_size: int, micro_batch: int, grad_accum: int
    ) -> list[np.ndarray]:
        """Block ids of each micro-batch of ``dp_rank`` at optimizer ``step``."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        if min(micro_batch, grad_accum, dp_size) < 1 or step < 0:
            raise ValueError("step >= 0 and dp_size, micro_batch, grad_accum >= 1 required")
        g = dp_size * micro_batch * grad_accum
        out = []
        for m in range(grad_accum):
            start = step * g + (m * dp_size + dp_rank) * micro_batch
            out.append(self.positions_to_blocks(np.arange(start, start + micro_batch)))
        return out

    # -- access ----------------------------------------------------------------------------------

    def get(self, block_ids: np.ndarray) -> np.ndarray:
        """Blocks as int64 ``[len(block_ids), block_size]``."""
        return _rows(self._train, np.asarray(block_ids), self.block_size)

    def batches(
        self,
        dp_rank: int,
        dp_size: int,
        micro_batch: int,
        grad_accum: int,
        start_step: int = 0,
        max_steps: int | None = None,
    ) -> Iterator[StepBatch]:
        """Micro-batches of ``dp_rank`` for steps ``start_step, start_step + 1, …`` (until
        ``max_steps``, exclusive, or forever)."""
        step = start_step
        while max_steps is None or step < max_steps:
            ids = self.step_indices(step, dp_rank, dp_size, micro_batch, grad_accum)
            yield StepBatch(step, [self.get(i) for i in ids])
            step += 1

    def held_out(self, batch_size: int, max_blocks: int | None = None) -> Iterator[np.ndarray]:
        """Held-out blocks in stored order, ``batch_size`` at a time (the last may be short)."""
        if self._held is None:
            return
        n = self.num_held_out if max_blocks is None else min(max_blocks, self.num_held_out)
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            yield _rows(self._held, idx, self.block_size)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._train = self._held = None
