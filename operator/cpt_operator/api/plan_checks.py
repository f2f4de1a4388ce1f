"""The planner's checks: every rule a spec must meet (storage, images, layout, model vs
layout, memory, schedule), collected as errors and warnings on a Plan. Split from planner.py,
which runs them (``plan``) and re-exports the public names here.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any

from cpt_operator.api.mixture_plan import eval_warnings, mixture_warnings, plan_mixture
from cpt_operator.api.models import ContinualPretrainSpec, is_hf_uri, is_local_path
from cpt_operator.api.plan_memory import memory_estimate
from cpt_operator.api.plan_throughput import throughput_estimate
from cpt_operator.api.plan_types import (
    MemoryEstimate,
    Mode,
    Plan,
    PlanIssue,
    known_models,
    to_gib,
)
from cpt_training.flops import InstanceType, ModelShape, instance_type
from cpt_training.native.options import unsupported_options
from cpt_training.nxd.layout import LlamaShape

MEMORY_WARN_FRACTION = 0.90
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_IMAGE_DOMAIN = rf"(?:{_IMAGE_LABEL}(?:\.{_IMAGE_LABEL})*(?::[0-9]+)?/)?"
IMAGE_REFERENCE = re.compile(
    _IMAGE_DOMAIN
    + _IMAGE_COMPONENT
    + rf"(?:/{_IMAGE_COMPONENT})*"
    + r"(?::[\w][\w.-]{0,127})?"
    + r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
"""A container image reference (the distribution reference grammar, simplified)."""


RESERVED_MOUNT_PATHS = ("/dev", "/proc", "/sys", "/etc", "/tmp", "/usr", "/bin", "/sbin", "/lib")
"""Container paths scratch may not be mounted over or under: the system's, and the pods' own
volumes (/dev/shm, /tmp)."""
HOST_SYSTEM_PATHS = (
    "/dev",
    "/proc",
    "/sys",
    "/etc",
    "/boot",
    "/root",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/run",
    "/var/run",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/docker",
    "/var/log",
)
"""Node directories a hostPath scratch may not be or lie in (nor `/` itself)."""
MAX_STEPS = 1 << 40
"""spec.training.maxSteps' bound; maxTokens may not imply more."""


