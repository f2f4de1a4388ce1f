"""batch/v1 Jobs for the CPU stages: tokenize (Indexed), convert-to-nxd (weights), export-hf.

Retries of these stages belong to the Job controller, not the operator: each is idempotent
(tokenize shards and the converted weights are skipped when their done/commit markers exist,
export writes `_SUCCESS` last). The podFailurePolicy makes a bad config (exit 2, see
`cpt-train`) fail at once instead of burning retries, and keeps evictions/preemptions from
counting against the retry budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.builders import meta, pods
from cpt_operator.builders.meta import Component

EXIT_BAD_CONFIG = 2
TOKENIZE_MAX_PARALLELISM = 64
RETRIES_PER_INDEX = 2
RETRIES = 2


@dataclass(frozen=True)
class RunRef:
    """The owning ContinualPretrain: enough to name and adopt children."""

    name: str
    namespace: str
    uid: str

    def owner(self) -> dict[str, Any]:
        return {
            "apiVersion": meta.CPT_API_VERSION,
            "kind": meta.CPT_KIND,
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }


def _pod_failure_policy(container: str) -> dict[str, Any]:
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": [EXIT_BAD_CONFIG],
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def _tools_pod(
    spec: ContinualPretrainSpec,
    run: RunRef,
    component: Component,
    config: BaseModel,
    image: str,
) -> dict[str, Any]:
    rt = spec.runtime
    container = component
    req = {
        k: v
        for k, v in (("cpu", rt.tools_resources.cpu), ("memory", rt.tools_resources.memory))
        if v
    }
    lim = {"memory": rt.tools_resources.memory} if rt.tools_resources.memory else {}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pods.pod_security_context(),
        "containers": [
            {
                "name": container,
                "image": image,
                "imagePullPolicy": rt.images.pull_policy,
                "command": ["cpt-train", meta.STAGE_OF[component]],
                "env": pods.stage_env(spec, config),
                "securityContext": pods.container_security_context(),
                "volumeMounts": [
                    {"name": pods.SCRATCH_VOLUME, "mountPath": spec.checkpoints.scratch.mount_path},
                    {"name": pods.TMP_VOLUME, "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [pods.scratch_volume(spec.checkpoints.scratch), pods.tmp_volume()],
    }
    if req:
        pod_spec["containers"][0]["resources"] = pods.resources(req, lim)
    if rt.service_account_name:
        pod_spec["serviceAccountName"] = rt.service_account_name
    if rt.tools_node_selector:
        pod_spec["nodeSelector"] = dict(rt.tools_node_selector)
    if rt.tolerations:
        pod_spec["tolerations"] = pods.tolerations(rt.tolerations)
    if rt.priority_class_name:
        pod_spec["priorityClassName"] = rt.priority_class_name
    return {"metadata": {"labels": meta.labels(run.name, component)}, "spec": pod_spec}


def _job(
    spec: ContinualPretrainSpec,
    run: RunRef,
    component: Component,
    config: BaseModel,
    image: str,
    job_spec: dict[str, Any],
) -> dict[str, Any]:
    name = meta.check_name(meta.child_name(run.name, component))
    labels = meta.labels(run.name, component)
    rt = spec.runtime
    queued: dict[str, Any] = {}
    if rt.kueue_queue_name and rt.kueue_queue_tools:
        # Created suspended, as Kueue's webhook would make it; Kueue unsuspends on admission.
        labels[meta.KUEUE_QUEUE_LABEL] = rt.kueue_queue_name
        queued["suspend"] = True
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            **job_spec,
            **queued,
            "podFailurePolicy": _pod_failure_policy(component),
            "template": _tools_pod(spec, run, component, config, image),
        },
    }
    return meta.adopt(manifest, run.owner())


def tokenize_job(spec: ContinualPretrainSpec, run: RunRef, config: BaseModel) -> dict[str, Any]:
    """Indexed Job, one completion per shard. backoffLimitPerIndex reruns only the shards
    that failed; maxFailedIndexes 0 fails the Job as soon as one shard is out of retries."""
    shards = spec.data.shards
    return _job(
        spec,
        run,
        "tokenize",
        config,
        spec.runtime.images.tools,
        {
            "completionMode": "Indexed",
            "completions": shards,
            "parallelism": min(shards, TOKENIZE_MAX_PARALLELISM),
            "backoffLimitPerIndex": RETRIES_PER_INDEX,
            "maxFailedIndexes": 0,
        },
    )


def weights_job(spec: ContinualPretrainSpec, run: RunRef, config: BaseModel) -> dict[str, Any]:
    """HF → NxD layout on a CPU node. The trainer-neuron image carries neuronx-distributed."""
    return _job(
        spec,
        run,
        "weights",
        config,
        spec.runtime.images.trainer_neuron,
        {"completions": 1, "parallelism": 1, "backoffLimit": RETRIES},
    )


def export_job(spec: ContinualPretrainSpec, run: RunRef, config: BaseModel) -> dict[str, Any]:
    """NxD checkpoints are read with the Neuron image's libraries; native DCP with the tools
    image."""
    images = spec.runtime.images
    nxd = spec.training.resolved_backend() == "nxd"
    return _job(
        spec,
        run,
        "export",
        config,
        images.trainer_neuron if nxd else images.tools,
        {"completions": 1, "parallelism": 1, "backoffLimit": RETRIES},
    )
