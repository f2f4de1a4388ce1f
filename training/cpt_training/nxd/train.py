"""``cpt-train train`` with ``backend: nxd``: Llama continual pretraining on trn1 with NxD Core.

One process per NeuronCore under torchrun (32 per trn1.32xlarge). The shape of a run:

1. Plan (pure, before anything heavy): DP = world / (TP x PP), the per-replica batch and how
   it is split (PP: NxD's micro-batches; no PP: gradient accumulation), precision settings.
2. Environment: :func:`cpt_training.nxd.env.neuron_env` as defaults (the pod's env wins), then
   ``dist.init_process_group("xla")``.
3. Layout and config come from the committed ``pretrained_weight`` (written by
   ``convert-to-nxd``): its ``config.json`` and the layout in its manifest (qkv_linear, KV
   multiplier, TP, PP), so the model is exactly what the converter wrote.
4. Restore: the newest committed tag (``step_N``, else ``pretrained_weight``) is downloaded
   into node-local scratch by :func:`~cpt_training.checkpoint.restore_distributed`; its
   recorded degrees are checked against this attempt first, from its manifest (NxD can only
   load the same TP/PP, and with ZeRO-1 the same DP): a mismatch stops with a message naming
   both before anything is downloaded.
5. ``neuronx_distributed_config`` + ``initialize_parallel_model`` (meta-device init, NxD
   materialises only the local PP stage) + ``initialize_parallel_optimizer`` (AdamW, ZeRO-1).
   Weight decay is applied per parameter group from the config; NxD's Llama example builds
   its groups with a hard-coded 0.01, so its ``--weight_decay`` never takes effect.
6. Loop: the learning rate is ``cpt_training.schedule`` of the step (same curve as the native
   backend; resuming needs only the step), data is ``cpt_training.data.TokenBlocks`` by DP
   rank (so a resumed step sees the very batches it would have), every ``everySteps`` steps
   ``nxd.save_checkpoint`` writes the tag to node-local scratch and the
   :class:`~cpt_training.checkpoint.CheckpointSyncer` uploads each node's files and commits
   the tag (manifest, then marker) once all nodes are done.

Node-local scratch: NxD's checkpoint code creates the tag's directories on global rank 0
only, i.e. it assumes a shared filesystem; every rank here creates them first (idempotent),
so each node writes its own shards locally. With async saving NxD writes the files in a
background thread; a rank's files are complete when that write (a future NxD keeps on its
``g_iostate``) finishes, which is what the syncer waits for before uploading. NxD's own
``done`` file follows with the next save; cpt's commit marker, not ``done``, decides what is
restorable.

Under ``neuron_parallel_compile`` (``NEURON_EXTRACT_GRAPHS_ONLY`` set) the run only traces:
no restore, no checkpoints, no progress, and a few steps unless ``stopAfterSteps`` says more.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cpt_training import storage
from cpt_training.config import ConfigError, TrainStage
from cpt_training.held_out import eval_due
from cpt_training.nxd import env as nxd_env
from cpt_training.nxd.convert import apply_overrides
from cpt_training.nxd.layout import LlamaShape, RankCoords
from cpt_training.nxd.plan import (
    PRECOMPILE_DEFAULT_STEPS,
    PRECOMPILE_ENV,
    PRETRAINED,
    NxdPlan,
    check_resume,
    is_precompile,
    layout_from_record,
    log_due,
    missing_rank_files,
    mixed_precision_config,
    nxd_config_kwargs,
    optimizer_config,
    param_groups,
    precision_recipe,
    restore_selector,
    resume_refusal,
    resume_step,
    save_due,
    stack_micro_batches,
    steps_this_process,
    tag_dirs,
    tensorboard_uri,
    user_content,
    world_record,
)
from cpt_training.preemption import StopRequest, stopped_exit

log = logging.getLogger(__name__)

# The plan's names stay importable from here (tests and tools use ``nxd.train.X``).
__all__ = [
    "PRECOMPILE_DEFAULT_STEPS",
    "PRECOMPILE_ENV",
    "PRETRAINED",
    "NxdPlan",
    "check_resume",
    "is_precompile",
    "layout_from_record",
    "log_due",
    "missing_rank_files",
    "mixed_precision_config",
    "nxd_config_kwargs",
    "optimizer_config",
    "param_groups",
    "precision_recipe",
    "restore_selector",
    "resume_refusal",
    "resume_step",
    "run",
    "save_due",
    "stack_micro_batches",
    "steps_this_process",
    "tag_dirs",
    "tensorboard_uri",
    "user_content",
    "world_record",
]

# ---------------------------------------------------------------------------------------------
# The run (needs torch_xla + neuronx_distributed: the trainer-neuron image)
# ---------------------------------------------------------------------------------------------


def _async_save_future() -> Any:
    """This rank's background write of the tag just saved (NxD's ``g_iostate._save_task``),
    or None when nothing is pending. Private NxD state, read defensively: if it is not there,
    the caller falls back to waiting with ``finalize_checkpoint``."""
    from neuronx_distributed.trainer import checkpoint as nxd_ckpt

    state = getattr(nxd_ckpt, "g_iostate", None)
    return getattr(state, "_save_task", None) if state is not None else None


class _Trainer:
    def __init__(self, cfg: TrainStage, plan: NxdPlan) -> None:
        import torch
        import torch.distributed as dist
        import torch_xla.core.xla_model as xm

        self.cfg, self.plan = cfg, plan
        self.torch, self.dist, self.xm = torch, dist, xm
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.device = xm.xla_device()
        self.precompile = is_precompile(os.environ)
        self.local_root = Path(cfg.checkpoint.local_dir)
        self.local_root.mkdir(parents=True, exist_ok=True)
        self.held_out: Any = None  # built at the first evaluation
        torch.manual_seed(cfg.seed)
        self.stop = StopRequest()
        self.stopped_at: int | None = None  # the step a stop request (SIGTERM) ended the loop at

    # -- checkpoints -----------------------------------------------------------------------------

    def _syncer(self, collective: Any) -> Any:
        from cpt_training.checkpoint import CheckpointSyncer

        return CheckpointSyncer(
            self.cfg.checkpoint.uri,
            keep=self.cfg.checkpoint.keep,
            collective=collective,
            world_info=world_record(self.plan, self.layout),
            on_commit=self._on_commit,
        )

    def _on_commit(self, ckpt: Any) -> None:
        if self.progress is not None:
            self.progress.committed(ckpt.step, getattr(ckpt, "seconds", None))
        self._sync_tensorboard()

    def _pretrained_record(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config.json with overrides, recorded layout) of the committed pretrained_weight."""
        from cpt_training.checkpoint import read_manifest

        uri = storage.join_uri(self.cfg.checkpoint.uri, PRETRAINED)
        try:
            manifest = read_manifest(uri)
        except Exception as exc:
            raise ConfigError(
                f"no committed {PRETRAINED} under {self.cfg.checkpoint.uri} ({exc}): the "
                "convert-to-nxd stage must run first"
            ) from None
        config = storage.read_json(storage.join_uri(uri, "config.json"))
        return apply_overrides(config, self.cfg.config_overrides), manifest.world

    def _restore(self, collective: Any) -> Any:
        """Each node fetches only its ranks' shards of the newest committed tag, once its
        manifest shows degrees this attempt can load (else nothing is downloaded)."""
        from cpt_training.checkpoint import CheckpointRefused, restore_distributed

        select = None
        if not self.cfg.checkpoint.restore_whole_tag:
            lws = os.environ.get("LOCAL_WORLD_SIZE")
            select = restore_selector(self.plan, self.rank, int(lws) if lws else None)
        try:
            return restore_distributed(
                self.cfg.checkpoint.uri,
                self.cfg.checkpoint.local_dir,
                collective=collective,
                include_pretrained=True,
                select=select,
                refuse=resume_refusal(self.plan),
            )
        except CheckpointRefused as exc:
            raise ConfigError(str(exc)) from None

    def _check_restored_files(self, ckpt: Any) -> None:
        """After NxD assigned this rank its coordinates: every file it will load is here."""
        from neuronx_distributed.parallel_layers import parallel_state as ps

        coords = RankCoords(
            tp=int(ps.get_tensor_model_parallel_rank()),
            pp=int(ps.get_pipeline_model_parallel_rank()),
            dp=int(ps.get_data_parallel_rank()),
        )
        missing = missing_rank_files(ckpt.local_path, coords, self.plan.zero1)
        if missing:
            raise RuntimeError(
                f"rank {self.rank} (NxD tp={coords.tp} pp={coords.pp} dp={coords.dp}) needs "
                f"{len(missing)} file(s) of {ckpt.tag} its node did not restore "
                f"({', '.join(missing[:3])}): NxD's rank grid differs from cpt's model of it; "
                "set checkpoint.restoreWholeTag to restore whole tags"
            )

    # -- model -----------------------------------------------------------------------------------

    def _build(self, config: dict[str, Any]) -> None:
        import neuronx_distributed as nxd
        import torch

        from cpt_training import flops
        from cpt_training.nxd import model as nm
        from cpt_training.nxd.optim import AdamWFP32States

        spec = nm.model_spec(self.layout, sequence_parallel=self.plan.sequence_parallel)
        kwargs = nxd_config_kwargs(
            self.cfg,
            self.plan,
            transformer_layer_cls=nm.CptDecoderLayer,
            leaf_module_cls=nm.LEAF_MODULE_NAMES,
            activation_checkpoint=nm.activation_checkpoint_classes(
                self.cfg.activation_checkpointing, self.plan.seq_len
            ),
            param_init_fn=nm.init_weights,
        )
        self.nxd_config = nxd.neuronx_distributed_config(**kwargs)
        rec = precision_recipe(self.cfg, self.plan)
        kit = nm.nxd_kit(
            sequence_parallel=self.plan.sequence_parallel, dtype=getattr(torch, rec.layer_dtype)
        )
        self.model = nxd.initialize_parallel_model(
            self.nxd_config, nm.build_model, False, spec, kit
        )
        opt = self.cfg.optimizer
        self.optimizer = nxd.initialize_parallel_optimizer(
            self.nxd_config,
            AdamWFP32States.for_recipe(rec),
            param_groups(self.model.named_parameters(), opt.weight_decay),
            lr=opt.lr,
            betas=(opt.beta1, opt.beta2),
            eps=opt.eps,
            weight_decay=opt.weight_decay,
        )
        self.shape = flops.ModelShape.from_hf_config(config)

    def _load(self, ckpt: Any) -> int:
        import neuronx_distributed as nxd

        self._check_restored_files(ckpt)
        if ckpt.tag == PRETRAINED:
            nxd.load_checkpoint(
                self.cfg.checkpoint.local_dir, tag=PRETRAINED, model=self.model, optimizer=None
            )
            if self.plan.zero1:
                # ZeRO-1 keeps its own fp32 shards: re-seed them from the loaded weights.
                self.optimizer.optimizer.init_zero()
            return 0
        content = nxd.load_checkpoint(
            self.cfg.checkpoint.local_dir,
            tag=ckpt.tag,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=None,  # the LR is a pure function of the step
        )
        return resume_step(content, ckpt.step, ckpt.tag)

    # -- reporting -------------------------------------------------------------------------------

    def _reporting(self) -> None:
        from cpt_training.metrics import MetricsSink, Throughput, peak_flops_per_device
        from cpt_training.progress import ProgressWriter, progress_file_uri

        cfg = self.cfg
        self.progress: Any = None
        self.sink: Any = None
        self.tb_local: Path | None = None
        if self.is_main and not self.precompile:
            self.progress = ProgressWriter(
                progress_file_uri(cfg.progress_uri, cfg.checkpoint.uri),
                attempt=cfg.attempt,
                max_steps=cfg.max_steps,
            )
            self.tb_local = self.local_root / ".tensorboard" / f"attempt-{cfg.attempt}"
            self.sink = MetricsSink(max_steps=cfg.max_steps, tensorboard_dir=self.tb_local)
        instance = nxd_env.instance_info(cfg.instance_type).name
        peak = peak_flops_per_device("neuron", "neuroncore", instance)
        self.throughput = Throughput(
            self.shape.flops_per_token(cfg.seq_len), self.plan.world_size, peak, start_step=0
        )

    def _sync_tensorboard(self) -> None:
        if self.sink is None or self.tb_local is None or not self.tb_local.is_dir():
            return
        self.sink.flush()
        try:
            storage.open_storage(tensorboard_uri(self.cfg)).upload_dir(self.tb_local)
        except Exception as exc:  # metrics must never stop training
            log.warning("TensorBoard upload failed: %s", exc)

    def _log(self, step: int, loss: Any, norm: Any) -> None:
        loss_f = float(loss) if loss is not None else float("nan")  # host sync of a log step
        norm_f = float(norm) if norm is not None else float("nan")
        lr = self.schedule(step - 1)
        m = self.throughput.measure(
            step, self.plan.tokens_per_step, loss=loss_f, lr=lr, grad_norm=norm_f
        )
        if self.sink is not None:
            self.sink.write(m)
        if self.progress is not None:
            self.progress.measured(m, self.blocks.tokens_seen(step, self.global_blocks))

    @property
    def global_blocks(self) -> int:
        """Blocks (sample positions) per optimizer step over all DP ranks."""
        return self.plan.tokens_per_step // self.plan.seq_len

    def _evaluate(self, step: int) -> None:
        """Held-out loss per source on every rank (sharded by DP rank), reported by rank 0."""
        from neuronx_distributed.parallel_layers import parallel_state

        from cpt_training.nxd.evaluate import NxdHeldOutEval

        if self.held_out is None:
            dp_rank = int(parallel_state.get_data_parallel_rank())
            self.held_out = NxdHeldOutEval(self.blocks, self.cfg.eval_blocks, self.plan, dp_rank)
        groups = parallel_state.get_data_parallel_replica_groups()
        losses = self.held_out.run(self.model, self.device, self.xm, groups)
        log.info("step %d held-out loss: %s", step, losses)
        if self.sink is not None:
            self.sink.write_eval(step, losses)
        if self.progress is not None:
            self.progress.evaluated(step, losses)

    # -- steps -----------------------------------------------------------------------------------

    def _step(self, micro_batches: list[Any]) -> tuple[Any, Any]:
        torch, xm = self.torch, self.xm
        if self.plan.pp > 1:
            batch = torch.from_numpy(stack_micro_batches(micro_batches, self.plan.seq_len))
            ids = batch.to(self.device)
            loss = self.model.run_train(input_ids=ids, labels=ids)
        else:
            from neuronx_distributed.parallel_layers import parallel_state

            total = torch.zeros((), device=self.device)
            for mb in micro_batches:
                if mb.shape[1] != self.plan.seq_len:
                    raise ConfigError(
                        f"data blocks hold {mb.shape[1]} tokens but seqLen is {self.plan.seq_len}"
                    )
                ids = torch.from_numpy(mb).to(self.device)
                loss = self.model(ids, ids) / self.plan.grad_accum
                loss.backward()
                total = total + loss.detach()
                xm.mark_step()  # one micro-step graph, reused grad_accum times
            loss = xm.all_reduce(
                xm.REDUCE_SUM,
                total / self.plan.dp,
                groups=parallel_state.get_data_parallel_replica_groups(),
            )
        self.optimizer.step()
        norm = self.optimizer.grad_norm
        self.optimizer.zero_grad()
        xm.mark_step()
        return loss, norm

    def _save(self, step: int) -> None:
        import neuronx_distributed as nxd

        from cpt_training.checkpoint import tag_for_step

        tag = tag_for_step(step)
        for d in tag_dirs(self.local_root, tag):
            d.mkdir(parents=True, exist_ok=True)
        async_save = self.cfg.checkpoint.async_save
        nxd.save_checkpoint(
            str(self.local_root),
            tag=tag,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=None,
            user_content=user_content(step, self.plan, self.layout, self.cfg.attempt),
            num_workers=8,
            use_xser=False,
            num_kept_ckpts=None,  # retention is the syncer's (local and S3)
            async_save=async_save,
            zero1_optimizer=self.plan.zero1,
        )
        ready = None
        if async_save:
            ready = _async_save_future()
            if ready is None and not hasattr(_nxd_iostate(), "_save_task"):
                nxd.finalize_checkpoint()  # NxD internals changed: wait instead
        self.syncer.submit(self.local_root / tag, step=step, ready=ready)

    # -- the run ---------------------------------------------------------------------------------

    def train(self) -> int:
        from cpt_training.checkpoint import MANIFEST_NAME, collective_for
        from cpt_training.data import TokenBlocks, log_mixture
        from cpt_training.schedule import LrSchedule

        cfg, plan = self.cfg, self.plan
        collective = collective_for()
        config, recorded = self._pretrained_record()
        self.layout = layout_from_record(LlamaShape.from_config(config), recorded)
        check_resume(recorded, plan, tag=PRETRAINED)
        ckpt = None
        if not self.precompile:
            ckpt = self._restore(collective)
            if ckpt is None:
                raise ConfigError(f"nothing committed under {cfg.checkpoint.uri} to start from")
            assert ckpt.local_path is not None
            saved = json.loads((ckpt.local_path / MANIFEST_NAME).read_text())["world"]
            check_resume(saved, plan, tag=ckpt.tag)
        self._build(config)
        start = self._load(ckpt) if ckpt is not None else 0
        self.syncer = self._syncer(collective)
        self.schedule = LrSchedule.from_config(cfg.optimizer, cfg.max_steps)
        self._reporting()
        if self.sink is not None:
            self.sink.write_start(start)
        if ckpt is not None and ckpt.tag != PRETRAINED:
            self.syncer.last_committed = ckpt
            if self.progress is not None:
                self.progress.committed(ckpt.step)
        from neuronx_distributed.parallel_layers import parallel_state

        self.blocks = blocks = TokenBlocks(cfg.data_uri, seed=cfg.seed, mixture=cfg.mixture)
        log_mixture(blocks, cfg.max_steps, self.global_blocks)
        if self.progress is not None:
            self.progress.update(  # attempt n has started
                step=start, tokens_per_source=blocks.tokens_seen(start, self.global_blocks)
            )
        data = blocks.batches(
            parallel_state.get_data_parallel_rank(),
            plan.dp,
            plan.micro_batch,
            plan.grad_accum,
            start_step=start,
            max_steps=cfg.max_steps,
        )
        step = self._loop(start, data)
        if self.precompile and cfg.eval_every_steps is not None:
            self._evaluate(step)  # trace the evaluation's graph too
            log.info("traced the held-out evaluation")
        if cfg.checkpoint.async_save and not self.precompile:
            import neuronx_distributed as nxd

            nxd.finalize_checkpoint()
        self.syncer.finalize()
        self._sync_tensorboard()
        finished = step >= cfg.max_steps
        if self.progress is not None and finished:
            self.progress.done()
        if self.sink is not None:
            self.sink.close()
        self.syncer.close()
        if self.stopped_at is not None:
            return stopped_exit(
                self.stopped_at,
                self.syncer.last_committed,
                self.syncer.failures,
                local_main=int(os.environ.get("LOCAL_RANK", "0")) == 0,
                progress=self.progress,
            )
        last = self.syncer.last_committed
        if finished and not self.precompile and (last is None or last.step < cfg.max_steps):
            raise RuntimeError(
                f"training reached step {step} but its final checkpoint was not committed: "
                f"{self.syncer.failures[-1:] or 'unknown reason'}"
            )
        return 0

    def _loop(self, start: int, data: Any) -> int:
        cfg, plan = self.cfg, self.plan
        limit = steps_this_process(cfg, self.precompile)
        log.info(
            "nxd training steps %d..%d: tp=%d pp=%d dp=%d micro=%d x %d seq=%d zero1=%s",
            start + 1,
            cfg.max_steps,
            plan.tp,
            plan.pp,
            plan.dp,
            plan.micro_batch,
            plan.grad_accum,
            plan.seq_len,
            plan.zero1,
        )
        self.model.train()
        self.stop.install()
        step, ran = start, 0
        self.throughput.reset(step)
        t0 = time.perf_counter()
        for sb in data:
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule(step)
            loss, norm = self._step(sb.micro_batches)
            step, ran = step + 1, ran + 1
            if log_due(step, start, cfg):
                self._log(step, loss, norm)
                if step == start + 1:  # the first step pays for graph compilation
                    log.info("first step took %.1fs", time.perf_counter() - t0)
                    self.throughput.reset(step)
            if eval_due(step, cfg.eval_every_steps, cfg.max_steps) and not self.precompile:
                self._evaluate(step)
            if save_due(step, cfg) and not self.precompile:
                self._save(step)
            if not self.precompile and self.stop.agreed(self.syncer.collective):
                # SIGTERM: NxD's save of this step (unless it was just saved), committed by
                # the syncer's finalize; nothing after it is lost.
                if not save_due(step, cfg):
                    self._save(step)
                self.stopped_at = step
                break
            self.syncer.poll()
            if limit is not None and ran >= limit:
                log.info("stopping after %d steps in this process (step %d)", ran, step)
                break
        return step


def _nxd_iostate() -> Any:
    from neuronx_distributed.trainer import checkpoint as nxd_ckpt

    return getattr(nxd_ckpt, "g_iostate", None)


def run(cfg: TrainStage) -> int:
    """Entry point of ``cpt-train train`` for backend nxd (under torchrun)."""
    plan = NxdPlan.make(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    try:
        defaults = nxd_env.neuron_env(cfg, world_size=plan.world_size, compile_cache_uri=None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    nxd_env.apply_defaults(defaults)  # before torch_xla reads them
    import torch.distributed as dist
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

    dist.init_process_group("xla")
    try:
        return _Trainer(cfg, plan).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
