"""One shard's work: its tasks in packing order, encoded in this process or a pool of
workers (forked when safe), packed in task order into the train and held-out writers."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt_training.config import (
    TokenizeStage,
)
from cpt_training.piece_cache import PieceCache, flat_ids
from cpt_training.storage import open_storage
from cpt_training.tokenize.layout import heldout_name, shard_name
from cpt_training.tokenize.manifest import ShardResult
from cpt_training.tokenize.packing import BlockWriter
from cpt_training.tokenize.reading import _jsonl_spans, _read_local, is_held_out
from cpt_training.tokenize.sources import Unit, _local_copy, _read_hf, plan_shards
from cpt_training.tokenize.tokenizer import LoadedTokenizer

log = logging.getLogger(__name__)


_WORKER_TOK: Any = None
_WORKER_EOS = 0
_WORKER_OPTS: Any = None


def _encode(tok: Any, eos: int, texts: list[str]) -> np.ndarray:
    """Token ids of documents, each followed by EOS, as one flat int32 array."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    if isinstance(tok, PieceCache):
        return tok.encode_flat(texts, eos)
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    encs = encode(texts, add_special_tokens=False)
    # per document; the per-token work happens in C
    return flat_ids([np.asarray(e.ids, dtype=np.int32) for e in encs], eos)


@dataclass(frozen=True)
class _Task:
    """One piece of a shard's work, done by any process: a local file unit (``span``: a byte
    range of a jsonl file) or documents already read (HF sources)."""

    unit: Unit | None = None
    source: int = 0
    path: str = ""
    span: tuple[int, int] | None = None
    texts: list[str] | None = None
    cleanup: str = ""
    """A downloaded copy to delete once this task (the unit's last) is consumed."""


@dataclass(frozen=True)
class _Opts:
    field: str
    held_out_fraction: float
    seed: int
    threads: bool
    txt_split: str = "file"


def _worker_init(spec: str | None, eos: int, opts: _Opts) -> None:
    """``spec`` None: forked, the encoder the parent set up before the fork is used."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOK, _WORKER_EOS, _WORKER_OPTS
    if spec is not None:
        from tokenizers import Tokenizer

        _WORKER_TOK = PieceCache.wrap(Tokenizer.from_str(spec), spec)
    _WORKER_EOS = eos
    _WORKER_OPTS = opts


def _worker_run(task: _Task) -> tuple[np.ndarray, int, np.ndarray, int]:
    return _run_task(_WORKER_TOK, _WORKER_EOS, _WORKER_OPTS, task)


def _run_task(
    tok: Any, eos: int, opts: _Opts, task: _Task
) -> tuple[np.ndarray, int, np.ndarray, int]:
    """Read the task's documents, split off the held-out ones, encode: (train ids, train
    docs, held-out ids, held-out docs), each document's ids followed by EOS."""
    if task.texts is not None:
        batches: Iterable[list[str]] = [task.texts]
    else:
        assert task.unit is not None
        batches = _read_local(
            task.unit, Path(task.path), opts.field, task.span, opts.threads, opts.txt_split
        )
    train: list[np.ndarray] = []
    held: list[np.ndarray] = []
    ntrain = nheld = 0
    for texts in batches:
        if opts.held_out_fraction > 0:
            mask = is_held_out(texts, opts.held_out_fraction, opts.seed)
            if mask.any():
                out = [t for t, m in zip(texts, mask, strict=True) if m]
                held.append(_encode(tok, eos, out))
                nheld += len(out)
            texts = [t for t, m in zip(texts, mask, strict=True) if not m]
        train.append(_encode(tok, eos, texts))
        ntrain += len(texts)
    empty = np.zeros(0, dtype=np.int32)
    return (
        np.concatenate(train) if train else empty,
        ntrain,
        np.concatenate(held) if held else empty,
        nheld,
    )


def _shard_tasks(cfg: TokenizeStage, shard: int, tmp: Path) -> Iterator[_Task]:
    """The shard's work in packing order (that of :func:`shard_documents`): HF batches, then
    the planned units, jsonl files cut into ``TASK_BYTES`` line-aligned slices. Remote files
    are downloaded as their turn comes; the last task of one carries its deletion."""
    for i, src in enumerate(cfg.sources):
        if src.hf_dataset is not None:
            for texts in _read_hf(i, src, cfg.text_field, shard, cfg.num_shards):
                yield _Task(source=i, texts=texts)
    for unit in plan_shards(cfg)[shard]:
        path = _local_copy(unit.uri, tmp)
        remote = "" if open_storage(unit.uri).local_path() is not None else str(path)
        spans = _jsonl_spans(path) if unit.format == "jsonl" and unit.pieces == 1 else []
        if len(spans) < 2:
            yield _Task(unit, unit.source, str(path), cleanup=remote)
            continue
        for i, span in enumerate(spans):
            last = i == len(spans) - 1
            yield _Task(unit, unit.source, str(path), span, cleanup=remote if last else "")


