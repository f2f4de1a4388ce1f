"""The runtime and resiliency sections of the spec (images, identity, placement, scheduling;
retry budget, timeouts, deadline, preflight) and the Secret and ConfigMap references: the parts
that stay mutable once a run exists. Split from models.py, which re-exports every name here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cpt_operator.api.fields import (
    DEFAULT_IMAGES,
    DEFAULT_MAX_EXCLUDED_NODES,
    HF_TOKEN_ENV,
    MAX_EXCLUDED_NODES_LIMIT,
    NAME_MAX_LENGTH,
    S3_CREDENTIAL_ENV,
    GangScheduling,
    K8sName,
    LabelValue,
    Quantity,
    StorageUri,
)
from cpt_operator.api.status_models import MAX_ATTEMPTS_LIMIT
from cpt_training.config import CamelModel


class SecretKeySelector(CamelModel):
    name: K8sName
    key: str = Field(min_length=1, max_length=NAME_MAX_LENGTH)
    optional: bool | None = None


class ConfigMapKeySelector(CamelModel):
    name: K8sName
    key: str = Field(min_length=1, max_length=NAME_MAX_LENGTH)
    optional: bool | None = None


class ImagesSpec(CamelModel):
    trainer_neuron: str = Field(
        default=DEFAULT_IMAGES["trainer_neuron"],
        max_length=512,
        description="backend nxd on trn1 (XLA, NxD).",
    )
    trainer_torchneuron: str = Field(
        default=DEFAULT_IMAGES["trainer_torchneuron"],
        max_length=512,
        description="backend native on trn2/trn3 (TorchNeuron).",
    )
    trainer_cuda: str = Field(default=DEFAULT_IMAGES["trainer_cuda"], max_length=512)
    trainer_cpu: str = Field(default=DEFAULT_IMAGES["trainer_cpu"], max_length=512)
    tools: str = Field(
        default=DEFAULT_IMAGES["tools"], max_length=512, description="Tokenize/export (CPU)."
    )
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"


class S3CredentialsSecretRef(CamelModel):
    """Static S3 keys from a Secret (prefer IRSA / Pod Identity; this is for non-AWS S3)."""

    name: K8sName
    access_key_id_key: str = Field(default="AWS_ACCESS_KEY_ID", max_length=NAME_MAX_LENGTH)
    secret_access_key_key: str = Field(default="AWS_SECRET_ACCESS_KEY", max_length=NAME_MAX_LENGTH)
    session_token_key: str | None = Field(default=None, max_length=NAME_MAX_LENGTH)


class Toleration(CamelModel):
    key: str | None = Field(default=None, max_length=NAME_MAX_LENGTH)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=NAME_MAX_LENGTH)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class ResourceRequests(CamelModel):
    cpu: Quantity | None = None
    memory: Quantity | None = None


class RuntimeSpec(CamelModel):
    """How pods are run: images, identity, placement, scheduling. Mutable while running."""

    images: ImagesSpec = Field(default_factory=ImagesSpec)
    service_account_name: K8sName | None = Field(
        default=None, description="For IRSA / Pod Identity S3 access."
    )
    hf_token_secret_ref: SecretKeySelector | None = Field(
        default=None, description="Secret key holding HF_TOKEN (gated hf:// models)."
    )
    s3_credentials_secret_ref: S3CredentialsSecretRef | None = None
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Training pods; node.kubernetes.io/instance-type is added from instanceType.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Training pods; the accelerator taint toleration is added automatically.",
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="A core/v1 Affinity for training pods, passed through."
    )
    tools_node_selector: dict[str, str] = Field(
        default_factory=dict, description="Tokenize/convert/export Jobs (CPU work)."
    )
    tools_resources: ResourceRequests = Field(default_factory=ResourceRequests)
    priority_class_name: K8sName | None = None
    gang_scheduling: GangScheduling = "none"
    kueue_queue_name: LabelValue | None = Field(
        default=None,
        description="Kueue LocalQueue (the kueue.x-k8s.io/queue-name label) of the training and "
        "preflight PyTorchJobs: they are created suspended and start when Kueue admits them "
        "(condition Queued meanwhile).",
    )
    kueue_queue_tools: bool = Field(
        default=False,
        description="Queue the tokenize, weights and export Jobs in kueueQueueName too "
        "(Kueue's batch/job integration must be enabled); false: they run outside Kueue.",
    )
    neuron_compile_cache_uri: StorageUri | None = Field(
        default=None, description="Persistent Neuron compile cache (s3://); trn only."
    )
    precompile: bool = Field(
        default=False,
        description="nxd: run neuron_parallel_compile with the exact training command and "
        "layout on the training gang before training (phase Precompiling), filling the compile "
        "cache; skipped when the cache already records this layout's key.",
    )


class PreflightSpec(CamelModel):
    enabled: bool = Field(default=True, description="Run the all-reduce check before training.")
    min_bus_bandwidth_gbps: float = Field(
        default=0.0, ge=0, le=100000, description="Fail the run below this; 0 only reports."
    )


class ResiliencySpec(CamelModel):
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=MAX_ATTEMPTS_LIMIT,
        description="Failed training attempts allowed; a preempted attempt (SIGTERM with a "
        "committed checkpoint, a pod deleted or evicted, a scheduler preemption) does not count.",
    )
    max_termination_grace_period_seconds: int = Field(
        default=300,
        ge=30,
        le=3600,
        description="Upper bound of the training pods' terminationGracePeriodSeconds, which cpt "
        "sets from the step time and the checkpoint's save time (measured by the last attempt, "
        "else estimated from its size): the time a SIGTERMed trainer has to finish its step and "
        "commit a checkpoint. On spot capacity keep it under the 2-minute interruption notice.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=60,
        le=365 * 86400,
        description="Wall-clock budget from the run's start, suspended time excluded: when it "
        "is reached the trainer is asked to checkpoint and stop, and the run ends Failed with "
        "reason DeadlineExceeded, keeping its committed checkpoints. Unset: no deadline.",
    )
    export_on_deadline: bool = Field(
        default=False,
        description="When activeDeadlineSeconds stops the run, still export its newest "
        "committed checkpoint (the run then ends Failed/DeadlineExceeded with outputUri set). "
        "May also be set after the run failed on its deadline: the export then starts.",
    )
    pending_timeout_seconds: int = Field(
        default=1800, ge=0, le=7 * 86400, description="Unschedulable this long → fail; 0 = off."
    )
    hang_timeout_seconds: int = Field(
        default=1800, ge=0, le=7 * 86400, description="No progress this long → restart; 0 = off."
    )
    node_not_ready_seconds: int = Field(
        default=60,
        ge=0,
        le=86400,
        description="A training pod's node NotReady this long → restart the attempt (its pods "
        "on that node are force-deleted).",
    )
    exclude_failed_nodes: bool = Field(
        default=True,
        description="Keep a node that failed an attempt (NotReady past nodeNotReadySeconds, "
        "gone, or its kubelet reported the accelerator devices unhealthy) out of every later "
        "attempt of this run, even after it is Ready again (status.excludedNodes; a "
        "kubernetes.io/hostname NotIn node affinity on the training pods).",
    )
    max_excluded_nodes: int = Field(
        default=DEFAULT_MAX_EXCLUDED_NODES,
        ge=1,
        le=MAX_EXCLUDED_NODES_LIMIT,
        description="At most this many nodes are excluded at once; beyond it the oldest "
        "exclusion drops out (event NodeExclusionDropped) and that node may be used again.",
    )
    preflight: PreflightSpec = Field(default_factory=PreflightSpec)


def credential_env_names(runtime: RuntimeSpec) -> tuple[str, ...]:
    """The env names the operator fills from runtime's Secret references."""
    names: tuple[str, ...] = ()
    if runtime.s3_credentials_secret_ref is not None:
        names += S3_CREDENTIAL_ENV
    if runtime.hf_token_secret_ref is not None:
        names += HF_TOKEN_ENV
    return names
