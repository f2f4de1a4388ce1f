"""The native training loop (``cpt-train train`` with ``backend: native``).

One process per device under torchrun. The run is a pure function of (base weights, data,
config, step): the data order and the learning rate are computed from the optimizer step, the
model/optimizer state comes from the newest committed checkpoint, so attempt n+1 continues
exactly where the last commit of attempt n left off.

Hot path: no host synchronisation except at log steps (loss, grad norm and throughput are read
there only); batches are pinned and copied with ``non_blocking``; FSDP2 keeps bf16 compute
weights and fp32 master weights, gradients reduced in fp32; AdamW is fused; attention is SDPA
(flash / cuDNN on GPUs); blocks are compiled one by one when ``compile`` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from cpt_training import flops, storage
from cpt_training.checkpoint import (
    CheckpointSyncer,
    CommittedCheckpoint,
    restore_distributed,
)
from cpt_training.config import ConfigError, TrainStage
from cpt_training.data import log_mixture
from cpt_training.held_out import eval_due
from cpt_training.metrics import MetricsSink, Throughput, peak_flops_per_device
from cpt_training.model_dir import fetch_model_dir_per_node, load_hf_config
from cpt_training.native import distributed as nd
from cpt_training.native.checkpointing import DcpCheckpointer, TrainCounters, training_state
from cpt_training.native.data import MicroBatches, open_batches, open_blocks
from cpt_training.native.evaluate import HeldOutEval
from cpt_training.native.float8 import convert_to_float8, float8_problem
from cpt_training.native.llama import IGNORE_INDEX, Llama, shift_targets
from cpt_training.native.optim import build_adamw, clip_grads, set_lr
from cpt_training.native.parallelize import Layout, build_mesh, parallelize
from cpt_training.native.single import MasterWeights
from cpt_training.native.weights import load_hf_weights
from cpt_training.preemption import StopRequest, stopped_exit
from cpt_training.progress import ProgressWriter, progress_file_uri
from cpt_training.schedule import LrSchedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Batch arithmetic, checked before anything expensive happens."""

    layout: Layout
    micro_batch: int
    grad_accum: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.layout.dp * self.micro_batch * self.grad_accum * self.seq_len

    @classmethod
    def make(cls, cfg: TrainStage, world_size: int) -> Plan:
        try:
            layout = Layout.plan(
                world_size, cfg.parallelism.tensor_parallel, cfg.parallelism.pipeline_parallel
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        per_round = cfg.micro_batch_size * layout.dp
        if cfg.global_batch_size % per_round:
            raise ConfigError(
                f"globalBatchSize ({cfg.global_batch_size}) must be a multiple of "
                f"microBatchSize x data-parallel ranks ({cfg.micro_batch_size} x {layout.dp} = "
                f"{per_round})"
            )
        return cls(layout, cfg.micro_batch_size, cfg.global_batch_size // per_round, cfg.seq_len)


def tensorboard_uri(cfg: TrainStage) -> str:
    base = cfg.tensorboard_uri or storage.join_uri(cfg.checkpoint.uri, "tensorboard")
    return storage.join_uri(base, f"attempt-{cfg.attempt}")


class Trainer:
    """Builds everything in small steps, then ``train()`` runs the loop."""

    def __init__(self, cfg: TrainStage, d: nd.Dist) -> None:
        self.cfg = cfg
        self.d = d
        self.plan = Plan.make(cfg, d.world_size)
        if cfg.parallelism.sequence_parallel:
            log.warning("parallelism.sequenceParallel is not used by the native backend")
        torch.manual_seed(cfg.seed)
        self.blocks = open_blocks(cfg)  # fails fast on a seqLen/blockSize mismatch
        self.held_out: HeldOutEval | None = None  # built at the first evaluation
        self.mesh: DeviceMesh = build_mesh(d.device_type, self.plan.layout)
        self.dp_rank = self.mesh["dp"].get_local_rank()
        self.dp_group = self.mesh["dp"].get_group()
        # One device: a plain module (native/single.py) unless FSDP is asked for.
        self.fsdp = d.world_size > 1 or cfg.parallelism.fsdp_single_device
        self._build_model()
        self.master = (
            MasterWeights(self.model) if not self.fsdp and cfg.precision == "bf16" else None
        )
        self.optimizer = build_adamw(self.model, cfg.optimizer, d.device_type)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.schedule = LrSchedule.from_config(cfg.optimizer, cfg.max_steps)
        self.counters = TrainCounters()
        self.stop = StopRequest()
        self.stopped_at: int | None = None  # the step a stop request ended the loop at
        self._build_checkpointing()
        self._build_reporting()

    # -- construction ----------------------------------------------------------------------------

    def _build_model(self) -> None:
        cfg, d = self.cfg, self.d
        # Config (and tokenizer) only: a resumed run never reads the base weights.
        self.model_dir = fetch_model_dir_per_node(cfg.model_uri, d.is_local_main, weights=False)
        try:
            self.hf_config = load_hf_config(self.model_dir, cfg.config_overrides)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.seq_len > self.hf_config.max_position_embeddings:
            log.warning(
                "seqLen %d exceeds the model's max_position_embeddings %d",
                cfg.seq_len,
                self.hf_config.max_position_embeddings,
            )
        with torch.device("meta"):
            model = Llama.from_hf_config(self.hf_config)
        if cfg.float8:
            problem = float8_problem(d.device_type, d.device)
            if problem:
                raise ConfigError(problem)
            log.info("float8 training: %d linear layers converted", convert_to_float8(model))
        try:
            parallelize(
                model,
                self.mesh,
                bf16=cfg.precision == "bf16",
                activation_checkpointing=cfg.activation_checkpointing,
                compile_model=cfg.compile,
                device_type=d.device_type,
                fsdp=self.fsdp,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.fused_loss:
            model.use_fused_loss(compiled=cfg.compile)
        model.to_empty(device=d.device)
        if model.args.tie_word_embeddings:
            # to_empty gives each module its own storage (FSDP2 keeps the tie itself).
            model.lm_head.weight = model.model.embed_tokens.weight
        self.model = model
        self.shape = flops.ModelShape.from_hf_config(self.hf_config.to_dict())

    def _build_checkpointing(self) -> None:
        cfg, d = self.cfg, self.d
        world_info = {
            "backend": "native",
            "dp": self.plan.layout.dp,
            "tp": self.plan.layout.tp,
            "deviceType": d.device_type,
        }
        self.syncer = CheckpointSyncer(
            cfg.checkpoint.uri,
            keep=cfg.checkpoint.keep,
            local_keep=cfg.checkpoint.keep,
            world_info=world_info,
            on_commit=self._on_commit,
        )
        self.checkpointer = DcpCheckpointer(
            training_state(self.model, self.optimizer, self.counters),
            cfg.checkpoint.local_dir,
            self.syncer,
            async_save=cfg.checkpoint.async_save,
            is_local_main=d.is_local_main,
            pinned_staging=d.device_type == "cuda",
        )

    def _build_reporting(self) -> None:
        cfg, d = self.cfg, self.d
        self.progress: ProgressWriter | None = None
        self.sink: MetricsSink | None = None
        self.tb_local: Path | None = None
        if d.is_main:
            self.progress = ProgressWriter(
                progress_file_uri(cfg.progress_uri, cfg.checkpoint.uri),
                attempt=cfg.attempt,
                max_steps=cfg.max_steps,
            )
            self.tb_local = (
                Path(cfg.checkpoint.local_dir) / ".tensorboard" / f"attempt-{cfg.attempt}"
            )
            self.sink = MetricsSink(max_steps=cfg.max_steps, tensorboard_dir=self.tb_local)
        peak = peak_flops_per_device(
            d.device_type, nd.device_name(d.device), cfg.instance_type, d.local_world_size
        )
        self.throughput = Throughput(
            self.shape.flops_per_token(cfg.seq_len), d.world_size, peak, start_step=0
        )

    # -- checkpoints -----------------------------------------------------------------------------

    def _on_commit(self, ckpt: CommittedCheckpoint) -> None:
        if self.progress is not None:
            self.progress.committed(ckpt.step, ckpt.seconds)
        self._sync_tensorboard()

    def _sync_tensorboard(self) -> None:
        if self.sink is None or self.tb_local is None or not self.tb_local.is_dir():
            return
        self.sink.flush()
        try:
            storage.open_storage(tensorboard_uri(self.cfg)).upload_dir(self.tb_local)
        except Exception as exc:  # metrics upload must never stop training
            log.warning("TensorBoard upload failed: %s", exc)

    def restore_or_init(self) -> int:
        """Resume from the newest committed checkpoint, else load the base weights."""
        whole = self.cfg.checkpoint.restore_whole_tag
        ckpt = restore_distributed(
            self.cfg.checkpoint.uri,
            self.cfg.checkpoint.local_dir,
            collective=self.syncer.collective,
            select=None if whole else self.checkpointer.select_files,  # a node's files only
        )
        if ckpt is None:
            log.info("no committed checkpoint: starting from %s", self.cfg.model_uri)
            model_dir = fetch_model_dir_per_node(self.cfg.model_uri, self.d.is_local_main)
            load_hf_weights(self.model, model_dir)
            return 0
        assert ckpt.local_path is not None
        t0 = time.perf_counter()
        self.checkpointer.load(ckpt.local_path)
        if self.counters.step != ckpt.step:
            raise RuntimeError(
                f"checkpoint {ckpt.uri} is tagged step {ckpt.step} but holds step "
                f"{self.counters.step}"
            )
        self.syncer.last_committed = ckpt
        if self.progress is not None:
            self.progress.committed(ckpt.step)
        log.info(
            "resumed from %s (step %d) in %.1fs", ckpt.uri, ckpt.step, time.perf_counter() - t0
        )
        return ckpt.step

    # -- the loop --------------------------------------------------------------------------------

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # Host tensors come pinned from the data prefetcher: the copy overlaps compute.
        return t.to(self.d.device, non_blocking=True)

    def _global_count(self, local: int) -> torch.Tensor:
        # torch.full is a fill kernel: unlike torch.tensor(...) it copies nothing from the host,
        # so it does not wait for the queued work of the previous step.
        count = torch.full((), float(local), device=self.d.device)
        if self.plan.layout.dp > 1:
            dist.all_reduce(count, group=self.dp_group)
        return count

    def _step(self, batches: MicroBatches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches; returns device tensors
        (summed loss of this rank, target-token count of all ranks, grad norm)."""
        count, scale = self._loss_scale(batches)
        loss_sum = torch.zeros((), device=self.d.device)
        last = len(batches) - 1
        for i, (ids_host, labels_host) in enumerate(batches):
            loss_sum += self._micro_step(ids_host, labels_host, scale, last=i == last)
        norm = self._optimizer_step()
        return loss_sum, count, norm

    def _loss_scale(self, batches: MicroBatches) -> tuple[torch.Tensor, torch.Tensor]:
        """The global target-token count and the factor that turns summed losses into the
        mean over the global batch."""
        # Counted on the host from host tensors: no device sync.
        local_count = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in batches)
        count = self._global_count(local_count)
        # FSDP averages gradients over dp ranks; scaling by dp makes the result the mean over
        # every target token of the global batch.
        return count, self.plan.layout.dp / count.clamp(min=1.0)

    def _micro_step(
        self, ids_host: torch.Tensor, labels_host: torch.Tensor, scale: torch.Tensor, last: bool
    ) -> torch.Tensor:
        """Forward and backward of one micro batch; returns its summed loss (detached)."""
        ids = self._to_device(ids_host)
        labels = ids if labels_host is ids_host else self._to_device(labels_host)
        if self.master is not None:
            loss = self.master(ids, shift_targets(labels))
        else:
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            loss = self.model(ids, shift_targets(labels))
        (loss * scale).backward()
        if self.master is not None:
            self.master.accumulate()
        detached: torch.Tensor = loss.detach()
        return detached

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step, zero; returns the gradient norm before clipping."""
        norm = clip_grads(self.params, self.cfg.optimizer.grad_clip)
        self.checkpointer.wait_staged()  # a checkpoint copy may still be reading the state
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.refresh()
        return norm

    def begin_training(self) -> None:
        """Before the first step of a loop: the compute copies take the loaded weights."""
        self.model.train()
        if self.master is not None:
            self.master.refresh()

    def _batches(self, start_step: int) -> Generator[MicroBatches, None, None]:
        return open_batches(
            self.blocks,
            dp_rank=self.dp_rank,
            dp_size=self.plan.layout.dp,
            micro_batch=self.plan.micro_batch,
            grad_accum=self.plan.grad_accum,
            start_step=start_step,
            pin=self.d.device_type == "cuda",
        )

    def _log(
        self, step: int, loss_sum: torch.Tensor, count: torch.Tensor, norm: torch.Tensor
    ) -> None:
        loss_t = loss_sum.clone()
        if self.plan.layout.dp > 1:
            dist.all_reduce(loss_t, group=self.dp_group)
        loss = float(loss_t / count.clamp(min=1.0))  # the host sync of a log step
        lr = self.schedule(step - 1)
        m = self.throughput.measure(
            step, self.plan.tokens_per_step, loss=loss, lr=lr, grad_norm=float(norm)
        )
        if self.sink is not None:
            self.sink.write(m)
        if self.progress is not None:
            self.progress.measured(m, self.blocks.tokens_seen(step, self.global_blocks))

    def _eval_due(self, step: int) -> bool:
        return eval_due(step, self.cfg.eval_every_steps, self.cfg.max_steps)

    def _evaluate(self, step: int) -> None:
        """Held-out loss per source on all ranks (sharded), reported by rank 0."""
        if self.held_out is None:
            self.held_out = HeldOutEval(
                self.blocks,
                self.cfg.eval_blocks,
                self.dp_rank,
                self.plan.layout.dp,
                self.plan.micro_batch,
            )
        model = self.master if self.master is not None else self.model
        losses = self.held_out.run(model, self.d.device, self.dp_group)
        log.info("step %d held-out loss: %s", step, losses)
        if self.sink is not None:
            self.sink.write_eval(step, losses)
        if self.progress is not None:
            self.progress.evaluated(step, losses)

    @property
    def global_blocks(self) -> int:
        """Blocks (sample positions) per optimizer step over all ranks."""
        return self.plan.tokens_per_step // self.cfg.seq_len

    def _log_memory(self, step: int) -> None:
        """Device memory after the first step (weights, optimizer state and one step's peak
        activations all allocated): what the planner's per-device estimate is checked against."""
        stats = nd.memory_stats(self.d.device)
        if stats is not None and self.d.is_local_main:
            gib = {k: round(v / 2**30, 2) for k, v in stats.items()}
            log.info("device memory after step %d (GiB, local rank 0): %s", step, gib)

    def train(self) -> int:
        try:
            return self._train()
        except BaseException:
            # No waiting for peers here (one may be gone): stop our own pools and staging
            # thread so nothing of ours outlives the process group.
            self.checkpointer.release()
            self.syncer.close()
            raise

    def _train(self) -> int:
        cfg = self.cfg
        start = self.restore_or_init()
        self.counters.step = start
        if self.sink is not None:
            self.sink.write_start(start)
        log_mixture(self.blocks, self.cfg.max_steps, self.global_blocks)
        if self.progress is not None:
            self.progress.update(  # attempt n has started
                step=start,
                tokens_per_source=self.blocks.tokens_seen(start, self.global_blocks),
                force=True,
            )
        if start == 0 and cfg.stop_after_steps == 0:
            # Materialise the base model as a native checkpoint (conversion checks, tests).
            self.checkpointer.save(0)
        elif start < cfg.max_steps:
            self._loop(start)
        self.checkpointer.close()
        self.syncer.finalize()
        finished = self.counters.step >= cfg.max_steps
        if self.progress is not None:
            if finished:
                self.progress.done()
            elif self.stopped_at is None:
                self.progress.flush()
        self._sync_tensorboard()
        if self.sink is not None:
            self.sink.close()
        self.syncer.close()
        if self.stopped_at is not None:
            return stopped_exit(
                self.stopped_at,
                self.syncer.last_committed,
                self.syncer.failures,
                local_main=self.d.is_local_main,
                progress=self.progress,
            )
        if finished and (
            self.syncer.last_committed is None or self.syncer.last_committed.step < cfg.max_steps
        ):
            raise RuntimeError(
                f"training reached step {self.counters.step} but its final checkpoint was not "
                f"committed: {self.syncer.failures[-1:] or 'unknown reason'}"
            )
        return 0

    def _stop_agreed(self, step: int) -> bool:
        """After each step: did any rank get a stop request? Then save ``step`` (unless
        this step's save already happened) and end the loop on every rank."""
        if not self.stop.agreed(self.syncer.collective):
            return False
        if step % self.cfg.checkpoint.every_steps and step != self.cfg.max_steps:
            self.checkpointer.save(step)
        self.stopped_at = step
        return True

    def _loop(self, start: int) -> None:
        cfg = self.cfg
        log.info(
            "training steps %d..%d: dp=%d tp=%d micro=%d accum=%d seq=%d (%d tokens/step) on %s",
            start + 1,
            cfg.max_steps,
            self.plan.layout.dp,
            self.plan.layout.tp,
            self.plan.micro_batch,
            self.plan.grad_accum,
            self.plan.seq_len,
            self.plan.tokens_per_step,
            self.d.device,
        )
        self.begin_training()
        step = start
        ran = 0
        data = self._batches(start)
        self.throughput.reset(step)
        every = cfg.checkpoint.every_steps
        stop = cfg.stop_after_steps
        self.stop.install()
        try:
            while step < cfg.max_steps and (stop is None or ran < stop):
                set_lr(self.optimizer, self.schedule(step))
                try:
                    batches = next(data)
                except StopIteration:
                    raise RuntimeError(f"the dataset ran out of blocks at step {step}") from None
                loss_sum, count, norm = self._step(batches)
                step += 1
                ran += 1
                self.counters.step = step
                self.counters.tokens_seen += self.plan.tokens_per_step
                if step % cfg.log_every == 0 or step == cfg.max_steps or step == start + 1:
                    self._log(step, loss_sum, count, norm)
                    if step == start + 1:
                        # The first step pays for compilation and allocator warm-up.
                        self._log_memory(step)
                        self.checkpointer.warm_up()
                        self.throughput.reset(step)
                if self._eval_due(step):
                    self._evaluate(step)
                if step % every == 0 or step == cfg.max_steps:
                    self.checkpointer.save(step)
                if self._stop_agreed(step):
                    break
                self.syncer.poll()
        finally:
            data.close()  # stops the prefetch thread
        if stop is not None and ran >= stop and step < cfg.max_steps:
            log.info("stopAfterSteps=%d reached at step %d", stop, step)


LEFTOVER_THREADS_MSG = "background threads still running at exit"


def _join_daemon_threads(grace_s: float = 5.0) -> list[str]:
    """Wait briefly for daemon threads, then name those still running. The interpreter joins
    non-daemon threads itself; a daemon thread still inside torch when the interpreter
    finalizes aborts the process ("terminate called without an active exception"), so every
    thread the trainer starts is joined before this point and this is the safety net."""
    deadline = time.monotonic() + grace_s
    left = []
    for t in threading.enumerate():
        if t is threading.current_thread() or not t.daemon:
            continue
        t.join(timeout=max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            left.append(t.name)
    return left


def run(cfg: TrainStage) -> int:
    d = nd.init_distributed(cfg.device)
    try:
        return Trainer(cfg, d).train()
    finally:
        nd.destroy()
        left = _join_daemon_threads()
        if left:
            log.warning("%s: %s", LEFTOVER_THREADS_MSG, ", ".join(sorted(left)))
