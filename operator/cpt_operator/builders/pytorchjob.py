"""kubeflow.org/v1 PyTorchJobs: the training attempt and the preflight check.

Shape decisions (see /work/shared/reference/peers.md §1):

* Master (1) + Worker (nodes-1) replicas: only with a Master does training-operator v1 inject
  MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/PET_NNODES, which torchrun takes from the command
  line below (`$(VAR)` is expanded by the kubelet from the container env).
* restartPolicy Never and backoffLimit 0: v1 restarts single pods and its backoffLimit does not
  count them reliably, so the operator owns retries: it deletes the whole attempt and creates
  `<run>-train-<n+1>`, which resumes from the newest committed checkpoint (the trainer finds it
  under its checkpoint root; nothing is restored by the operator).
* cleanPodPolicy Running: when a replica fails the job stops the others at once (they would
  otherwise hang in a collective until a timeout) but keeps failed pods for their logs.
* One builder for every device: trn1/trn1n (neuron + EFA, NxD env), trn2 (native on
  TorchNeuron's `neuron` device: its own image, LNC and compile-cache env), NVIDIA
  (nvidia.com/gpu) and local-cpu (gloo; no accelerator resources and no instance-type
  selector, so it can target any labelled node, e.g. a test executor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cpt_operator.api.models import EXTRA_NEURON_CC_FLAGS_ENV, ContinualPretrainSpec
from cpt_operator.api.podsecurity import runs_as_root
from cpt_operator.builders import meta, pods, stages
from cpt_operator.builders.jobs import RunRef
from cpt_operator.builders.meta import Component
from cpt_training.config import PrecompileStage, PreflightStage, TrainStage
from cpt_training.flops import instance_type as lookup_instance
from cpt_training.native.neuron import DEFAULT_LNC, NEFF_CACHE_SUBDIR, torchneuron_env
from cpt_training.nxd.env import neuron_env

CONTAINER = "pytorch"
PORT_NAME = "pytorchjob-port"
PORT = 23456
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
HOSTNAME_KEY = "kubernetes.io/hostname"
TERMINATION_GRACE_SECONDS = 60
"""The floor of a training pod's grace period and the preflight's: SIGTERM to exit."""
ASSUMED_SAVE_GIB_PER_S = 0.5
"""Save-and-commit speed per node before an attempt measured one (progress.json's
lastCommitSeconds): a conservative S3 upload rate for one node's checkpoint shards."""
STOP_MARGIN_SECONDS = 30
"""Process start-up of the stop path, the commit's collectives, torchrun's own shutdown."""
LAUNCHER = "cpt-torchrun"
"""torchrun wrapped so that a stop on SIGTERM keeps its exit code (cpt_training.launch)."""
ACCELERATOR_TAINTS = {"neuron": "aws.amazon.com/neuron", "cuda": "nvidia.com/gpu"}
RESUME_STEP_ANNOTATION = "cpt.dev/expected-resume-step"
# The checkpoint syncer groups ranks by node to decide who uploads/restores a node's files;
# the pod is the node identity (each replica pod has its own scratch volume). Its UID stays
# unique even where the hostname is shared (hostNetwork, a test executor running pods as
# local processes) and is never mistaken for a host name.
NODE_ID_ENV = {"name": "CPT_NODE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}
RESUME_URI_ANNOTATION = "cpt.dev/expected-resume-uri"


def torchrun_args(nproc_per_node: int, stage: str) -> list[str]:
    """torchrun's rendezvous comes from the env the training operator injects."""
    return [
        "--nnodes=$(PET_NNODES)",
        f"--nproc-per-node={nproc_per_node}",
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "cpt_training.cli",
        stage,
    ]


def termination_grace_seconds(
    spec: ContinualPretrainSpec,
    *,
    step_seconds: float | None,
    checkpoint_gib: float | None,
    save_seconds: float | None,
) -> int:
    """The training pods' terminationGracePeriodSeconds: one step, plus 1.5 x the time to
    save and commit a checkpoint (measured by the last attempt, else the checkpoint's per-node
    size at ASSUMED_SAVE_GIB_PER_S), plus STOP_MARGIN_SECONDS; at least
    TERMINATION_GRACE_SECONDS, at most spec.resiliency.maxTerminationGracePeriodSeconds."""
    if save_seconds is None:
        per_node = (checkpoint_gib or 0.0) / max(spec.training.nodes, 1)
        save_seconds = per_node / ASSUMED_SAVE_GIB_PER_S
    need = (step_seconds or 0.0) + 1.5 * save_seconds + STOP_MARGIN_SECONDS
    bound = spec.resiliency.max_termination_grace_period_seconds
    return int(min(max(math.ceil(need), TERMINATION_GRACE_SECONDS), bound))


def _image(spec: ContinualPretrainSpec) -> str:
    accel = lookup_instance(spec.training.instance_type).accelerator
    images = spec.runtime.images
    if accel == "neuron":
        nxd = spec.training.resolved_backend() == "nxd"
        return images.trainer_neuron if nxd else images.trainer_torchneuron
    return images.trainer_cuda if accel == "cuda" else images.trainer_cpu


def _device_env(
    spec: ContinualPretrainSpec, config: TrainStage | None, cache: str
) -> dict[str, str]:
    """NxD/XLA on trn1 gets the full Neuron env; native on trn2 TorchNeuron's: the LNC that
    the process count implies, its NEFF cache on the scratch volume, EFA."""
    t = spec.training
    inst = lookup_instance(t.instance_type)
    if inst.accelerator != "neuron":
        return {}
    if t.resolved_backend() == "nxd":
        if config is not None:
            world = t.nodes * t.resolved_processes_per_node()
            env = neuron_env(config, world_size=world, compile_cache_uri=cache)
            extra = next(
                (e.value for e in t.env if e.name == EXTRA_NEURON_CC_FLAGS_ENV and e.value), ""
            )
            if extra and "NEURON_CC_FLAGS" in env:  # on purpose: after the operator's own
                env["NEURON_CC_FLAGS"] = f"{env['NEURON_CC_FLAGS']} {extra}"
            return env
        return {"NEURON_COMPILE_CACHE_URL": cache}  # the preflight job
    lnc = inst.for_processes(t.resolved_processes_per_node()).lnc or DEFAULT_LNC
    neff_cache = f"{spec.checkpoints.scratch.mount_path.rstrip('/')}/{NEFF_CACHE_SUBDIR}"
    return torchneuron_env(lnc=lnc, efa=inst.efa_devices > 0, neff_cache_dir=neff_cache)


def avoid_nodes(affinity: dict[str, Any] | None, nodes: Sequence[str]) -> dict[str, Any]:
    """`affinity` (not modified) plus a required `kubernetes.io/hostname NotIn nodes`.

    Node selector terms are ORed, so the expression goes into *every* existing term (each
    term's own requirements are ANDed with it); without terms it becomes the only one. The
    other parts of the affinity (preferred terms, pod (anti-)affinity) are kept as they are.
    """
    out: dict[str, Any] = meta.clone(affinity or {})
    hosts = list(dict.fromkeys(nodes))
    if not hosts:
        return out
    node_affinity = out.get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [
        {
            **term,
            "matchExpressions": [
                *(term.get("matchExpressions") or []),
                {"key": HOSTNAME_KEY, "operator": "NotIn", "values": list(hosts)},
            ],
        }
        for term in terms
    ]
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = required
    out["nodeAffinity"] = node_affinity
    return out


def _pod_template(
    spec: ContinualPretrainSpec,
    labels: dict[str, str],
    stage: str,
    config: TrainStage | PreflightStage | PrecompileStage,
    device_env: dict[str, str],
    exclude_nodes: Sequence[str] = (),
    grace_seconds: int = TERMINATION_GRACE_SECONDS,
    command: Sequence[str] = (),
) -> dict[str, Any]:
    t, rt = spec.training, spec.runtime
    # torchrun waits this long for its SIGTERMed workers to commit before killing them.
    device_env = {**device_env, "PET_SHUTDOWN_TIMEOUT": str(max(grace_seconds - 5, 1))}
    inst = lookup_instance(t.instance_type)
    accel_resources = dict(inst.resources)
    tolerations = []
    taint = ACCELERATOR_TAINTS.get(inst.accelerator)
    if taint:
        tolerations.append({"key": taint, "operator": "Exists", "effect": "NoSchedule"})
    tolerations += pods.tolerations(rt.tolerations)
    node_selector: dict[str, str] = {}
    if inst.accelerator != "cpu":
        node_selector[INSTANCE_TYPE_LABEL] = t.instance_type
    node_selector.update(rt.node_selector)
    scratch = spec.checkpoints.scratch
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": _image(spec),
        "imagePullPolicy": rt.images.pull_policy,
        "command": list(command) or [LAUNCHER],
        "args": [] if command else torchrun_args(t.resolved_processes_per_node(), stage),
        "env": [meta.clone(NODE_ID_ENV), *pods.stage_env(spec, config, device_env)],
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "securityContext": pods.container_security_context(
            ipc_lock=inst.efa_devices > 0, root=runs_as_root(spec)
        ),
        "volumeMounts": [
            {"name": pods.SHM_VOLUME, "mountPath": "/dev/shm"},
            {"name": pods.SCRATCH_VOLUME, "mountPath": scratch.mount_path},
            {"name": pods.TMP_VOLUME, "mountPath": "/tmp"},
        ],
    }
    if accel_resources:
        # Extended resources must be requested == limited; the pod owns the whole node.
        container["resources"] = pods.resources(accel_resources, accel_resources)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": grace_seconds,
        "securityContext": pods.pod_security_context(root=runs_as_root(spec)),
        "containers": [container],
        "volumes": [pods.shm_volume(), pods.scratch_volume(scratch), pods.tmp_volume()],
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    affinity = avoid_nodes(rt.affinity, exclude_nodes)
    if not accel_resources and "podAntiAffinity" not in affinity:
        # Whole-node accelerator requests already give one replica per node; without them
        # (local-cpu) the replicas must be kept apart explicitly.
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": dict(labels)}, "topologyKey": HOSTNAME_KEY}
            ]
        }
    if affinity:
        pod_spec["affinity"] = affinity
    if rt.service_account_name:
        pod_spec["serviceAccountName"] = rt.service_account_name
    if rt.priority_class_name:
        pod_spec["priorityClassName"] = rt.priority_class_name
    return {"metadata": {"labels": dict(labels)}, "spec": pod_spec}


