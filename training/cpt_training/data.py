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

Order: global sample position ``p`` maps to a block by ``cpt_training.mixture.Mixture``: without
weights, block ``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a permutation of all ``n``
blocks seeded by ``(seed, e)`` (every block once per epoch, a fresh order each epoch); with a
weighted ``mixture`` (one weight per tokenized source), each position first picks its source
(exact quotas per window of positions) and then a block of that source the same way, per
source. The manifest's ``shards[].runs`` say which rows hold which source. Optimizer step
``s`` consumes positions ``[s*G, (s+1)*G)`` with ``G = dp_size * micro_batch * grad_accum``;
micro-step ``m`` of rank ``r`` takes positions ``s*G + (m*dp_size + r)*micro_batch +
[0, micro_batch)``. So resuming at step ``k`` is an O(1) seek that yields the very batches an
uninterrupted run would have seen, and the set of blocks of a step depends only on ``G`` (not
on how it is split over ranks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt_training import podenv
from cpt_training.config import MixtureSource
from cpt_training.mixture import Mixture, MixtureError
from cpt_training.storage import Storage, open_storage

log = logging.getLogger(__name__)

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


def source_rows(manifest: dict[str, Any], key: str) -> list[np.ndarray]:
    """Row ids (in the concatenation of ``manifest[key]``'s shards) of every source, from the
    shards' ``runs``; a v1 manifest (no runs) is one source of all rows."""
    shards = manifest.get(key, [])
    n_sources = len(manifest.get("sources", [])) or 1
    if any("runs" not in s for s in shards):
        total = sum(int(s["blocks"]) for s in shards)
        return [np.arange(total, dtype=np.int64)] + [
            np.zeros(0, dtype=np.int64) for _ in range(n_sources - 1)
        ]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_sources)]
    offset = 0
    for shard in shards:
        start = offset
        for src, count in shard["runs"]:
            parts[int(src)].append(np.arange(offset, offset + int(count), dtype=np.int64))
            offset += int(count)
        if offset - start != int(shard["blocks"]):
            raise DataError(f"manifest {key} {shard['name']}: runs do not add up to its blocks")
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


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
        mixture: list[MixtureSource] | None = None,
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
        self.source_rows = source_rows(self.manifest, "shards")
        self.heldout_rows = source_rows(self.manifest, "heldoutShards")
        listed = self.manifest.get("sources", [])
        self.source_names = [str(s["name"]) for s in listed] or ["all"]
        if mixture is not None:
            if "runs" not in self.manifest["shards"][0]:
                raise DataError(
                    f"{self.uri} was tokenized before data mixtures (no per-source runs in "
                    "its manifest): tokenize again (a new tokenizedUri) to use source weights"
                )
            self.source_names = [m.name for m in mixture]
        try:
            self.mixture = Mixture(
                [len(r) for r in self.source_rows],
                None if mixture is None else [m.weight for m in mixture],
                self.seed,
                self.source_names,
            )
        except MixtureError as exc:
            raise DataError(f"{self.uri}: {exc}") from exc

    def __len__(self) -> int:
        return self.num_blocks

    # -- order -----------------------------------------------------------------------------------

    def positions_to_blocks(self, positions: np.ndarray) -> np.ndarray:
        """Global sample positions -> block ids (rows of the training table)."""
        src, idx = self.mixture.blocks(np.asarray(positions, dtype=np.int64))
        if not self.mixture.weighted:
            return idx
        out = np.empty_like(idx)
        for s in np.unique(src):
            sel = src == s
            out[sel] = self.source_rows[int(s)][idx[sel]]
        return out

    def tokens_seen(self, steps: int, global_batch: int) -> dict[str, int]:
        """Tokens of every source in the first ``steps`` optimizer steps of ``global_batch``
        blocks (exact when weighted; each source's share of the blocks otherwise)."""
        counts = self.mixture.seen(steps * global_batch)
        return {n: c * self.block_size for n, c in zip(self.source_names, counts, strict=False)}

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

    def held_out(
        self, batch_size: int, max_blocks: int | None = None, source: int | None = None
    ) -> Iterator[np.ndarray]:
        """Held-out blocks in stored order (of one ``source``, or all), ``batch_size`` at a
        time (the last may be short)."""
        if self._held is None:
            return
        rows = np.arange(self.num_held_out) if source is None else self.heldout_rows[source]
        rows = rows if max_blocks is None else rows[:max_blocks]
        for start in range(0, len(rows), batch_size):
            yield _rows(self._held, rows[start : start + batch_size], self.block_size)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._train = self._held = None


def log_mixture(blocks: TokenBlocks, max_steps: int, global_blocks: int) -> None:
    """Say what the run will draw from every source, and warn about sources it repeats."""
    mix = blocks.mixture
    seen = mix.seen(max_steps * global_blocks)
    for name, n, drawn, epochs in zip(
        blocks.source_names, mix.sizes, seen, mix.epochs(max_steps * global_blocks), strict=False
    ):
        log.info("data source %s: %d blocks, %d drawn (%.2f epochs)", name, n, drawn, epochs)
        if mix.weighted and epochs > 1:
            log.warning("data source %s is repeated: %.1f epochs over its blocks", name, epochs)
