"""The CRD's CEL rules (``x-kubernetes-validations``): what JSON schema cannot say.

They mirror the Python validators in ``models.py`` with the same message text. Split from
crd.py, which attaches them to the generated schema and re-exports ``Rule`` and ``CEL_RULES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpt_operator.api.models import (
    DOT_SEGMENT_PATTERN,
    HF_TOKEN_ENV,
    MAX_NAME_LENGTH,
    MSG_CREDENTIAL_ENV,
    MSG_DOT_SEGMENTS,
    MSG_DUPLICATE_ENV,
    MSG_GBS_MULTIPLE,
    MSG_MP_DIVIDES_WORLD,
    MSG_RESERVED_ENV,
    NAME_PATTERN,
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    S3_CREDENTIAL_ENV,
    SECRET_ENV_PATTERN,
)
from cpt_training.config import HF_URI_PATTERN, S3_URI_PATTERN
from cpt_training.flops import INSTANCE_TYPES


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry, attached at a schema path."""

    path: str
    """Dotted path under the root schema; ``[]`` means "each item" (``spec.training.env[]``)."""
    rule: str
    message: str
    message_expression: str | None = None
    field_path: str | None = None

    def to_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def _cel_str(value: str) -> str:
    """A CEL single-quoted string literal (raw, so regex backslashes survive)."""
    if "'" in value:
        raise ValueError(f"cannot quote {value!r} for CEL")
    return f"r'{value}'"


S3 = _cel_str(S3_URI_PATTERN)
HF = _cel_str(HF_URI_PATTERN)
S3_MESSAGE = "must be an s3://bucket/prefix/ URI (local paths work only with `cpt local`)"
MODEL_MESSAGE = (
    "must be hf://org/name[@revision] or s3://bucket/prefix/ "
    "(local paths work only with `cpt local`)"
)
PROCESSES_BY_INSTANCE = (
    "{" + ", ".join(f"'{n}': {i.processes_per_node}" for n, i in INSTANCE_TYPES.items()) + "}"
)
PPN = (
    f"(has(self.processesPerNode) ? self.processesPerNode : {PROCESSES_BY_INSTANCE}"
    "[self.instanceType])"
)
RESERVED_NAMES = "[" + ", ".join(f"'{n}'" for n in RESERVED_ENV_NAMES) + "]"
IMMUTABLE = (
    "spec.{0} is immutable once the run exists: to change it, create a new ContinualPretrain "
    "(to continue from this run, point its model.source at this run's output.s3Uri)"
)


def _immutable(name: str) -> Rule:
    return Rule(f"spec.{name}", "self == oldSelf", IMMUTABLE.format(name))


def _s3(path: str, label: str) -> Rule:
    return Rule(path, f"self.matches({S3})", f"{label} {S3_MESSAGE}")


def _quantity(path: str) -> Rule:
    """The API server's own quantity parser (CEL's Kubernetes quantity library), bounded like
    api/wire.py: not negative, within an int64, and with a digit in its number (the parser
    takes a bare "." for zero, which no one means)."""
    return Rule(
        path,
        r"self.matches('^[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)') && "
        "isQuantity(self) && !quantity(self).isLessThan(quantity('0')) && "
        "quantity(self).isLessThan(quantity('9223372036854775807'))",
        f"{path.removeprefix('spec.')} must be a Kubernetes quantity (e.g. 500m, 2, 64Gi), "
        "not negative, at most 2^63-1",
    )


def _dot_segments(path: str) -> Rule:
    return Rule(
        path,
        f"!self.matches({_cel_str(DOT_SEGMENT_PATTERN)})",
        f"{path.removeprefix('spec.')}: {MSG_DOT_SEGMENTS}",
    )


def _credential_env(ref: str, names: tuple[str, ...]) -> Rule:
    listed = "[" + ", ".join(f"'{n}'" for n in names) + "]"
    return Rule(
        "spec",
        f"!has(self.runtime) || !has(self.runtime.{ref}) || !has(self.training.env) || "
        f"!self.training.env.exists(e, e.name in {listed})",
        f"training.env: {'/'.join(names)} {MSG_CREDENTIAL_ENV}",
        field_path=".training.env",
    )


