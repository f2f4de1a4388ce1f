"""The ContinualPretrain API's vocabulary: names, limits and defaults, URI checks and the
constrained field types the spec and status models are built from.

Split from models.py (which re-exports every name here) so the status models can use the
limits without importing the spec.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from cpt_operator.api.wire import check_quantity
from cpt_training.config import HF_URI_PATTERN, S3_URI_PATTERN

GROUP = "cpt.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ContinualPretrain"
PLURAL = "continualpretrains"
SINGULAR = "continualpretrain"
SHORT_NAMES = ["cpt"]
CATEGORIES = ["ml", "cpt"]

MAX_NAME_LENGTH = 40
"""Run names are short because child names (``<run>-train-<n>``, the PyTorchJob's pods and
Services ``<run>-train-<n>-worker-<i>``) derive from them and must stay within 63 characters."""
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

URI_MAX_LENGTH = 1024
NAME_MAX_LENGTH = 253
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

RESERVED_ENV_NAMES = (
    # the operator: the stage config, the pod's identity
    "CPT_STAGE_CONFIG",
    "CPT_NODE_ID",
    # the Job controller (Indexed Jobs: the tokenize shard index)
    "JOB_COMPLETION_INDEX",
    # the training operator and torchrun (rendezvous, ranks)
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    # the operator's device env (cpt_training/nxd/env.py, cpt_training/native/neuron.py)
    "NEURON_CC_FLAGS",
    "NEURON_COMPILE_CACHE_URL",
    "NEURON_FUSE_SOFTMAX",
    "NEURON_LOGICAL_NC_CONFIG",
    "TORCH_NEURONX_NEFF_CACHE_DIR",
    "CCOM_SOCKET_IFNAME",
    "MALLOC_ARENA_MAX",
    "XLA_DOWNCAST_BF16",
    "XLA_DISABLE_FUNCTIONALIZATION",
)
"""Set by the operator, the Job controller, the training operator or torchrun: a user value
would silently break the run (every tokenize shard reading index 0, a compiler without the
flags the layout needs). tests/unit/test_hostile_table.py fails when a builder sets a name
that is not reserved here. Extra Neuron compiler flags go in CPT_EXTRA_NEURON_CC_FLAGS, which
the operator appends to its NEURON_CC_FLAGS (docs/api.md, training.env)."""
RESERVED_ENV_PREFIXES = ("PET_", "TORCHELASTIC_", "NEURON_RT_", "FI_")
"""torchrun's PET_* and TORCHELASTIC_*, the Neuron runtime's and libfabric's (EFA) knobs the
operator sets per instance type."""
EXTRA_NEURON_CC_FLAGS_ENV = "CPT_EXTRA_NEURON_CC_FLAGS"
S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
HF_TOKEN_ENV = ("HF_TOKEN",)
"""Set by the operator from runtime.s3CredentialsSecretRef / runtime.hfTokenSecretRef."""
SECRET_ENV_PATTERN = (
    r"(?i)(token|secret|password|passwd|credential|api_?key|access_?key|private_?key)"
)
"""Env names that look like credentials must come from a Secret (valueFrom.secretKeyRef)."""

MSG_GBS_MULTIPLE = "globalBatchSize must be a multiple of microBatchSize"
MSG_MP_DIVIDES_WORLD = "tensorParallel x pipelineParallel must divide nodes x processesPerNode"
MSG_RESERVED_ENV = (
    "is set by the operator, the Job controller or torchrun and cannot be overridden "
    "(docs/api.md lists the reserved names)"
)
MSG_DUPLICATE_ENV = "env names must be unique"
MSG_DOT_SEGMENTS = "'.' and '..' segments are not allowed (write the path they lead to)"
DOT_SEGMENT_PATTERN = r"(^|/)[.][.]?(/|$)"
MSG_CREDENTIAL_ENV = (
    "is set by the operator from spec.runtime's Secret reference (s3CredentialsSecretRef or "
    "hfTokenSecretRef): drop one of the two"
)
"""Messages shared with the CRD's CEL rules; Python appends the numbers after a colon."""

DEFAULT_MAX_EXCLUDED_NODES = 8
MAX_EXCLUDED_NODES_LIMIT = 256
"""spec.resiliency.maxExcludedNodes: its default and upper bound (the node affinity's NotIn list
is copied into every training pod, so it stays short)."""

