"""The ContinualPretrain API's vocabulary: names, limits and defaults, URI checks and the
constrained field types the spec and status models are built from.

Split from models.py (which re-exports every name here) so the status models can use the
limits without importing the spec.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

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
QUANTITY_PATTERN = r"^([+]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

RESERVED_ENV_NAMES = (
    "CPT_STAGE_CONFIG",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
"""Set by the operator / torchrun / the training operator; a user value would break the run."""
RESERVED_ENV_PREFIXES = ("PET_",)
SECRET_ENV_PATTERN = (
    r"(?i)(token|secret|password|passwd|credential|api_?key|access_?key|private_?key)"
)
"""Env names that look like credentials must come from a Secret (valueFrom.secretKeyRef)."""

MSG_GBS_MULTIPLE = "globalBatchSize must be a multiple of microBatchSize"
MSG_MP_DIVIDES_WORLD = "tensorParallel x pipelineParallel must divide nodes x processesPerNode"
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
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]

Backend = Literal["auto", "nxd", "native"]
Precision = Literal["bf16", "fp32"]
ActivationCheckpointing = Literal["none", "full", "selective"]
GangScheduling = Literal["none", "volcano", "scheduler-plugins"]