def gang_job(
    spec: ContinualPretrainSpec,
    run: RunRef,
    component: Component,
    config: TrainStage | PreflightStage | PrecompileStage,
    *,
    attempt: int | None = None,
    annotations: dict[str, str] | None = None,
    exclude_nodes: Sequence[str] = (),
    grace_seconds: int = TERMINATION_GRACE_SECONDS,
    command: Sequence[str] = (),
) -> dict[str, Any]:
    t, rt = spec.training, spec.runtime
    name = meta.check_name(meta.child_name(run.name, component, attempt))
    # The workers' pods and headless Services are `<name>-worker-<i>`.
    meta.check_name(f"{name}-worker-{max(t.nodes - 2, 0)}")
    labels = meta.labels(run.name, component, attempt)
    cache = stages.paths(spec, run.name, run.namespace).compile_cache
    train = config.train if isinstance(config, PrecompileStage) else config
    device_env = _device_env(spec, train if isinstance(train, TrainStage) else None, cache)
    template = _pod_template(
        spec,
        labels,
        meta.STAGE_OF[component],
        config,
        device_env,
        exclude_nodes,
        grace_seconds,
        command,
    )
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "Never", "template": template}
    }
    if t.nodes > 1:
        replicas["Worker"] = {
            "replicas": t.nodes - 1,
            "restartPolicy": "Never",
            "template": meta.clone(template),
        }
    run_policy: dict[str, Any] = {"cleanPodPolicy": "Running", "backoffLimit": 0}
    if rt.gang_scheduling != "none":
        scheduling: dict[str, Any] = {"minAvailable": t.nodes}
        if rt.priority_class_name:
            scheduling["priorityClass"] = rt.priority_class_name
        if spec.resiliency.pending_timeout_seconds:
            scheduling["scheduleTimeoutSeconds"] = spec.resiliency.pending_timeout_seconds
        run_policy["schedulingPolicy"] = scheduling
    job_labels = dict(labels)
    if rt.kueue_queue_name:
        job_labels[meta.KUEUE_QUEUE_LABEL] = rt.kueue_queue_name
        # Created suspended, as Kueue's own webhook would make it: no pod starts before
        # Kueue admits the job (it then clears suspend).
        run_policy["suspend"] = True
    metadata: dict[str, Any] = {"name": name, "labels": job_labels}
    if annotations:
        metadata["annotations"] = dict(annotations)
    manifest = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(t.resolved_processes_per_node()),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }
    return meta.adopt(manifest, run.owner())


