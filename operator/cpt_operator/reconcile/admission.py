"""Checks that need facts from the cluster but must pass before the first child exists.

A run whose Secret is missing, whose pods the namespace's Pod Security level rejects, or whose
pod templates the API server refuses would otherwise create children that can never start
(the kubelet waits forever for a missing Secret; the training operator retries forever when
admission rejects its pods). The handler gathers the facts (the client layer does the I/O:
Secret metadata, the namespace's `pod-security.kubernetes.io/enforce` label, server-side dry
runs); the pure functions here say what to look up and turn the answers into `Blocker`s,
which fail the run in Planning with a condition, an event, and zero children.

A fact the operator may not read (no RBAC for Secrets or Namespaces) is unknown, never a
blocker: the run goes on and the kubelet / admission report the problem on the pods.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cpt_operator.api.models import ContinualPretrainSpec, parse_spec
from cpt_operator.api.plan_checks import prefixes_overlap
from cpt_operator.api.podsecurity import required_level
from cpt_operator.builders import jobs, meta, pytorchjob, stages
from cpt_operator.builders.jobs import RunRef

SECRET_NOT_FOUND = "SecretNotFound"
POD_SECURITY = "PodSecurityViolation"
REJECTED = "InvalidSpec"

ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
LEVELS = ("privileged", "baseline", "restricted")


@dataclass(frozen=True)
class Blocker:
    """Why the run cannot start: a condition reason, the spec field at fault, the message."""

    reason: str
    field: str
    message: str


def secret_refs(spec: ContinualPretrainSpec) -> list[tuple[str, str]]:
    """(field, Secret name) of every required Secret the pods reference."""
    rt = spec.runtime
    refs: list[tuple[str, str]] = []
    if rt.hf_token_secret_ref is not None and not rt.hf_token_secret_ref.optional:
        refs.append(("spec.runtime.hfTokenSecretRef.name", rt.hf_token_secret_ref.name))
    if rt.s3_credentials_secret_ref is not None:
        refs.append(("spec.runtime.s3CredentialsSecretRef.name", rt.s3_credentials_secret_ref.name))
    for i, env in enumerate(spec.training.env):
        ref = env.value_from.secret_key_ref if env.value_from else None
        if ref is not None and not ref.optional:
            refs.append((f"spec.training.env[{i}].valueFrom.secretKeyRef.name", ref.name))
    return refs


def missing_secret(field: str, name: str, namespace: str) -> Blocker:
    return Blocker(
        SECRET_NOT_FOUND,
        field,
        f"{field}: Secret {name!r} does not exist in namespace {namespace}; the pods could "
        "never start. Create it, then delete and re-create this run",
    )


def pod_security_problems(spec: ContinualPretrainSpec, level: str | None) -> list[Blocker]:
    """What the namespace's enforced Pod Security level rejects of the pods this run creates
    (the departures from "restricted" that cpt's own templates make:
    :mod:`cpt_operator.api.podsecurity`, docs/security.md, Pod security)."""
    need = required_level(spec)
    rejected = need.rejected_by(level)
    if not rejected:
        return []
    hint = (
        f"the namespace enforces Pod Security level {level!r} ({ENFORCE_LABEL}); this run "
        f"needs {need.level!r}: run it in a namespace labelled {ENFORCE_LABEL}={need.level}"
        + (" (or privileged)" if need.level == "baseline" else "")
        + " (docs/security.md, Pod security)"
    )
    msgs = {
        "baseline": "which only the baseline and privileged levels allow",
        "privileged": "which only the privileged level allows",
        "restricted": "",
    }
    return [
        Blocker(POD_SECURITY, d.field, f"{d.field}: {d.why}, {msgs[d.level]}; {hint}")
        for d in rejected
    ]


def dry_run_manifests(
    spec: ContinualPretrainSpec, run: RunRef
) -> list[tuple[str, str, dict[str, Any]]]:
    """(what, spec field, batch/v1 Job) for a server-side dry run of every pod template the
    run will use. A PyTorchJob's template is wrapped in a Job: the PyTorchJob schema does
    not validate pod fields (label syntax, affinity, tolerations, names), the Job API does."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    tok = stages.tokenize_stage(spec, run.name, run.namespace)
    out.append(("tokenize Job", "spec.runtime", jobs.tokenize_job(spec, run, tok)))
    cfg = stages.train_stage(spec, run.name, 1, run.namespace)
    ptj = pytorchjob.training_job(spec, run, cfg)
    template = meta.clone(ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    template["spec"]["restartPolicy"] = "Never"
    wrapper = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": ptj["metadata"]["name"], "labels": ptj["metadata"]["labels"]},
        "spec": {"template": template, "backoffLimit": 0},
    }
    out.append(("training pod template", "spec.runtime", wrapper))
    return out


_POD_FIELDS = {
    "nodeSelector": ("spec.runtime.nodeSelector", "spec.runtime.toolsNodeSelector"),
    "affinity": ("spec.runtime.affinity", "spec.runtime.affinity"),
    "tolerations": ("spec.runtime.tolerations", "spec.runtime.tolerations"),
    "serviceAccountName": ("spec.runtime.serviceAccountName", "spec.runtime.serviceAccountName"),
    "priorityClassName": ("spec.runtime.priorityClassName", "spec.runtime.priorityClassName"),
    "volumes": ("spec.checkpoints.scratch", "spec.checkpoints.scratch"),
    "containers": ("spec.runtime", "spec.runtime.toolsResources"),
}
"""Where a pod field the API server names (`spec.template.spec.<field>`) comes from in the
spec, for training pods and for tool Jobs."""


