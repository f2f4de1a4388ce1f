"""The trainer's view of the tokenized dataset: per-step micro-batches as torch tensors.

``cpt_training.data.TokenBlocks`` decides which blocks every data-parallel rank sees at every
step (a pure function of the step, so resume is a seek); this module turns them into tensors,
pinned for asynchronous host-to-device copies, and reads them one step ahead on a background
thread so the loop never waits for the memory-mapped Arrow files.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Generator, Iterator

import numpy as np
import torch

from cpt_training.config import ConfigError, TrainStage
from cpt_training.data import TokenBlocks

log = logging.getLogger(__name__)

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]
"""(input_ids, labels) per micro-batch, each int64 [micro_batch, seq_len] on the host."""

_END = object()


class _Prefetch:
    """Runs an iterator ``depth`` items ahead in a background thread (errors are re-raised).

    :meth:`close` stops *and joins* the thread. The thread makes torch tensors; one still
    running when the interpreter finalizes is killed inside torch's C++ code (CPython ends
    threads that wait for the GIL then), which aborts the process with "terminate called
    without an active exception". A rank that stops right after its last step exits within a
    fraction of a second, so the join is what makes every rank exit cleanly."""

    JOIN_TIMEOUT_S = 60.0

    def __init__(self, it: Iterator[MicroBatches], depth: int = 2) -> None:
        self._q: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(it,), name="cpt-data-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, it: Iterator[MicroBatches]) -> None:
        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(_END)
        except BaseException as exc:  # handed to the consumer
            self._q.put(exc)
        finally:
            # Free the source (and its tensors) here, while close() waits for this thread.
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[MicroBatches]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread and wait for it (idempotent)."""
        self._stop.set()
        deadline = time.monotonic() + self.JOIN_TIMEOUT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Unblock a put() on a full queue (and drop batches nobody will read).
            with contextlib.suppress(queue.Empty):
                while True:
                    self._q.get_nowait()
            self._thread.join(timeout=0.1)
        if self._thread.is_alive():
            log.warning("data prefetch thread still running %.0fs after close", self.JOIN_TIMEOUT_S)


def _tensor(arr: np.ndarray, pin: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    return t.pin_memory() if pin else t


def open_blocks(cfg: TrainStage) -> TokenBlocks:
    blocks = TokenBlocks(cfg.data_uri, seed=cfg.seed, mixture=cfg.mixture)
    if blocks.block_size != cfg.seq_len:
        raise ConfigError(
            f"seqLen ({cfg.seq_len}) must equal the tokenized data's blockSize "
            f"({blocks.block_size}) in {cfg.data_uri}"
        )
    return blocks


def open_batches(
    blocks: TokenBlocks,
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch: int,
    grad_accum: int,
    start_step: int,
    pin: bool = False,
) -> Generator[MicroBatches, None, None]:
    """Micro-batches of this DP rank for steps ``start_step, start_step + 1, ...``."""
    log.info(
        "data: %d blocks of %d tokens (%d per step) from %s",
        len(blocks),
        blocks.block_size,
        dp_size * micro_batch * grad_accum,
        blocks.uri,
    )

    def gen() -> Iterator[MicroBatches]:
        for sb in blocks.batches(dp_rank, dp_size, micro_batch, grad_accum, start_step):
            out = []
            for arr in sb.micro_batches:
                ids = _tensor(arr, pin)
                out.append((ids, ids))  # labels == input_ids; the model shifts
            yield out

    pre = _Prefetch(gen())
    try:
        yield from pre
    finally:
        pre.close()


def heldout_blocks(data_uri: str, n: int) -> list[torch.Tensor]:
    """Up to ``n`` held-out blocks (each int64 [block_size]) in stored order."""
    blocks = TokenBlocks(data_uri)
    out: list[torch.Tensor] = []
    for arr in blocks.held_out(batch_size=max(1, n), max_blocks=n):
        out.extend(torch.from_numpy(np.ascontiguousarray(row, dtype=np.int64)) for row in arr)
    if not out:
        log.warning("%s has no held-out blocks (heldOutFraction was 0): no eval loss", data_uri)
    return out