def training_job(
    spec: ContinualPretrainSpec,
    run: RunRef,
    config: TrainStage,
    *,
    resume_step: int | None = None,
    resume_uri: str | None = None,
    exclude_nodes: Sequence[str] = (),
    grace_seconds: int = TERMINATION_GRACE_SECONDS,
) -> dict[str, Any]:
    """`<run>-train-<attempt>`. The annotations record which checkpoint the operator expected
    this attempt to resume from, for people reading the cluster; the trainer decides itself.
    `exclude_nodes`: nodes earlier attempts failed on (status.excludedNodes), kept out by a
    required node affinity. `grace_seconds`: see termination_grace_seconds."""
    annotations = {}
    if resume_step is not None:
        annotations[RESUME_STEP_ANNOTATION] = str(resume_step)
    if resume_uri:
        annotations[RESUME_URI_ANNOTATION] = resume_uri
    return gang_job(
        spec,
        run,
        "train",
        config,
        attempt=config.attempt,
        annotations=annotations or None,
        exclude_nodes=exclude_nodes,
        grace_seconds=grace_seconds,
    )


def preflight_job(
    spec: ContinualPretrainSpec,
    run: RunRef,
    config: PreflightStage,
    exclude_nodes: Sequence[str] = (),
) -> dict[str, Any]:
    """Same gang shape and placement as training, running the all-reduce check (avoiding the
    nodes an earlier check found bad)."""
    return gang_job(spec, run, "preflight", config, exclude_nodes=exclude_nodes)