def rejected(what: str, field: str, message: str) -> Blocker:
    """The API server refused a pod template in a dry run: name the spec field its message
    points at (the pod field it names), else `field`."""
    found = re.search(r"spec\.template\.spec\.([A-Za-z]+)", message)
    if found and found.group(1) in _POD_FIELDS:
        train, tools = _POD_FIELDS[found.group(1)]
        field = train if what.startswith("training") else tools
    return Blocker(
        REJECTED,
        field,
        f"{field}: the API server rejects the {what} built from this spec: {message}",
    )


ROOT_IN_USE = "StorageRootInUse"


@dataclass(frozen=True)
class RunRoots:
    """The S3 prefixes a run owns: it resumes from, prunes and overwrites what is under them.
    `order` ranks runs: one that has created children (it writes there already) before one
    that has not, then by age (creationTimestamp, then namespace/name). The earlier run keeps
    its prefixes, the later one is blocked. creationTimestamp has whole seconds, so two runs
    created in one second would otherwise be ranked by name alone, and a new run could block
    one that is already tokenizing into the prefix."""

    namespace: str
    name: str
    order: tuple[str, str, str]
    roots: tuple[tuple[str, str], ...]  # (spec field, URI)
    version: tuple[str, str] = ("", "")
    """(uid, generation) of the spec these prefixes come from: a status write does not
    change them, so a watch event with the same version needs no new validation."""

    @staticmethod
    def version_of(body: Any) -> tuple[str, str]:
        meta = body.get("metadata") or {}
        return (str(meta.get("uid") or ""), str(meta.get("generation") or ""))

    @classmethod
    def of(cls, body: Any, spec: ContinualPretrainSpec | None = None) -> RunRoots | None:
        """From a run object as the API returns it (`spec`: its spec, when the caller has
        validated it already); None when its spec is not valid (such a run fails in planning
        and never writes)."""
        meta = body.get("metadata") or {}
        if spec is None:
            try:
                spec = parse_spec(body.get("spec") or {})
            except ValueError:
                return None
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        return cls(
            ns,
            name,
            (
                "0" if (body.get("status") or {}).get("children") else "1",
                str(meta.get("creationTimestamp") or ""),
                f"{ns}/{name}",
            ),
            (
                ("spec.checkpoints.s3Uri", spec.checkpoints.s3_uri),
                ("spec.output.s3Uri", spec.output.s3_uri),
            ),
            cls.version_of(body),
        )


def shared_roots(run: RunRoots, others: Iterable[RunRoots]) -> list[Blocker]:
    """A run whose checkpoint or output prefix overlaps one of an older run's (same prefix,
    or one inside the other): it would resume from, prune or overwrite that run's
    checkpoints and model. Runs are compared across every namespace the operator sees."""
    found: list[Blocker] = []
    for other in others:
        if (other.namespace, other.name) == (run.namespace, run.name) or other.order > run.order:
            continue
        for field, uri in run.roots:
            clash = next(((f, u) for f, u in other.roots if prefixes_overlap(uri, u)), None)
            if clash is None:
                continue
            found.append(
                Blocker(
                    ROOT_IN_USE,
                    field,
                    f"{field}: {uri} overlaps {clash[0]} {clash[1]} of run "
                    f"{other.namespace}/{other.name}: the runs would resume from, prune or "
                    "overwrite each other's checkpoints and models. Give this run its own "
                    "prefix, or delete the other run first",
                )
            )
    return found


SYSTEM_PRIORITY = "SystemPriorityClass"
HOST_PATH_NOT_ALLOWED = "HostPathNotAllowed"


@dataclass(frozen=True)
class Policy:
    """What the cluster's admin allows runs (chart values, cpt_operator/settings.py)."""

    allow_system_priority_classes: bool = False
    """system-node-critical / system-cluster-critical are for the cluster's own components:
    a training gang with them would preempt DNS, CNI or the kubelet's helpers."""
    allow_host_path_scratch: bool = True
    """scratch type hostPath (an instance-store NVMe mount); off, only emptyDir and pvc."""


def policy_problems(spec: ContinualPretrainSpec, policy: Policy) -> list[Blocker]:
    found: list[Blocker] = []
    name = spec.runtime.priority_class_name
    if name and name.startswith("system-") and not policy.allow_system_priority_classes:
        field = "spec.runtime.priorityClassName"
        found.append(
            Blocker(
                SYSTEM_PRIORITY,
                field,
                f"{field}: {name!r} is a system priority class, reserved for the cluster's own "
                "components (training pods with it would preempt them); use a priority class "
                "of your own, or have the operator installed with the chart value "
                "operator.allowSystemPriorityClasses=true",
            )
        )
    scratch = spec.checkpoints.scratch
    if scratch.type == "hostPath" and not policy.allow_host_path_scratch:
        field = "spec.checkpoints.scratch.type"
        found.append(
            Blocker(
                HOST_PATH_NOT_ALLOWED,
                field,
                f"{field}: hostPath scratch is turned off for this operator (chart value "
                "operator.allowHostPathScratch); use emptyDir (with sizeLimit) or pvc",
            )
        )
    return found
