"""DCP checkpoints of the whole training state, saved locally and handed to the syncer.

A checkpoint holds model, optimizer, the training counters (step, tokens seen: the data
position and the LR schedule are pure functions of the step) and the CPU RNG state, all
through ``torch.distributed.checkpoint`` so the files are sharded per rank and resharding on
load is DCP's job. Saves go to ``<checkpoint.local_dir>/step_<N>/`` (node-local scratch); the
:class:`~cpt_training.checkpoint.CheckpointSyncer` uploads each node's files and commits the tag
(manifest + marker) once every node is done, without the loop waiting on the network.

With ``async_save`` the state is staged to host memory and written by a background thread;
its collectives run on a dedicated gloo group so they never interleave with the training
loop's own collectives. A new save first waits for the previous one's write (DCP keeps one
staging buffer in flight). On CUDA (``pinned_staging``) the device-to-host copy itself runs in
the background too, on its own stream into pinned buffers that are reused from save to save:
the loop only calls :meth:`DcpCheckpointer.wait_staged` before the next optimizer step (the
first in-place change of the saved state), so the copy overlaps that step's forward and
backward. Otherwise DCP's default staging copies synchronously inside ``save``.
"""

from __future__ import annotations

import collections
import copy
import logging
import pickle
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from cpt_training.checkpoint import CheckpointSyncer, Selection, TagFiles, tag_for_step

log = logging.getLogger(__name__)

DCP_METADATA = ".metadata"


def _save_planner() -> DefaultSavePlanner:
    """DCP stores each replicated item (optimizer step counters, RNG, loop counters) once.
    By default it spreads them over the ranks' files to balance sizes, which makes every rank
    read every file on load; kept on the lowest rank that holds them, a node restores its own
    ranks' files plus those few (see :meth:`DcpCheckpointer.select_files`)."""
    return DefaultSavePlanner(dedup_save_to_lowest_rank=True)