def prefixes_overlap(a: str, b: str) -> bool:
    """Same prefix, or one inside the other (as directories: s3://b/x/ and s3://b/xy/ do not)."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def path_problems(path: str, forbidden: tuple[str, ...], what: str) -> list[str]:
    """Why an absolute path is refused: not normalised, `/`, or at/inside a forbidden one."""
    segments = path.split("/")[1:]
    if any(seg in (".", "..") for seg in segments):
        return ["'.' and '..' segments are not allowed (write the path they lead to)"]
    if any(seg == "" for seg in segments[:-1]):
        return ["empty segments ('//') are not allowed"]
    clean = "/" + "/".join(s for s in segments if s)
    if clean == "/":
        return ["must not be / (the whole filesystem)"]
    inside = [f for f in forbidden if clean == f or clean.startswith(f + "/")]
    if inside:
        return [f"lies in {inside[0]}, {what}"]
    return []


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


class Planner:
    """Runs every check on one spec and fills in the Plan (layout, shape, memory, estimate)."""

    def __init__(self, spec: ContinualPretrainSpec, mode: Mode, base_dir: Path) -> None:
        self.spec = spec
        self.t = spec.training
        self.p = Plan(mode=mode)
        self.base_dir = base_dir

    def error(self, path: str, message: str) -> None:
        self.p.errors.append(PlanIssue(path, message))

    def warn(self, path: str, message: str) -> None:
        self.p.warnings.append(PlanIssue(path, message))

    def run(self) -> Plan:
        self._storage()
        self._paths()
        self._images()
        self._layout()
        shape = self._shape()
        if shape is not None:
            self.p.shape = shape
            self._model_vs_layout(shape)
            if not self.p.errors:
                self.p.memory = memory_estimate(self.spec, self.p, shape)
                self._memory_check(self.p.memory)
                self.p.estimate = throughput_estimate(self.spec, self.p, shape)
                self._deadline()
        self._schedule()
        if not self.p.errors:
            self.p.mixture = plan_mixture(self.spec, self.p.total_tokens, self.base_dir)
            issues = mixture_warnings(self.p.mixture)
            for path, message in issues + eval_warnings(self.spec, self.p.max_steps):
                self.warn(path, message)
        return self.p

    def _deadline(self) -> None:
        """The estimated training time alone already past activeDeadlineSeconds."""
        limit = self.spec.resiliency.active_deadline_seconds
        est = self.p.estimate
        if limit and est is not None and est.wall_hours * 3600 > limit:
            self.warn(
                "spec.resiliency.activeDeadlineSeconds",
                f"{limit}s is less than the estimated training time ({est.wall_hours:.1f} h): "
                "the run would stop at the deadline, failed DeadlineExceeded, before maxSteps",
            )

    # -- storage and mode ------------------------------------------------------------------

    def _storage(self) -> None:
        s = self.spec
        fields = s.storage_locations()
        for path, value in fields.items():
            self._uri_hygiene(path, value)
        for other, uri in (
            ("spec.checkpoints.s3Uri", s.checkpoints.s3_uri),
            ("spec.data.tokenizedUri", s.data.tokenized_uri),
        ):
            if uri is not None and prefixes_overlap(s.output.s3_uri, uri):
                self.error(
                    "spec.output.s3Uri",
                    f"must differ from {other} and lie neither inside nor around it: the "
                    "exported model would be mixed with checkpoints and tokenized data (and "
                    "checkpoint pruning runs there)",
                )
        if self.p.mode == "cluster":
            for path, value in fields.items():
                if is_local_path(value):
                    self.error(
                        path,
                        f"{value!r} is a local path, which works only with `cpt local`; "
                        "in a cluster use s3://bucket/prefix/"
                        + (" or hf://org/name" if path.startswith("spec.model") else ""),
                    )
            if s.training.instance_type == "local-cpu" and s.training.nodes > 1:
                self.warn("spec.training.instanceType", "local-cpu across nodes uses gloo/TCP")
        source = s.model.source
        if (
            self.p.mode == "cluster"
            and is_hf_uri(source)
            and source.lower().startswith("hf://meta-llama/")
            and s.runtime.hf_token_secret_ref is None
        ):
            self.warn(
                "spec.runtime.hfTokenSecretRef",
                "meta-llama models are gated on the Hugging Face Hub: set a Secret with HF_TOKEN",
            )

    def _images(self) -> None:
        """Image fields are free strings in the schema, and the API server accepts nearly any
        image text in a Job: a malformed reference would only show up as pods stuck in
        InvalidImageName, so it is refused here."""
        images = self.spec.runtime.images
        for key in (
            "trainer_neuron",
            "trainer_torchneuron",
            "trainer_cuda",
            "trainer_cpu",
            "tools",
        ):
            value = getattr(images, key)
            if not IMAGE_REFERENCE.fullmatch(value):
                camel = re.sub(r"_(\w)", lambda m: m.group(1).upper(), key)
                self.error(
                    f"spec.runtime.images.{camel}",
                    f"{value!r} is not a container image reference "
                    "(registry/repository[:tag][@sha256:digest], no spaces)",
                )

    def _uri_hygiene(self, path: str, value: str) -> None:
        """Hostile-looking URIs the schema lets through: invisible or control characters
        (a U+202E override makes `kubectl get` show another path than the one used) and
        `.`/`..` key segments (S3 keys are literal, and the workload's storage layer refuses
        `..`, so the run would only fail later, in a pod)."""
        odd = sorted({ch for ch in value if unicodedata.category(ch) in ("Cc", "Cf")})
        if odd:
            codes = ", ".join(f"U+{ord(ch):04X}" for ch in odd)
            self.error(path, f"contains control or invisible formatting characters ({codes})")
        if value.startswith("s3://"):
            segments = value[len("s3://") :].split("/")[1:]
            if any(seg in (".", "..") for seg in segments):
                self.error(path, f"{value!r}: '.' and '..' segments are not allowed in s3:// URIs")

    def _paths(self) -> None:
        """Container and node paths: normalised (no `.`/`..` segments, no `//`), never over
        a path the pods need (/dev/shm, /tmp) or the system's, and a hostPath never the
        node's root or a system directory (it would expose the node to the pod)."""
        scratch = self.spec.checkpoints.scratch
        field = "spec.checkpoints.scratch"
        for problem in path_problems(
            scratch.mount_path, RESERVED_MOUNT_PATHS, "a system path or one the pods mount"
        ):
            self.error(f"{field}.mountPath", f"{scratch.mount_path!r}: {problem}")
        if scratch.path is not None:
            for problem in path_problems(scratch.path, HOST_SYSTEM_PATHS, "a system directory"):
                self.error(f"{field}.path", f"{scratch.path!r}: {problem}")
        t = self.t
        if t.max_tokens is not None and self.spec.max_steps() > MAX_STEPS:
            self.error(
                "spec.training.maxTokens",
                f"{t.max_tokens} tokens are {self.spec.max_steps()} steps of "
                f"{t.global_batch_size} x {self.spec.data.block_size} tokens, more than "
                f"maxSteps allows ({MAX_STEPS})",
            )

    # -- world, data parallel, batch --------------------------------------------------------

    def _layout(self) -> None:
        t, p = self.t, self.p
        inst = instance_type(t.instance_type)
        p.backend = t.resolved_backend()
        p.nodes = t.nodes
        p.processes_per_node = ppn = t.resolved_processes_per_node()
        # On trn2 the process count picks the LNC, and with it the per-process device.
        p.instance = inst = inst.for_processes(ppn)
        p.world_size = world = t.nodes * ppn
        p.tensor_parallel, p.pipeline_parallel = tp, pp = t.tensor_parallel, t.pipeline_parallel
        p.micro_batch_size = t.micro_batch_size
        p.seq_len = self.spec.data.block_size
        p.max_steps = self.spec.max_steps()
        p.tokens_per_step = t.global_batch_size * p.seq_len
        self._devices(inst, ppn)
        self._batch(world, ppn, tp, pp)

    def _devices(self, inst: InstanceType, ppn: int) -> None:
        """Processes per node against the instance's devices, and backend vs instance."""
        t, p = self.t, self.p
        if inst.accelerator != "cpu" and ppn > inst.processes_per_node:
            choices = ", ".join(
                f"{inst.physical_cores // lnc} (LNC={lnc})" for lnc, _ in inst.lnc_devices
            )
            self.error(
                "spec.training.processesPerNode",
                f"{t.instance_type} runs one process per logical NeuronCore: {choices} (got {ppn})"
                if choices
                else f"{t.instance_type} has {inst.processes_per_node} devices: at most "
                f"{inst.processes_per_node} processes per node (got {ppn})",
            )
        elif inst.accelerator != "cpu" and ppn < inst.processes_per_node:
            self.warn(
                "spec.training.processesPerNode",
                f"{ppn} of {inst.processes_per_node} devices per node are used",
            )
        if p.backend == "native" and t.instance_type.startswith("trn1"):
            self.error(
                "spec.training.backend",
                "native does not run on trn1 (TorchNeuron needs trn2/trn3); use nxd or auto",
            )
        if p.backend == "native" and p.pipeline_parallel > 1:
            self.error(
                "spec.training.pipelineParallel",
                "pipeline parallelism needs backend nxd; the native backend shards with FSDP "
                "and tensor parallel only: set pipelineParallel 1",
            )

    def _batch(self, world: int, ppn: int, tp: int, pp: int) -> None:
        """Tensor parallel vs node, then data parallel, gradient accumulation and the bubble."""
        t, p = self.t, self.p
        if ppn % tp:
            self.error(
                "spec.training.tensorParallel",
                f"tensorParallel ({tp}) must divide processesPerNode ({ppn}) so tensor-parallel "
                f"groups stay inside a node; allowed: {_divisors(ppn)}",
            )
        if world % (tp * pp):
            return  # reported by the spec validation already
        p.data_parallel = dp = world // (tp * pp)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            self.error(
                "spec.training.globalBatchSize",
                f"globalBatchSize ({t.global_batch_size}) must be a multiple of microBatchSize "
                f"x dataParallel ({t.micro_batch_size} x {dp} = {per_step}); "
                f"e.g. {per_step * max(1, round(t.global_batch_size / per_step))}",
            )
            return
        p.grad_accum_steps = m = t.global_batch_size // per_step
        if pp > 1 and m < pp:
            self.error(
                "spec.training.globalBatchSize",
                f"gives {m} pipeline microbatches per replica (globalBatchSize / (microBatchSize "
                f"x dataParallel) = {t.global_batch_size} / {per_step}); pipelineParallel {pp} "
                f"needs at least {pp}: raise globalBatchSize to {pp * per_step} or more",
            )
        elif pp > 1 and m < 4 * pp:
            bubble = (pp - 1) / (m + pp - 1)
            self.warn(
                "spec.training.globalBatchSize",
                f"{m} microbatches for {pp} pipeline stages idles {100 * bubble:.0f}% of each "
                f"step in the pipeline bubble; {4 * pp}+ keeps it under 20%",
            )

    # -- model shape -------------------------------------------------------------------------

    def _shape(self) -> ModelShape | None:
        cfg, origin = self._base_config()
        merged = {**(cfg or {}), **self.spec.model.config_overrides}
        try:
            shape = ModelShape.from_hf_config(merged)
        except ValueError as exc:
            self.error(
                "spec.model.configOverrides",
                f"the planner does not know the shape of {self.spec.model.source!r} ({origin}; "
                f"{exc}): set model.configOverrides with vocab_size, hidden_size, "
                "intermediate_size, num_hidden_layers, num_attention_heads, "
                "num_key_value_heads and tie_word_embeddings from its config.json",
            )
            return None
        except TypeError as exc:
            self.error("spec.model.configOverrides", f"shape keys must be numbers: {exc}")
            return None
        bad = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
            if getattr(shape, _SHAPE_ATTR[k]) < 1
        ]
        if bad or shape.num_heads < 1 or shape.num_kv_heads < 1:
            self.error("spec.model.configOverrides", "shape values must be positive integers")
            return None
        if shape.num_heads % shape.num_kv_heads:
            self.error(
                "spec.model.configOverrides",
                f"num_attention_heads ({shape.num_heads}) must be a multiple of "
                f"num_key_value_heads ({shape.num_kv_heads})",
            )
            return None
        max_pos = merged.get("max_position_embeddings")
        if isinstance(max_pos, int) and self.spec.data.block_size > max_pos:
            self.warn(
                "spec.data.blockSize",
                f"{self.spec.data.block_size} exceeds the model's max_position_embeddings "
                f"({max_pos}); extend RoPE via configOverrides (rope_scaling) or lower it",
            )
        if self.p.backend == "native":
            # Options the native Llama would not train as transformers runs them: refused
            # here, before any child exists (the trainer checks again for unread configs).
            for key, why in unsupported_options(merged):
                self.error("spec.model.configOverrides", f"{key}: {why}")
        elif self.p.backend == "nxd":
            try:  # the options the nxd model implements (rope types, no biases, head_dim)
                LlamaShape.from_config(merged)
            except ValueError as exc:
                self.error("spec.model.configOverrides", str(exc))
        return shape

    def _base_config(self) -> tuple[dict[str, Any] | None, str]:
        source = self.spec.model.source
        if is_hf_uri(source):
            repo = source.removeprefix("hf://").split("@", 1)[0].lower()
            known = known_models().get(repo)
            return (dict(known), "known model") if known else (None, "not in the known-model table")
        if is_local_path(source):
            path = Path(source.removeprefix("file://"))
            if not path.is_absolute():
                path = self.base_dir / path
            config = path / "config.json"
            if config.is_file():
                data = json.loads(config.read_text())
                return (data if isinstance(data, dict) else None), f"read {config}"
            return None, f"{config} does not exist yet"
        return None, "S3 sources are not read at planning time"

    def _model_vs_layout(self, shape: ModelShape) -> None:
        tp, pp, backend = self.p.tensor_parallel, self.p.pipeline_parallel, self.p.backend
        ppn = self.p.processes_per_node
        field = "spec.training.tensorParallel"
        if shape.num_heads % tp:
            ok = [d for d in _divisors(shape.num_heads) if ppn % d == 0]
            self.error(
                field,
                f"num_attention_heads ({shape.num_heads}) must be divisible by tensorParallel "
                f"({tp}); allowed: {ok}",
            )
        kv = shape.num_kv_heads
        if tp > kv:
            if backend == "nxd" and tp % kv == 0:
                # NxD's GQA QKV layer replicates each KV head kv_size_multiplier times.
                self.p.kv_size_multiplier = tp // kv
            elif backend == "nxd":
                self.error(
                    field,
                    f"tensorParallel ({tp}) > num_key_value_heads ({kv}) needs whole KV-head "
                    f"replication (tensorParallel / num_key_value_heads = kv_size_multiplier); "
                    f"allowed: {[d for d in _divisors(ppn) if d % kv == 0 or kv % d == 0]}",
                )
            else:
                self.error(
                    field,
                    f"the native backend shards KV heads: num_key_value_heads ({kv}) must be "
                    f"divisible by tensorParallel ({tp}); allowed: {_divisors(kv)}",
                )
        elif kv % tp:
            self.error(
                field,
                f"num_key_value_heads ({kv}) must be divisible by tensorParallel ({tp}); "
                f"allowed: {[d for d in _divisors(kv) if ppn % d == 0]}",
            )
        for name, value in (
            ("hidden_size", shape.hidden_size),
            ("intermediate_size", shape.intermediate_size),
            ("vocab_size", shape.vocab_size),
        ):
            if value % tp:
                self.error(field, f"{name} ({value}) must be divisible by tensorParallel ({tp})")
        layers = shape.num_layers
        if pp > layers:
            self.error(
                "spec.training.pipelineParallel",
                f"pipelineParallel ({pp}) exceeds num_hidden_layers ({layers})",
            )
        elif layers % pp:
            self.warn(
                "spec.training.pipelineParallel",
                f"{layers} layers over {pp} stages: NxD gives {layers // pp} layers per stage and "
                f"one more to the last {layers % pp} stages; memory uses the largest stage",
            )

    # -- memory and schedule ----------------------------------------------------------------

    def _memory_check(self, mem: MemoryEstimate) -> None:
        frac = mem.fraction
        if frac is None:
            return
        detail = (
            f"{to_gib(mem.total)} GiB per device of {to_gib(mem.device_bytes or 0)} GiB "
            f"(weights {to_gib(mem.weights)}, grads {to_gib(mem.grads)}, optimizer "
            f"{to_gib(mem.optimizer)}, activations {to_gib(mem.activations)}, runtime "
            f"{to_gib(mem.reserved)}; {mem.stage})"
        )
        t = self.t
        fixes = ["raise tensorParallel"]
        if self.p.backend == "nxd":
            fixes[0] += " or pipelineParallel"
            if not t.zero1:
                fixes.append("enable zero1")
        if t.activation_checkpointing != "full":
            fixes.append("use activationCheckpointing full")
        if t.micro_batch_size > 1:
            fixes.append("lower microBatchSize")
        fixes.append("use more nodes" if self.p.backend == "native" else "lower blockSize")
        fix = ", ".join(fixes[:-1]) + " or " + fixes[-1]
        if frac > 1.0:
            self.error("spec.training", f"does not fit: {detail}; {fix}")
        elif frac > MEMORY_WARN_FRACTION:
            self.warn("spec.training", f"{100 * frac:.0f}% of device memory: {detail}")

    def _schedule(self) -> None:
        opt, steps = self.t.optimizer, self.p.max_steps
        if steps and opt.warmup_steps > steps:
            self.warn(
                "spec.training.optimizer.warmupSteps",
                f"warmupSteps ({opt.warmup_steps}) exceeds the run's {steps} steps: the "
                f"learning rate ends at {opt.lr * steps / opt.warmup_steps:.3g}, never reaching "
                f"lr ({opt.lr:g}), and never decays to minLr",
            )
        if steps and self.spec.checkpoints.every_steps > steps:
            self.warn(
                "spec.checkpoints.everySteps",
                f"{self.spec.checkpoints.every_steps} > {steps} steps: only the final "
                "checkpoint is written, so a failure restarts from the beginning",
            )
        if self.p.backend == "nxd" and self.t.compile:
            self.warn("spec.training.compile", "ignored by nxd (XLA compiles the graph)")
        if self.t.precision == "fp32" and self.p.instance and self.p.instance.accelerator != "cpu":
            self.warn("spec.training.precision", "fp32: estimates assume bf16 peak FLOPS")
        self._float8()

    def _float8(self) -> None:
        """Float8 runs on the native backend's Hopper-class GPUs only, in bf16."""
        if not self.t.float8:
            return
        inst = self.p.instance
        if self.p.backend != "native" or inst is None or inst.device not in FLOAT8_DEVICES:
            where = inst.name if inst is not None else self.t.instance_type
            self.error(
                "spec.training.float8",
                f"float8 training needs the native backend on {'/'.join(FLOAT8_DEVICES)} GPUs "
                f"(this run: backend {self.p.backend}, {where}); set float8: false",
            )
        elif self.t.precision != "bf16":
            self.error(
                "spec.training.float8",
                "float8 trains the block matmuls in float8 around bf16 compute: set "
                "precision: bf16 or float8: false",
            )


FLOAT8_DEVICES = ("h100", "h200")
"""Devices whose tensor cores run the float8 matmuls (compute capability >= 8.9)."""

_SHAPE_ATTR = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
}
