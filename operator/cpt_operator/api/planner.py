"""The planner: from a ContinualPretrain spec to a checked, costed plan. Pure.

It answers, before any pod exists: does this layout work (world size, data parallel degree,
gradient accumulation / pipeline microbatches, heads vs tensor parallel, layers vs pipeline),
does it fit in device memory, and roughly how long and how much. Every problem is collected
(not first-only) as ``spec.<field path>: message`` with the allowed values or a fix.

The formulas are documented in docs/planner.md; the throughput model is calibrated on the
published rows and our own GPU runs in ``data/calibration.yaml`` (see ``calibration_report``).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from cpt_operator.api.mixture_plan import (
    SourcePlan,
    eval_warnings,
    mixture_warnings,
    plan_mixture,
    render_rows,
)
from cpt_operator.api.models import (
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    ContinualPretrainSpec,
    FieldErrors,
    PlanSummary,
    is_hf_uri,
    is_local_path,
)
from cpt_operator.api.podsecurity import PodSecurityNeed, required_level
from cpt_training.flops import GIB, DeviceSpec, InstanceType, ModelShape, instance_type
from cpt_training.native.options import unsupported_options
from cpt_training.nxd.layout import LlamaShape

Mode = Literal["cluster", "local"]

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
RECOMPUTE_POLICIES = ("none", "selective", "full", "selective-op", "selective-layer")
"""Activation-checkpointing policies the throughput model knows. The first three are the API's
(``spec.training.activationCheckpointing``); the last two only describe published calibration
rows: torchtitan's per-op selective AC (recomputes every second matmul of a block) and its
per-layer selective AC (recomputes every second block)."""


# ---------------------------------------------------------------------------------------------
# Data tables
# ---------------------------------------------------------------------------------------------


def _data(name: str) -> Any:
    text = resources.files("cpt_operator.api.data").joinpath(name).read_text()
    return yaml.safe_load(text)


@cache
def known_models() -> dict[str, dict[str, Any]]:
    """Shapes of base models the planner knows, keyed by lower-case HF id."""
    return {k.lower(): v for k, v in _data("models.yaml").items()}


@cache
def price_table() -> dict[str, Any]:
    data: dict[str, Any] = _data("prices.yaml")
    return data


def price_per_hour(instance: str) -> float | None:
    value = price_table()["prices"].get(instance)
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanIssue:
    """One problem (or warning) with the field it is about."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class PlanError(ValueError):
    """The spec cannot run; ``issues`` lists every reason."""

    def __init__(self, issues: list[PlanIssue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device for the most loaded pipeline stage."""

    stage: str
    params_per_device: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    reserved: float
    device_bytes: float | None

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.reserved

    @property
    def fraction(self) -> float | None:
        return None if not self.device_bytes else self.total / self.device_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "paramsPerDevice": self.params_per_device,
            "weightsGiB": _gib(self.weights),
            "gradsGiB": _gib(self.grads),
            "optimizerGiB": _gib(self.optimizer),
            "activationsGiB": _gib(self.activations),
            "reservedGiB": _gib(self.reserved),
            "totalGiB": _gib(self.total),
            "deviceGiB": None if self.device_bytes is None else _gib(self.device_bytes),
        }


@dataclass(frozen=True)
class Estimate:
    step_seconds: float
    tokens_per_sec: float
    mfu: float
    wall_hours: float
    instance_hours: float
    cost_usd: float | None
    price_per_hour: float | None
    basis: str


@dataclass
class Plan:
    mode: Mode
    errors: list[PlanIssue] = field(default_factory=list)
    warnings: list[PlanIssue] = field(default_factory=list)
    backend: Literal["nxd", "native"] | None = None
    instance: InstanceType | None = None
    nodes: int = 0
    processes_per_node: int = 0
    world_size: int = 0
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 0
    kv_size_multiplier: int = 1
    micro_batch_size: int = 1
    grad_accum_steps: int = 0
    seq_len: int = 0
    tokens_per_step: int = 0
    max_steps: int = 0
    shape: ModelShape | None = None
    memory: MemoryEstimate | None = None
    estimate: Estimate | None = None
    pod_security: PodSecurityNeed | None = None
    """The Pod Security level the run's namespace must allow (None for an invalid spec)."""
    mixture: list[SourcePlan] = field(default_factory=list)
    """Tokens and epochs per data source (cpt_operator.api.mixture_plan)."""

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def pipeline_microbatches(self) -> int | None:
        return self.grad_accum_steps if self.pipeline_parallel > 1 else None

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.max_steps

    @property
    def checkpoint_bytes(self) -> float | None:
        """bf16 weights (2 B) + fp32 master and Adam m, v (12 B) per parameter."""
        return None if self.shape is None else 14.0 * self.shape.total_params

    def raise_for_errors(self) -> None:
        if self.errors:
            raise PlanError(self.errors)

    def summary(self) -> dict[str, Any]:
        """The status.plan object (camelCase, JSON-ready). Only for a plan without errors."""
        self.raise_for_errors()
        if not (self.backend and self.instance and self.shape and self.memory):
            raise RuntimeError("a plan without errors has a layout, a shape and a memory figure")
        est = self.estimate
        device = self.instance.device_spec
        summary = PlanSummary(
            backend=self.backend,
            instance_type=self.instance.name,
            nodes=self.nodes,
            processes_per_node=self.processes_per_node,
            world_size=self.world_size,
            data_parallel=self.data_parallel,
            tensor_parallel=self.tensor_parallel,
            pipeline_parallel=self.pipeline_parallel,
            kv_size_multiplier=self.kv_size_multiplier,
            micro_batch_size=self.micro_batch_size,
            grad_accum_steps=self.grad_accum_steps,
            pipeline_microbatches=self.pipeline_microbatches,
            tokens_per_step=self.tokens_per_step,
            max_steps=self.max_steps,
            total_tokens=self.total_tokens,
            params=self.shape.total_params,
            memory_per_device_gib=_gib(self.memory.total),
            device_memory_gib=device.memory_gib,
            est_step_seconds=None if est is None else round(est.step_seconds, 2),
            est_tokens_per_sec=None if est is None else round(est.tokens_per_sec, 1),
            est_mfu_percent=None if est is None else round(100 * est.mfu, 1),
            est_wall_hours=None if est is None else round(est.wall_hours, 2),
            instance_hours=None if est is None else round(est.instance_hours, 1),
            est_cost_usd=None if est is None or est.cost_usd is None else round(est.cost_usd, 2),
            checkpoint_size_gib=_gib(self.checkpoint_bytes or 0.0),
            warnings=[str(w) for w in self.warnings],
        )
        return summary.to_wire()

    def to_dict(self) -> dict[str, Any]:
        """Everything, for ``cpt plan --json``."""
        out: dict[str, Any] = {
            "ok": self.ok,
            "mode": self.mode,
            "errors": [str(e) for e in self.errors],
            "warnings": [str(w) for w in self.warnings],
        }
        if self.ok:
            out["plan"] = self.summary()
            out["memory"] = self.memory.to_dict() if self.memory else None
            out["flopsPerToken"] = self.shape.flops_per_token(self.seq_len) if self.shape else None
            out["estimateBasis"] = self.estimate.basis if self.estimate else None
            out["pricePerHourUsd"] = self.estimate.price_per_hour if self.estimate else None
            out["priceTable"] = {k: price_table()[k] for k in ("as_of", "region", "currency")}
            out["mixture"] = [r.to_dict() for r in self.mixture]
            if self.pod_security is not None:
                out["podSecurity"] = {
                    "level": self.pod_security.level,
                    "why": [
                        {"field": d.field, "level": d.level, "why": d.why}
                        for d in self.pod_security.departures
                    ],
                }
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _gib(value: float) -> float:
    return round(value / GIB, 2)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def load_run(path: str | Path) -> dict[str, Any]:
    """Read run.yaml (one ContinualPretrain document)."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ValueError(f"{path}: expected exactly one ContinualPretrain document")
    return docs[0]


def plan_object(
    obj: Mapping[str, Any], *, mode: Mode | None = None, base_dir: Path | None = None
) -> Plan:
    """Plan a whole object (apiVersion/kind/metadata/spec), as in run.yaml."""
    issues: list[PlanIssue] = []
    if obj.get("apiVersion") != "cpt.dev/v1alpha1":
        issues.append(PlanIssue("apiVersion", "must be cpt.dev/v1alpha1"))
    if obj.get("kind") != "ContinualPretrain":
        issues.append(PlanIssue("kind", "must be ContinualPretrain"))
    issues += _check_name((obj.get("metadata") or {}).get("name"))
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return Plan(mode=mode or "cluster", errors=[*issues, PlanIssue("spec", "is required")])
    result = plan(spec, mode=mode, base_dir=base_dir)
    result.errors[:0] = issues
    return result


def plan(
    spec: ContinualPretrainSpec | Mapping[str, Any],
    *,
    mode: Mode | None = None,
    base_dir: Path | None = None,
) -> Plan:
    """Check and estimate a spec. Never raises for a bad spec: see ``Plan.errors``.

    ``mode`` defaults to ``local`` for instanceType local-cpu, else ``cluster`` (where local
    paths are errors). ``base_dir`` resolves relative local paths (config.json lookup).
    """
    if not isinstance(spec, ContinualPretrainSpec):
        try:
            spec = ContinualPretrainSpec.model_validate(spec)
        except ValidationError as exc:
            return Plan(mode=mode or "cluster", errors=validation_issues(exc))
    mode = mode or ("local" if spec.training.instance_type == "local-cpu" else "cluster")
    result = _Planner(spec, mode, base_dir or Path.cwd()).run()
    if result.ok:
        result.pod_security = required_level(spec)
    return result


def validation_issues(exc: ValidationError, prefix: str = "spec") -> list[PlanIssue]:
    """Pydantic errors as ``spec.<camelCase path>: message`` issues, one per problem."""
    issues: list[PlanIssue] = []
    for err in exc.errors():
        path = prefix
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldErrors):
            for sub, message in cause.problems:
                issues.append(PlanIssue(f"{path}.{sub}" if sub else path, message))
            continue
        message = err["msg"]
        for noise in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(noise)
        if err["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see docs/api.md)"
        elif err["type"] == "missing":
            message = "is required"
        issues.append(PlanIssue(path, message))
    return issues


def _check_name(name: Any) -> list[PlanIssue]:
    if not isinstance(name, str) or not name:
        return [PlanIssue("metadata.name", "is required")]
    issues = []
    if len(name) > MAX_NAME_LENGTH:
        issues.append(
            PlanIssue(
                "metadata.name",
                f"must be at most {MAX_NAME_LENGTH} characters: child Jobs, pods and Services "
                f"are named after it (got {len(name)})",
            )
        )
    if not re.fullmatch(NAME_PATTERN, name):
        issues.append(
            PlanIssue(
                "metadata.name",
                "must start with a letter and contain only lowercase letters, digits and '-' "
                "(it names Services)",
            )
        )
    return issues


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _divisors(n: int, limit: int | None = None) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


class _Planner:
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
        self._schedule()
        if not self.p.errors:
            self.p.mixture = plan_mixture(self.spec, self.p.total_tokens, self.base_dir)
            issues = mixture_warnings(self.p.mixture)
            for path, message in issues + eval_warnings(self.spec, self.p.max_steps):
                self.warn(path, message)
        return self.p

    # -- storage and mode ------------------------------------------------------------------

    def _storage(self) -> None:
        s = self.spec
        fields = s.storage_locations()
        for path, value in fields.items():
            self._uri_hygiene(path, value)
        if s.output.s3_uri.rstrip("/") == s.checkpoints.s3_uri.rstrip("/"):
            self.error(
                "spec.output.s3Uri",
                "must differ from spec.checkpoints.s3Uri: the exported model would be mixed "
                "with checkpoints and tokenized data",
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
        if p.backend == "native" and pp > 1:
            self.error(
                "spec.training.pipelineParallel",
                "pipeline parallelism needs backend nxd; the native backend shards with FSDP "
                "and tensor parallel only: set pipelineParallel 1",
            )
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
            f"{_gib(mem.total)} GiB per device of {_gib(mem.device_bytes or 0)} GiB "
            f"(weights {_gib(mem.weights)}, grads {_gib(mem.grads)}, optimizer "
            f"{_gib(mem.optimizer)}, activations {_gib(mem.activations)}, runtime "
            f"{_gib(mem.reserved)}; {mem.stage})"
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


_SHAPE_ATTR = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
}


# ---------------------------------------------------------------------------------------------
# Memory model (docs/planner.md, "Memory")
# ---------------------------------------------------------------------------------------------


def stage_layers(layers: int, stages: int) -> list[int]:
    """NxD's split: an even share each, the remainder one by one to the *last* stages."""
    base, extra = divmod(layers, stages)
    return [base + (1 if i >= stages - extra else 0) for i in range(stages)]


FUSED_ATTENTION = True
"""Both backends use fused (flash) attention (SDPA on CUDA/CPU, the NKI kernel on Trainium),
which never stores the s x s attention scores: the 5·a·s/h term below is then 0."""


def activation_bytes_per_layer(
    seq: int,
    micro: int,
    shape: ModelShape,
    tp: int,
    sp: bool,
    mode: str,
    fused_attention: bool = FUSED_ATTENTION,
) -> float:
    """Activation bytes one layer keeps for backward (bf16), after Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models": s·b·h·(34 + 5·a·s/h)
    without parallelism; tensor parallel divides all of it with sequence parallel, only the
    24 + 5·a·s/h part without; selective recompute (and fused attention) drops the 5·a·s/h
    attention-score part; full recompute keeps only the layer input (2·s·b·h)."""
    sbh = seq * micro * shape.hidden_size
    attention = 5 * shape.num_heads * seq / shape.hidden_size
    if mode == "full":
        return 2 * sbh / (tp if sp else 1)
    core = 34.0 if mode == "selective" or fused_attention else 34.0 + attention
    if sp:
        return sbh * core / tp
    return sbh * (10 + (core - 10) / tp)


def memory_estimate(spec: ContinualPretrainSpec, p: Plan, shape: ModelShape) -> MemoryEstimate:
    t = spec.training
    tp, pp, dp = p.tensor_parallel, p.pipeline_parallel, max(1, p.data_parallel)
    seq, micro = spec.data.block_size, t.micro_batch_size
    if p.instance is None:
        raise RuntimeError("memory_estimate needs the layout (_layout) first")
    device: DeviceSpec = p.instance.device_spec
    layers = stage_layers(shape.num_layers, pp)
    emb = shape.embedding_params
    # The LM head lives on the last stage; with tied embeddings and PP > 1 it is a copy.
    head = shape.lm_head_params or (emb if pp > 1 else 0)
    ac = t.activation_checkpointing
    per_layer = activation_bytes_per_layer(seq, micro, shape, tp, t.sequence_parallel, ac)
    recompute = (
        activation_bytes_per_layer(seq, micro, shape, tp, t.sequence_parallel, "none")
        if ac == "full"
        else 0.0
    )
    logits = 6.0 * seq * micro * shape.vocab_size / tp  # bf16 logits + fp32 loss softmax

    candidates = []
    for idx, n_layers in enumerate(layers):
        first, last = idx == 0, idx == pp - 1
        params = n_layers * shape.layer_params + (emb if first else 0)
        params += (head + shape.hidden_size) if last else 0
        params_dev = params // tp
        # 1F1B: stage i has up to pp - i microbatches in flight (never more than exist).
        stage_inflight = min(pp - idx, max(1, p.grad_accum_steps)) if pp > 1 else 1
        act = per_layer * n_layers * stage_inflight + recompute
        act += logits if last else 0.0
        weights, grads, optim = _state_bytes(spec, p.backend or "native", params_dev, dp)
        if p.backend == "native" and dp > 1:
            # FSDP all-gathers the current and the prefetched layer in bf16 and holds one
            # layer's fp32 gradient before reduce-scatter.
            weights += 2 * 2 * shape.layer_params / tp
            grads += 4 * shape.layer_params / tp
        name = "stage 0 of 1" if pp == 1 else f"pipeline stage {idx} of {pp}"
        candidates.append(
            MemoryEstimate(
                stage=name,
                params_per_device=params_dev,
                weights=weights,
                grads=grads,
                optimizer=optim,
                activations=act,
                reserved=device.reserved_gib * GIB,
                device_bytes=None if device.memory_gib is None else device.memory_gib * GIB,
            )
        )
    return max(candidates, key=lambda m: m.total)


def _state_bytes(
    spec: ContinualPretrainSpec, backend: str, params: int, dp: int
) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per device, from the seed's 18 bytes/param for mixed
    precision AdamW: weights 6 (bf16 2 + fp32 master 4), grads 4 (fp32), Adam m and v 8.
    fp32 training has no bf16 copy (16 B). ZeRO-1 (nxd) shards master weights and optimizer
    over data parallel; FSDP (native) shards everything over data parallel."""
    t = spec.training
    mixed = t.precision == "bf16"
    low, master, grads, optim = (2.0 if mixed else 0.0), 4.0, 4.0, 8.0
    if backend == "native":
        return (low + master) * params / dp, grads * params / dp, optim * params / dp
    if t.zero1:
        return low * params + master * params / dp, grads * params, optim * params / dp
    return (low + master) * params, grads * params, optim * params


# ---------------------------------------------------------------------------------------------
# Throughput model (docs/planner.md, "Throughput")
# ---------------------------------------------------------------------------------------------


def device_class(device: str) -> str:
    """Devices that share an efficiency: H200 has H100's tensor cores, A100s share one."""
    return {
        "trn1-neuroncore": "trn1",
        "trn1-chip": "trn1",
        "trn2-logical-core": "trn2",
        "trn2-physical-core": "trn2",
        "trn2-chip": "trn2",
        "h100": "h100",
        "h200": "h100",
        "a100-40": "a100",
        "a100-80": "a100",
    }.get(device, "cpu")


def pipeline_efficiency(pp: int, microbatches: int) -> float:
    """1F1B: (PP-1) of every (m + PP - 1) slots are bubble."""
    if pp <= 1:
        return 1.0
    m = max(1, microbatches)
    return m / (m + pp - 1)


def tp_slice_efficiency(hidden: int, tp: int, x0: float) -> float:
    """Per-device matmuls shrink with tensor parallel (hidden/TP columns each) and collectives
    grow; efficiency x/(x + x0) of the slice width x = hidden/TP, x0 fitted."""
    x = hidden / tp
    return x / (x + x0)


def recompute_flops_per_token(shape: ModelShape, seq_len: int, policy: str) -> float:
    """Forward FLOPs per token that activation checkpointing runs a second time (hardware FLOPs
    that MFU does not count), from the model shape, per policy:

    * ``none``: nothing.
    * ``selective`` (ours): the native trainer saves every matmul and attention output and
      recomputes only norms, RoPE, SiLU and adds (no matmul FLOPs); NxD's selective
      recomputes the attention core, which FlashAttention's backward recomputes anyway.
    * ``full``: the forward of every decoder block (the LM head is not checkpointed).
    * ``selective-op`` (torchtitan): the K, O and up projections (every second matmul).
    * ``selective-layer`` (torchtitan): the forward of every second block.
    """
    if policy in ("none", "selective"):
        return 0.0
    h, q = shape.hidden_size, shape.dim_per_head
    qd, kvd = shape.num_heads * q, shape.num_kv_heads * q
    block = 2.0 * shape.layer_params + 4.0 * shape.num_heads * q * seq_len
    if policy == "full":
        return shape.num_layers * block
    if policy == "selective-layer":
        return (shape.num_layers // 2) * block
    if policy == "selective-op":
        return shape.num_layers * 2.0 * (h * kvd + qd * h + h * shape.intermediate_size)
    raise ValueError(
        f"activation checkpointing {policy!r}; allowed: {', '.join(RECOMPUTE_POLICIES)}"
    )


def recompute_efficiency(shape: ModelShape, seq_len: int, policy: str) -> float:
    """Model FLOPs / (model FLOPs + recomputed FLOPs): the share of the device's work that MFU
    counts (0.75 for full recompute of a model without LM head; 1 without recompute)."""
    model = shape.flops_per_token(seq_len)
    return model / (model + recompute_flops_per_token(shape, seq_len, policy))


MEASURED_BY_US = "cpt"
"""``measured_by`` of calibration rows this project measured itself (bench/results/*.json)."""


@dataclass(frozen=True)
class Anchor:
    id: str
    backend: str
    instance_type: str
    shape: ModelShape
    nodes: int
    tp: int
    pp: int
    gbs: int
    micro: int
    seq: int
    tokens_per_sec_per_device: float
    ac: str
    compile: bool
    source: str
    study: str
    """Rows of one study (one publication, or our own benchmark runs) share setup beyond what
    the model sees; leave-study-out holds them out together."""
    measured_by: str = "published"
    devices: int | None = None
    """World size when the run used fewer devices than ``nodes`` full instances."""
    device_class: str | None = None
    """Overrides the device class of the instance type where the source ran other hardware."""

    @property
    def group(self) -> str:
        dev = self.device_class or device_class(instance_type(self.instance_type).device)
        return f"{self.backend}/{dev}"

    @property
    def world(self) -> int:
        return self.devices or self.nodes * instance_type(self.instance_type).processes_per_node

    @property
    def microbatches(self) -> int:
        dp = self.world // (self.tp * self.pp)
        return self.gbs // (dp * self.micro)

    @property
    def mfu(self) -> float:
        peak = instance_type(self.instance_type).device_spec.peak_flops
        if peak is None:
            raise ValueError(f"anchor {self.id}: {self.instance_type} has no peak FLOPS")
        return self.shape.flops_per_token(self.seq) * self.tokens_per_sec_per_device / peak

    def structural_factor(self, x0: float) -> float:
        return (
            tp_slice_efficiency(self.shape.hidden_size, self.tp, x0)
            * pipeline_efficiency(self.pp, self.microbatches)
            * recompute_efficiency(self.shape, self.seq, self.ac)
        )


@cache
def anchors() -> tuple[Anchor, ...]:
    out = []
    for row in _data("calibration.yaml")["anchors"]:
        cfg = row.get("shape") or known_models()[row["model"].lower()]
        inst = instance_type(row["instance_type"])
        world = row.get("devices") or row["nodes"] * inst.processes_per_node
        if "tokens_per_sec_per_device" in row:
            tps = float(row["tokens_per_sec_per_device"])
        else:
            tps = float(row["sequences_per_sec"]) * row["seq_len"] / world
        if row["activation_checkpointing"] not in RECOMPUTE_POLICIES:
            raise ValueError(
                f"anchor {row['id']}: activation_checkpointing not in {RECOMPUTE_POLICIES}"
            )
        out.append(
            Anchor(
                id=row["id"],
                backend=row["backend"],
                instance_type=row["instance_type"],
                shape=ModelShape.from_hf_config(cfg),
                nodes=row["nodes"],
                tp=row["tensor_parallel"],
                pp=row["pipeline_parallel"],
                gbs=row["global_batch_size"],
                micro=row["micro_batch_size"],
                seq=row["seq_len"],
                tokens_per_sec_per_device=tps,
                ac=row["activation_checkpointing"],
                compile=bool(row.get("compile", False)),
                source=row["source"],
                study=row["study"],
                measured_by=row.get("measured_by", "published"),
                devices=row.get("devices"),
                device_class=row.get("device_class"),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class EfficiencyModel:
    """mfu = group efficiency x tp_slice(hidden/TP) x pipeline bubble x recompute x compile."""

    group_efficiency: dict[str, float]
    x0: float
    compile_factor: float
    anchors_used: int

    def predict(
        self,
        group: str,
        shape: ModelShape,
        seq_len: int,
        tp: int,
        pp: int,
        microbatches: int,
        ac: str,
        compile: bool,
    ) -> tuple[float, str] | None:
        """Predicted MFU and its basis, or None where there is no peak (CPU)."""
        if group.endswith("/cpu"):
            return None
        eff = self.group_efficiency.get(group)
        basis = f"calibrated ({group})"
        if eff is None:
            # No anchor: borrow the Trainium NxD efficiency, say so.
            eff = self.group_efficiency.get("nxd/trn1", 0.25)
            basis = f"uncalibrated ({group} has no anchor; nxd/trn1 used)"
        mfu = (
            eff
            * tp_slice_efficiency(shape.hidden_size, tp, self.x0)
            * pipeline_efficiency(pp, microbatches)
            * recompute_efficiency(shape, seq_len, ac)
            * (self.compile_factor if compile and group.startswith("native/") else 1.0)
        )
        return mfu, basis


_X0_GRID = tuple(10.0 * step for step in range(401))


def fit_efficiency(rows: tuple[Anchor, ...] | list[Anchor]) -> EfficiencyModel:
    """Least squares in log space: grid over x0; per x0 the compile factor and the per-group
    efficiencies are closed-form means of the log residuals."""
    if not rows:
        raise ValueError("no calibration rows")
    # Everything but the TP slice term is independent of x0: compute it once per row.
    prepared = [
        (
            a.group,
            a.compile,
            a.shape.hidden_size / a.tp,
            math.log(a.mfu)
            - math.log(pipeline_efficiency(a.pp, a.microbatches))
            - math.log(recompute_efficiency(a.shape, a.seq, a.ac)),
        )
        for a in rows
    ]
    groups = sorted({g for g, _, _, _ in prepared})
    best: tuple[float, EfficiencyModel] | None = None
    for x0 in _X0_GRID:
        resid = [(g, c, fixed - math.log(x / (x + x0))) for g, c, x, fixed in prepared]
        # Compile factor: mean log gap between compile and eager rows of the same group.
        gaps = []
        for group in groups:
            eager = [r for g, c, r in resid if g == group and not c]
            comp = [r for g, c, r in resid if g == group and c]
            if eager and comp:
                gaps.append(sum(comp) / len(comp) - sum(eager) / len(eager))
        log_cf = sum(gaps) / len(gaps) if gaps else 0.0
        by_group: dict[str, list[float]] = {}
        for g, c, r in resid:
            by_group.setdefault(g, []).append(r - (log_cf if c else 0.0))
        log_eff = {g: sum(v) / len(v) for g, v in by_group.items()}
        err = sum((r - (log_cf if c else 0.0) - log_eff[g]) ** 2 for g, c, r in resid)
        if best is None or err < best[0] - 1e-12:
            eff = {g: math.exp(v) for g, v in log_eff.items()}
            best = (err, EfficiencyModel(eff, x0, math.exp(log_cf), len(rows)))
    assert best is not None
    return best[1]


@cache
def efficiency_model() -> EfficiencyModel:
    return fit_efficiency(anchors())


def warm() -> None:
    """Load the data tables and fit the efficiency model now (about 30 ms): the operator calls
    this at startup, so the first run it plans does not pay for it in the middle of a burst of
    new runs, with the event loop blocked (docs/PERFORMANCE.md 5)."""
    known_models()
    price_table()
    efficiency_model()


def _predict_anchor(model: EfficiencyModel, a: Anchor) -> float | None:
    if a.group not in model.group_efficiency:
        return None
    result = model.predict(a.group, a.shape, a.seq, a.tp, a.pp, a.microbatches, a.ac, a.compile)
    return None if result is None else result[0]


def calibration_report() -> list[dict[str, Any]]:
    """Per anchor: measured MFU, in-sample prediction, the leave-one-out prediction (the model
    refitted without that row) and the leave-study-out one (refitted without every row of its
    study). Held-out predictions are None when no other row of the group remains."""
    return [dict(r) for r in _calibration_report()]


@cache
def _calibration_report() -> tuple[dict[str, Any], ...]:
    rows = anchors()
    full = efficiency_model()
    report = []
    for a in rows:
        loo = _predict_anchor(fit_efficiency([b for b in rows if b.id != a.id]), a)
        lso = None
        rest = [b for b in rows if b.study != a.study]
        if any(b.group == a.group for b in rest):
            lso = _predict_anchor(fit_efficiency(rest), a)
        report.append(
            {
                "id": a.id,
                "group": a.group,
                "study": a.study,
                "measured_by": a.measured_by,
                "measured_mfu": a.mfu,
                "fitted_mfu": _predict_anchor(full, a),
                "loo_mfu": loo,
                "loo_error": None if loo is None else loo / a.mfu - 1.0,
                "lso_mfu": lso,
                "lso_error": None if lso is None else lso / a.mfu - 1.0,
            }
        )
    return tuple(report)


def throughput_estimate(spec: ContinualPretrainSpec, p: Plan, shape: ModelShape) -> Estimate | None:
    if p.instance is None or p.backend is None:
        raise RuntimeError("throughput_estimate needs the layout (_layout) first")
    group = f"{p.backend}/{device_class(p.instance.device)}"
    t = spec.training
    result = efficiency_model().predict(
        group,
        shape,
        p.seq_len,
        p.tensor_parallel,
        p.pipeline_parallel,
        p.grad_accum_steps,
        t.activation_checkpointing,
        t.compile,
    )
    peak = p.instance.device_spec.peak_flops
    if result is None or peak is None:
        return None
    mfu, basis = result
    flops_per_step = shape.flops_per_token(p.seq_len) * p.tokens_per_step
    step_seconds = flops_per_step / (p.world_size * peak * mfu)
    wall_hours = step_seconds * p.max_steps / 3600
    instance_hours = wall_hours * p.nodes
    price = price_per_hour(p.instance.name)
    return Estimate(
        step_seconds=step_seconds,
        tokens_per_sec=p.tokens_per_step / step_seconds,
        mfu=mfu,
        wall_hours=wall_hours,
        instance_hours=instance_hours,
        cost_usd=None if price is None else instance_hours * price,
        price_per_hour=price,
        basis=basis,
    )


# ---------------------------------------------------------------------------------------------
# Human-readable output
# ---------------------------------------------------------------------------------------------


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def render_text(p: Plan, title: str = "") -> str:
    """The table ``cpt plan`` prints."""
    lines: list[str] = []
    if title:
        lines.append(title)
    if not p.ok:
        lines.append("INVALID spec:")
        lines += [f"  ✗ {e}" for e in p.errors]
        lines += [f"  ! {w}" for w in p.warnings]
        return "\n".join(lines) + "\n"
    if not (p.instance and p.shape and p.memory):
        raise RuntimeError("a plan without errors has a layout, a shape and a memory figure")
    rows: list[tuple[str, str]] = [
        ("backend", f"{p.backend} on {p.instance.name} ({p.mode})"),
        (
            "world",
            f"{p.nodes} nodes x {p.processes_per_node} processes = {p.world_size} "
            f"({p.instance.device_spec.name})",
        ),
        (
            "parallelism",
            f"TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {p.data_parallel}"
            + (f" (kv_size_multiplier {p.kv_size_multiplier})" if p.kv_size_multiplier > 1 else ""),
        ),
        (
            "batch",
            f"global {p.tokens_per_step // p.seq_len} = micro {p.micro_batch_size} x DP "
            f"{p.data_parallel} x {p.grad_accum_steps} "
            + ("pipeline microbatches" if p.pipeline_parallel > 1 else "grad-accum steps"),
        ),
        ("tokens/step", f"{_fmt_int(p.tokens_per_step)} (seq {p.seq_len})"),
        ("steps", f"{_fmt_int(p.max_steps)} = {p.total_tokens / 1e9:.3g} B tokens"),
        *render_rows(p.mixture),
        (
            "model",
            f"{p.shape.total_params / 1e9:.2f} B params, "
            f"{p.shape.flops_per_token(p.seq_len) / 1e9:.1f} GFLOP/token",
        ),
    ]
    m = p.memory
    dev = m.device_bytes
    mem = f"{_gib(m.total)} GiB"
    if dev:
        mem += f" of {_gib(dev)} GiB ({100 * m.total / dev:.0f}%)"
    rows.append(("memory/device", f"{mem}, {m.stage}"))
    rows.append(
        (
            "  breakdown",
            f"weights {_gib(m.weights)} + grads {_gib(m.grads)} + optimizer "
            f"{_gib(m.optimizer)} + activations {_gib(m.activations)} + runtime "
            f"{_gib(m.reserved)} GiB",
        )
    )
    est = p.estimate
    if est is None:
        rows.append(("estimate", "none (no peak FLOPS for this device)"))
    else:
        rows += [
            ("step time", f"~{est.step_seconds:.1f} s ({est.tokens_per_sec:,.0f} tokens/s)"),
            ("MFU", f"~{100 * est.mfu:.1f}% [{est.basis}]"),
            ("wall time", f"~{est.wall_hours:.1f} h ({est.instance_hours:,.0f} instance-hours)"),
            (
                "cost",
                "n/a (no list price)"
                if est.cost_usd is None
                else f"~${est.cost_usd:,.0f} at ${est.price_per_hour}/h "
                f"({price_table()['region']} on-demand list, {price_table()['as_of']})",
            ),
        ]
    rows.append(("checkpoint", f"~{_gib(p.checkpoint_bytes or 0):,.0f} GiB per save"))
    if p.pod_security is not None:
        rows.append(("pod security", f"namespace must allow {p.pod_security.summary()}"))
    width = max(len(k) for k, _ in rows)
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"! {w}" for w in p.warnings]
    return "\n".join(lines) + "\n"


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def calibration_markdown() -> str:
    """The calibration table in docs/planner.md (a unit test keeps the two in step)."""
    model = efficiency_model()
    report = calibration_report()
    lines = [
        "| anchor | group | measured by | measured MFU | fitted | leave-one-out | LOO error "
        "| leave-study-out error |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report:
        lines.append(
            f"| {r['id']} | {r['group']} | {r['measured_by']} | {_pct(r['measured_mfu'])} | "
            f"{_pct(r['fitted_mfu'])} | {_pct(r['loo_mfu'])} | {_pct(r['loo_error'], True)} | "
            f"{_pct(r['lso_error'], True)} |"
        )
    effs = ", ".join(f"{g} {100 * e:.1f}%" for g, e in sorted(model.group_efficiency.items()))
    lines += [
        "",
        f"Fitted on {model.anchors_used} rows: group efficiencies {effs}; x0 = {model.x0:g}; "
        f"compile factor {model.compile_factor:.2f}.",
        "",
        "| group | rows | mean \\|LOO error\\| | max \\|LOO error\\| | max \\|leave-study-out\\| |",
        "|---|---:|---:|---:|---:|",
    ]
    for group in sorted({r["group"] for r in report}):
        rows = [r for r in report if r["group"] == group]
        loo = [abs(r["loo_error"]) for r in rows if r["loo_error"] is not None]
        lso = [abs(r["lso_error"]) for r in rows if r["lso_error"] is not None]
        mean = _pct(sum(loo) / len(loo)) if loo else "not measurable (one row)"
        lines.append(
            f"| {group} | {len(rows)} | {mean} | {_pct(max(loo) if loo else None)} | "
            f"{_pct(max(lso) if lso else None)} |"
        )
    return "\n".join(lines) + "\n"