def _results(
    tasks: Iterable[_Task], pool: Any, workers: int, run: Any
) -> Iterator[tuple[_Task, tuple[np.ndarray, int, np.ndarray, int]]]:
    """Task results in task order. Without a pool the main process runs each task. With
    one, its ``workers`` processes run every task, with up to ``AHEAD`` tasks each handed
    out beyond the one they run (a worker never waits for the main process), while the
    main process only packs and writes: ordered packing is the one serial step (5-10% of
    the CPU), so it overlaps the workers' encoding instead of taking turns with it, and no
    worker waits while the main process packs."""
    from collections import deque

    if pool is None:
        for task in tasks:
            yield task, run(task)
        return
    queued: deque[tuple[_Task, Any]] = deque()
    limit = (AHEAD + 1) * workers
    for task in tasks:
        queued.append((task, pool.apply_async(_worker_run, (task,))))
        while queued and (len(queued) >= limit or queued[0][1].ready()):
            t, h = queued.popleft()
            yield t, h.get()
    while queued:
        t, h = queued.popleft()
        yield t, h.get()


AHEAD = 2
"""Tasks queued per worker beyond the one it runs."""


def _pool_context() -> Any:
    """``fork`` while no other Python thread runs (a forked child cannot take a lock such a
    thread holds), else ``spawn``. A forked worker starts in milliseconds; a spawned one
    spends about half a CPU-second importing numpy, pydantic and this module again, which on
    a shard of a few seconds costs two workers their scaling. The native threads present by
    then (OpenBLAS's pool, jemalloc's background thread in pyarrow) have fork handlers, and
    the tokenizer has not run in parallel yet (datasets.map forks in the same state)."""
    import multiprocessing as mp
    import threading

    single = threading.active_count() == 1
    method = "fork" if single and "fork" in mp.get_all_start_methods() else "spawn"
    log.debug("tokenize workers start by %s", method)
    return mp.get_context(method)


def _tokenize_shard(
    cfg: TokenizeStage, tok: LoadedTokenizer, shard: int, chash: str, stage: Path
) -> ShardResult:
    t0 = time.monotonic()
    n = cfg.num_shards
    train = BlockWriter(stage / shard_name(shard, n), cfg.block_size, f"{chash}-{shard}-train")
    held = BlockWriter(stage / heldout_name(shard, n), cfg.block_size, f"{chash}-{shard}-held")
    opts = _Opts(
        cfg.text_field,
        cfg.held_out_fraction,
        cfg.seed,
        threads=cfg.workers == 1,
        txt_split=cfg.txt_split,
    )
    enc = PieceCache.wrap(tok.rust(), tok.spec)
    pool = None
    if cfg.workers > 1:
        global _WORKER_TOK
        ctx = _pool_context()
        forked = ctx.get_start_method() == "fork"
        if forked:
            _WORKER_TOK = enc  # inherited: no second parse of the tokenizer
        pool = ctx.Pool(
            cfg.workers,
            initializer=_worker_init,
            initargs=(None if forked else tok.spec, tok.eos_id, opts),
        )
    reads = tmp_dir = stage / "_read"
    tmp_dir.mkdir()
    try:
        tasks = _shard_tasks(cfg, shard, reads)
        for task, (ids, ndocs, held_ids, nheld) in _results(
            tasks, pool, cfg.workers, lambda t: _run_task(enc, tok.eos_id, opts, t)
        ):
            train.start_source(task.source)
            held.start_source(task.source)
            train.add(ids, ndocs)
            if nheld:
                held.add(held_ids, nheld)
            if task.cleanup:
                Path(task.cleanup).unlink(missing_ok=True)
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    dropped = train.close()
    held.close()
    if cfg.held_out_fraction <= 0:
        shutil.rmtree(stage / heldout_name(shard, n))
    return ShardResult(
        shard=shard,
        num_shards=n,
        config_hash=chash,
        docs=train.docs,
        tokens=train.blocks * cfg.block_size,
        blocks=train.blocks,
        dropped_tokens=dropped,
        heldout_docs=held.docs,
        heldout_tokens=held.blocks * cfg.block_size,
        heldout_blocks=held.blocks,
        block_size=cfg.block_size,
        seconds=time.monotonic() - t0,
        runs=[(r[0], r[1]) for r in train.runs],
        heldout_runs=[(r[0], r[1]) for r in held.runs],
        source_docs=dict(train.source_docs),
    )