DEFAULT_IMAGE_TAG = "0.1.0"
DEFAULT_IMAGES = {
    "trainer_neuron": f"ghcr.io/cpt-dev/cpt-trainer-neuron:{DEFAULT_IMAGE_TAG}",
    "trainer_torchneuron": f"ghcr.io/cpt-dev/cpt-trainer-torchneuron:{DEFAULT_IMAGE_TAG}",
    "trainer_cuda": f"ghcr.io/cpt-dev/cpt-trainer-cuda:{DEFAULT_IMAGE_TAG}",
    "trainer_cpu": f"ghcr.io/cpt-dev/cpt-trainer-cpu:{DEFAULT_IMAGE_TAG}",
    "tools": f"ghcr.io/cpt-dev/cpt-tools:{DEFAULT_IMAGE_TAG}",
}
"""Pinned images. trainer-neuron (nxd on trn1) is built FROM
public.ecr.aws/neuron/pytorch-training-neuronx:2.9.0-neuronx-py312-sdk2.28.0-ubuntu24.04;
trainer-torchneuron (native on trn2/trn3) installs TorchNeuron 2.33 (torch-neuronx 2.14.3)."""


_WIRE_TYPES = {
    "int_type": "integer",
    "int_from_float": "integer",
    "bool_type": "boolean",
    "string_type": "string",
    "float_type": "number",
    "dict_type": "object",
    "list_type": "array",
    "model_type": "object",
}


def type_message(error: Mapping[str, Any]) -> str | None:
    """A pydantic type error in the API server's words: the type the field must have and the
    value given ("1" for an integer, "yes" for a boolean: the API server converts nothing)."""
    wire = _WIRE_TYPES.get(str(error.get("type")))
    if wire is None:
        return None
    given = error.get("input")
    shown = (
        json.dumps(given, default=str)
        if not isinstance(given, dict | list)
        else type(given).__name__
    )
    return f"must be of type {wire}, got {shown[:80]} (the API server converts no types)"


class FieldErrors(ValueError):
    """Several problems found by one model validator, each with the sub-field it is about.

    Pydantic keeps the exception in the error's ``ctx``; the planner expands it into one
    ``spec.<path>.<field>: message`` line per problem. ``str()`` is the joined text."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{f}: {m}" if f else m for f, m in problems))


def raise_if(problems: list[tuple[str, str]]) -> None:
    """Raise FieldErrors when a model validator found any problem."""
    if problems:
        raise FieldErrors(problems)


# ---------------------------------------------------------------------------------------------
# URI helpers: used by validators here, by the planner, and by the builders.
# ---------------------------------------------------------------------------------------------


def is_s3_uri(value: str) -> bool:
    return re.fullmatch(S3_URI_PATTERN, value) is not None


def is_hf_uri(value: str) -> bool:
    return re.fullmatch(HF_URI_PATTERN, value) is not None


def is_local_path(value: str) -> bool:
    """A filesystem path (absolute, relative, or file://): valid only under ``cpt local``."""
    return value.startswith("file://") or ("://" not in value and value != "")


def _storage_uri(value: str) -> str:
    if is_s3_uri(value) or is_local_path(value):
        return value
    raise ValueError(
        f"{value!r} is not a storage URI: use s3://bucket/prefix/ (or a local path with cpt local)"
    )


def _model_uri(value: str) -> str:
    if is_hf_uri(value) or is_s3_uri(value) or is_local_path(value):
        return value
    raise ValueError(
        f"{value!r} is not a model source: use hf://org/name[@revision], s3://bucket/prefix/ "
        "(or a local path with cpt local)"
    )


StorageUri = Annotated[
    str, Field(min_length=1, max_length=URI_MAX_LENGTH), AfterValidator(_storage_uri)
]
ModelUri = Annotated[
    str, Field(min_length=1, max_length=URI_MAX_LENGTH), AfterValidator(_model_uri)
]
K8sName = Annotated[str, Field(min_length=1, max_length=NAME_MAX_LENGTH)]
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LabelValue = Annotated[str, Field(min_length=1, max_length=63, pattern=LABEL_VALUE_PATTERN)]
"""A value the operator puts in a label (the Kueue queue name on the training job)."""
Quantity = Annotated[str, Field(max_length=64), AfterValidator(check_quantity)]
"""A Kubernetes resource quantity, parsed with the API server's grammar (api/wire.py); the
CRD checks it with CEL's isQuantity (api/crd_rules.py)."""

Backend = Literal["auto", "nxd", "native"]
Precision = Literal["bf16", "fp32"]
ActivationCheckpointing = Literal["none", "full", "selective"]
GangScheduling = Literal["none", "volcano", "scheduler-plugins"]