class TrainCounters(Stateful):
    """The loop's position. Everything else that depends on progress (data order, LR) is a
    function of ``step``, which is what makes resume exact."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])


class ModelState(Stateful):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class RngState(Stateful):
    """The CPU generator (seeded identically on every rank, so one copy serves all)."""

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, counters: TrainCounters
) -> dict[str, Stateful]:
    return {
        "model": ModelState(model),
        "optim": OptimizerState(model, optimizer),
        "train": counters,
        "rng": RngState(),
    }


def _log_write_failure(step: int) -> Any:
    """A done-callback that logs a failed background write with its traceback (the syncer
    only reports the message when it fails the tag)."""

    def callback(fut: Future[Any]) -> None:
        exc = fut.exception()
        if exc is not None:
            log.error("checkpoint step %d: background write failed", step, exc_info=exc)

    return callback


class DcpCheckpointer:
    """Save/load the training state; saving hands every tag to ``syncer``."""

    def __init__(
        self,
        state: dict[str, Stateful],
        local_dir: str,
        syncer: CheckpointSyncer,
        *,
        async_save: bool,
        is_local_main: bool,
        pinned_staging: bool = False,
    ) -> None:
        self.state = state
        self.local_dir = Path(local_dir)
        self.syncer = syncer
        self.async_save = async_save
        self.is_local_main = is_local_main
        self._in_flight: Future[Any] | None = None
        self._staging: Future[Any] | None = None
        self._stager: Any = _pinned_stager() if async_save and pinned_staging else None
        self._async_group: Any = None
        if async_save:
            # Collective: all ranks construct the checkpointer at the same point.
            self._async_group = dist.new_group(backend="gloo")

    def _prepare_dir(self, path: Path) -> None:
        # Leftovers of an earlier attempt at the same step would be uploaded with the new files.
        if self.is_local_main:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()

    def wait(self) -> None:
        """Block until the previous asynchronous write finished (raises its error)."""
        if self._in_flight is not None:
            fut, self._in_flight = self._in_flight, None
            fut.result()

    def wait_staged(self) -> None:
        """Block until the last save's copy of the state has left the device. Call before
        anything changes the saved tensors in place (the optimizer step)."""
        if self._staging is not None:
            fut, self._staging = self._staging, None
            try:
                fut.result()
            except Exception as exc:  # the write fails too; the syncer fails that tag
                log.error("checkpoint staging failed: %s", exc)

    def warm_up(self) -> None:
        """Stage the state once into the pinned buffers and wait (all ranks, after the first
        optimizer step, when the optimizer state exists). Allocating and pinning host memory
        for the whole state takes seconds and stalls the GPU's work queue meanwhile: done here,
        outside the measured loop, every later save reuses the buffers."""
        if self._stager is None:
            return
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
        try:
            res = self._stager.stage(self.snapshot())
            if isinstance(res, Future):
                res.result()
        except Exception as exc:  # saves fall back to DCP's default staging
            log.warning("pinned checkpoint staging disabled (warm-up failed: %r)", exc)
            self._stager.release()
            self._stager = None
            return
        log.info("checkpoint staging buffers ready in %.1fs", time.perf_counter() - t0)

    def snapshot(self) -> dict[str, Any]:
        """The state as plain nested dicts of tensors and Python values. DCP's stagers
        deep-copy what they are given; handing them the Stateful wrappers makes some torch
        versions copy the wrapper objects themselves (2.11: ``KeyError: <class 'type'>``)."""
        return {key: value.state_dict() for key, value in self.state.items()}

    def save(self, step: int) -> None:
        """Write ``step_<step>`` locally and queue it for upload + commit (all ranks)."""
        t0 = time.perf_counter()
        path = self.local_dir / tag_for_step(step)
        if self._in_flight is not None and not self._in_flight.done():
            log.info("waiting for the previous checkpoint write before saving step %d", step)
        try:
            self.wait()
        except Exception as exc:  # that tag is failed by the syncer; this save goes on
            log.error("previous checkpoint write failed: %s", exc)
        self._prepare_dir(path)
        if self.async_save:
            if self._stager is not None:
                # Kernels the loop queued after its last sync must finish before the staging
                # stream reads the state.
                if torch.cuda.is_available():
                    torch.cuda.current_stream().synchronize()
                res = state_dict_saver.async_save(
                    self.snapshot(),
                    checkpoint_id=str(path),
                    process_group=self._async_group,
                    async_stager=self._stager,
                    planner=_save_planner(),
                )
            else:
                res = state_dict_saver.async_save(
                    self.snapshot(),
                    checkpoint_id=str(path),
                    process_group=self._async_group,
                    planner=_save_planner(),
                )
            fut: Future[Any] = res if isinstance(res, Future) else res.upload_completion
            fut.add_done_callback(_log_write_failure(step))
            if not isinstance(res, Future):
                self._staging = res.staging_completion
            self._in_flight = fut
            self.syncer.submit(path, step=step, ready=fut)
        else:
            state_dict_saver.save(self.state, checkpoint_id=str(path), planner=_save_planner())
            self.syncer.submit(path, step=step)
        log.info(
            "checkpoint step %d staged in %.2fs (%s)",
            step,
            time.perf_counter() - t0,
            "async write" if self.async_save else "written",
        )

    def load(self, path: Path) -> None:
        state_dict_loader.load(self.state, checkpoint_id=str(path))

    def select_files(self, view: TagFiles) -> Selection:
        """The restore file selector of this rank: ``.metadata`` plus the ``.distcp`` files
        that DCP's load plan for this rank's current state reads (exactly what
        :meth:`load` will open, whatever the sharding that wrote the tag). All ranks call it
        at the same point (it builds the state dicts, as a load does)."""
        if DCP_METADATA not in view.paths:
            return Selection.whole(f"{view.tag} has no {DCP_METADATA}: not a DCP checkpoint")
        metadata = pickle.loads(view.read_bytes(DCP_METADATA))
        return Selection.of({DCP_METADATA, *dcp_files_read(self.state, metadata)})

    def release(self) -> None:
        """Error path: join the staging thread and free its buffers without waiting for the
        write (its collectives may never complete once a peer is gone)."""
        if self._stager is not None:
            self._stager.release()
            self._stager = None

    def close(self) -> None:
        """Wait for the last write, then release staging and the async group (all ranks)."""
        try:
            self.wait()
        except Exception as exc:
            log.error("last checkpoint write failed: %s", exc)
        if self._stager is not None:
            self._stager.release()
            self._stager = None
        if self._async_group is not None:
            dist.destroy_process_group(self._async_group)
            self._async_group = None


def dcp_files_read(state: dict[str, Any], metadata: Metadata) -> set[str]:
    """The data files of a DCP checkpoint that loading ``state`` on this rank opens: the
    storage of every item in this rank's load plan (the planner DCP's ``load`` uses)."""
    sd = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
    planner = DefaultLoadPlanner()
    planner.set_up_planner(sd, metadata, False)
    plan = planner.create_local_plan()
    return {metadata.storage_data[item.storage_index].relative_path for item in plan.items}


def _pinned_stager() -> Any:
    """Our pinned-buffer stager on CUDA, or None (then DCP's default staging is used) where
    there is no GPU or the stager fails its self-test."""
    if not torch.cuda.is_available():
        return None
    stager = PinnedStager()
    if not _stager_self_test(stager):
        stager.release()
        return None
    return stager


class PinnedStager:
    """Stages the state for ``async_save``: every device tensor is copied into a pinned host
    buffer that the first save (or :meth:`DcpCheckpointer.warm_up`) allocates and every later
    save reuses, with non-blocking copies on a side CUDA stream from a worker thread.

    Why not DCP's ``DefaultStager``: torch 2.11's cannot stage a second time (``KeyError:
    <class 'type'>`` from its deep copy), and ``async_save`` closes it after each save, which
    frees its buffers, so every save would allocate and pin the whole state again (seconds for
    a 1B model, during which the GPU's work queue stalls). DTensors stay DTensors (same spec,
    host-side local shard), so DCP plans and writes the staged copy exactly like the original.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cpt-ckpt-stage")
        self._stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]

    # The AsyncStager interface DCP calls.
    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        """Staging completes through the returned future."""

    def stage(self, state_dict: dict[str, Any]) -> Future[dict[str, Any]]:
        # The side stream starts after everything the loop queued so far.
        self._stream.wait_stream(torch.cuda.current_stream())
        return self._pool.submit(self._stage, state_dict)

    def close(self) -> None:
        """No-op: ``async_save`` of some torch versions closes the stager after every save;
        the buffers must outlive it (see :meth:`release`)."""

    def release(self) -> None:
        self._pool.shutdown(wait=True)
        self._buffers.clear()

    def _stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        with torch.cuda.stream(self._stream):
            out: dict[str, Any] = self._copy(state_dict, ())
        self._stream.synchronize()
        return out

    def _buffer(self, key: tuple[Any, ...], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            self._buffers[key] = buf
        return buf

    def _copy(self, obj: Any, key: tuple[Any, ...]) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(obj, DTensor):
            local = self._copy(obj.to_local(), key)
            return DTensor(local, obj._spec, requires_grad=False)  # type: ignore[call-arg]
        if isinstance(obj, torch.Tensor):
            src = obj.detach()
            if src.device.type == "cpu":
                return src.clone()
            buf = self._buffer(key, src)
            buf.copy_(src, non_blocking=True)
            return buf
        if isinstance(obj, dict):
            items = [(k, self._copy(v, (*key, k))) for k, v in obj.items()]
            return (
                collections.OrderedDict(items)
                if isinstance(obj, collections.OrderedDict)
                else (dict(items))
            )
        if isinstance(obj, list):
            return [self._copy(v, (*key, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self._copy(v, (*key, i)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)


def _stager_self_test(stager: Any) -> bool:
    """Stage a small state twice, as consecutive checkpoints do (torch 2.11's own stager fails
    the second time with ``KeyError: <class 'type'>``, which is why we have our own)."""
    probe = {"t": torch.zeros(8, device="cuda"), "o": collections.OrderedDict(step=1)}
    try:
        for _ in range(2):
            res = stager.stage(probe)
            if isinstance(res, Future):
                res.result()
    except Exception as exc:
        log.warning("pinned checkpoint staging disabled (self-test failed: %r)", exc)
        return False
    return True