CEL_RULES: tuple[Rule, ...] = (
    Rule(
        "",
        f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters: child Jobs, pods and "
        "Services are named after it",
    ),
    Rule(
        "",
        f"self.metadata.name.matches({_cel_str(NAME_PATTERN)})",
        "metadata.name must start with a letter and contain only lowercase letters, digits "
        "and '-' (it names Services)",
    ),
    _immutable("model"),
    _immutable("data"),
    _immutable("training"),
    _immutable("checkpoints"),
    Rule(
        "spec.model.source",
        f"self.matches({HF}) || self.matches({S3})",
        f"model.source {MODEL_MESSAGE}",
    ),
    Rule(
        "spec.model.tokenizer",
        f"self.matches({HF}) || self.matches({S3})",
        f"model.tokenizer {MODEL_MESSAGE}",
    ),
    Rule(
        "spec.data.sources[]",
        "has(self.hfDataset) != has(self.uri)",
        "a data source needs exactly one of hfDataset or uri",
    ),
    _s3("spec.data.sources[].uri", "data source uri"),
    Rule(
        "spec.data",
        "self.sources.all(s, has(s.weight)) || self.sources.all(s, !has(s.weight))",
        "set weight on every data source or on none",
        field_path=".sources",
    ),
    Rule(
        "spec.data",
        "!self.sources.all(s, has(s.weight)) || self.sources.exists(s, s.weight > 0.0)",
        "at least one data source weight must be positive",
        field_path=".sources",
    ),
    Rule(
        "spec.data",
        "self.sources.all(s, !has(s.role) || "
        "self.sources.exists_one(t, has(t.role) && t.role == s.role))",
        "data source roles must be unique",
        field_path=".sources",
    ),
    _s3("spec.data.tokenizedUri", "data.tokenizedUri"),
    Rule(
        "spec.training",
        "has(self.maxSteps) != has(self.maxTokens)",
        "set exactly one of maxSteps or maxTokens",
        field_path=".maxSteps",
    ),
    Rule(
        "spec.training",
        "self.globalBatchSize % self.microBatchSize == 0",
        MSG_GBS_MULTIPLE,
        field_path=".globalBatchSize",
    ),
    Rule(
        "spec.training",
        f"(self.nodes * {PPN}) % (self.tensorParallel * self.pipelineParallel) == 0",
        MSG_MP_DIVIDES_WORLD,
        field_path=".tensorParallel",
    ),
    Rule(
        "spec.training",
        "!self.sequenceParallel || self.tensorParallel > 1",
        "sequenceParallel needs tensorParallel > 1",
        field_path=".sequenceParallel",
    ),
    Rule(
        "spec.training",
        "self.backend != 'nxd' || self.instanceType.startsWith('trn')",
        "backend nxd runs on Trainium only; use native or auto",
        "'backend nxd runs on Trainium only (instanceType ' + self.instanceType + '); "
        "use native or auto'",
        ".backend",
    ),
    # Both comparisons hold off while lr itself is invalid (lr's own rule names it): a
    # negative lr would otherwise also be reported as every bound it undercuts.
    Rule(
        "spec.training.optimizer",
        "self.lr <= 0.0 || self.minLr <= self.lr",
        "minLr must not exceed lr",
        field_path=".minLr",
    ),
    Rule(
        "spec.training.optimizer",
        "self.lr <= 0.0 || !has(self.warmupStartLr) || self.warmupStartLr <= self.lr",
        "warmupStartLr must not exceed lr",
        field_path=".warmupStartLr",
    ),
    Rule(
        "spec.training.env[]",
        "has(self.value) != has(self.valueFrom)",
        "env: set exactly one of value or valueFrom",
        "'env ' + self.name + ': set exactly one of value or valueFrom'",
    ),
    Rule(
        "spec.training.env[]",
        f"!(self.name in {RESERVED_NAMES}) && "
        + " && ".join(f"!self.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES),
        f"env name {MSG_RESERVED_ENV}",
        f"'env ' + self.name + ' {MSG_RESERVED_ENV}'",
        ".name",
    ),
    Rule(
        "spec.training.env[]",
        f"!has(self.value) || !self.name.matches({_cel_str(SECRET_ENV_PATTERN)})",
        "env looks like a credential: use valueFrom.secretKeyRef, never a literal value",
        "'env ' + self.name + ' looks like a credential: use valueFrom.secretKeyRef, never a "
        "literal value'",
        ".value",
    ),
    Rule(
        "spec.training.env",
        "self.all(e, self.exists_one(f, f.name == e.name))",
        f"{MSG_DUPLICATE_ENV}: each name at most once",
    ),
    _credential_env("s3CredentialsSecretRef", S3_CREDENTIAL_ENV),
    _credential_env("hfTokenSecretRef", HF_TOKEN_ENV),
    _quantity("spec.runtime.toolsResources.cpu"),
    _quantity("spec.runtime.toolsResources.memory"),
    _quantity("spec.checkpoints.scratch.sizeLimit"),
    Rule(
        "spec.training.env[].valueFrom",
        "has(self.secretKeyRef) != has(self.configMapKeyRef)",
        "valueFrom needs exactly one of secretKeyRef or configMapKeyRef",
    ),
    _s3("spec.checkpoints.s3Uri", "checkpoints.s3Uri"),
    Rule(
        "spec.checkpoints.scratch",
        "self.type != 'hostPath' || has(self.path)",
        "scratch type hostPath needs path (e.g. /local/nvme)",
        field_path=".path",
    ),
    Rule(
        "spec.checkpoints.scratch",
        "self.type != 'pvc' || has(self.claimName)",
        "scratch type pvc needs claimName",
        field_path=".claimName",
    ),
    Rule(
        "spec.checkpoints.scratch",
        "self.type == 'hostPath' || !has(self.path)",
        "scratch path is only used with type hostPath",
        field_path=".path",
    ),
    Rule(
        "spec.checkpoints.scratch",
        "self.type == 'pvc' || !has(self.claimName)",
        "scratch claimName is only used with type pvc",
        field_path=".claimName",
    ),
    _dot_segments("spec.checkpoints.scratch.mountPath"),
    _dot_segments("spec.checkpoints.scratch.path"),
    _s3("spec.output.s3Uri", "output.s3Uri"),
    _s3("spec.runtime.neuronCompileCacheUri", "runtime.neuronCompileCacheUri"),
)
