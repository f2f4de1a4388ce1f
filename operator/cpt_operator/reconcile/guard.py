"""Before a pass acts: which spec and which status it may trust (the I/O side of
reconcile/accept.py and reconcile/trust.py; handlers.reconcile calls `begin` and `finish`).

`spec_problems` is the one check a spec passes before the operator acts on it, at creation
(the planning phase) and for every later generation: the models (strict types, as the API
server), the planner in cluster mode, the cross-run storage check, the admin's policy, and the
cluster facts (Secrets, Pod Security, a server-side dry run of the pod templates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from cpt_operator.api import planner
from cpt_operator.api.models import ContinualPretrainSpec, Phase, parse_spec
from cpt_operator.kube import KubeApi
from cpt_operator.reconcile import accept, admission, conditions, trust
from cpt_operator.reconcile.actions import EmitEvent
from cpt_operator.reconcile.admission import Blocker, Policy, RunRoots
from cpt_operator.reconcile.observe import observe
from cpt_operator.reconcile.status import RunMeta, dump_status, format_validation_error, load_status

TERMINAL = {Phase.SUCCEEDED.value, Phase.FAILED.value}


def cluster_blockers(
    kube: KubeApi,
    body: Mapping[str, Any],
    spec: ContinualPretrainSpec,
    others: Sequence[RunRoots],
    policy: Policy,
) -> list[Blocker]:
    """What must hold before the operator acts on `spec` (reconcile/admission.py): the
    admin's policy, its Secrets exist, the namespace's Pod Security level admits its pods, no
    older run owns its S3 prefixes, and the API server accepts its pod templates (server-side
    dry run). Facts the operator may not read (no RBAC) block nothing."""
    run = RunMeta.of(body)
    ns = run.namespace
    found = admission.policy_problems(spec, policy)
    found += [
        admission.missing_secret(field_, secret, ns)
        for field_, secret in admission.secret_refs(spec)
        if kube.secret_exists(ns, secret) is False
    ]
    found += admission.pod_security_problems(spec, kube.pod_security_level(ns))
    mine = RunRoots.of(body, spec)
    if mine is not None:
        found += admission.shared_roots(mine, others)
    for what, field_, manifest in admission.dry_run_manifests(spec, run.ref):
        if message := kube.dry_run_create(manifest, ns):
            found.append(admission.rejected(what, field_, message))
    return found


def spec_problems(
    kube: KubeApi,
    body: Mapping[str, Any],
    spec_raw: Mapping[str, Any],
    others: Sequence[RunRoots],
    policy: Policy,
    *,
    cluster: bool = True,
) -> list[Blocker]:
    """Every problem of `spec_raw` as the spec of `body`'s run (see the module docstring);
    without `cluster`, no look at Secrets, Pod Security or dry runs."""
    try:
        spec = parse_spec(dict(spec_raw))
    except ValidationError as err:
        return [Blocker(conditions.INVALID_SPEC, "spec", format_validation_error(err))]
    result = planner.plan(spec, mode="cluster")
    if result.errors:
        return [Blocker(conditions.INVALID_SPEC, e.field, str(e)) for e in result.errors]
    run_body = {**body, "spec": dict(spec_raw)}
    if not cluster:
        mine = RunRoots.of(run_body, spec)
        found = admission.policy_problems(spec, policy)
        return found + (admission.shared_roots(mine, others) if mine is not None else [])
    return cluster_blockers(kube, run_body, spec, others, policy)


@dataclass
class Start:
    """What the pass starts from: the status (maybe revived or repaired), the spec to act on
    (None: none acceptable), the verdict to report, the Events so far."""

    status: dict[str, Any]
    spec: dict[str, Any] | None
    verdict: accept.Verdict | None
    events: list[EmitEvent] = field(default_factory=list)
    memory: accept.Memory = field(default_factory=accept.Memory)


def begin(
    kube: KubeApi,
    body: Mapping[str, Any],
    others: Sequence[RunRoots],
    memory: accept.Memory,
    policy: Policy,
    now: datetime,
    *,
    verify_terminal: bool = False,
) -> Start | None:
    """None: a terminal run with nothing to do (no new generation, or its status is its own)."""
    status: dict[str, Any] = dict(body.get("status") or {})
    meta = body.get("metadata") or {}
    generation = int(meta.get("generation") or 1)

    def check(spec_raw: Mapping[str, Any], cluster: bool) -> list[Blocker]:
        return spec_problems(kube, body, spec_raw, others, policy, cluster=cluster)

    events: list[EmitEvent] = []
    if status.get("phase") in TERMINAL:
        model = load_status(status)
        why = None
        if verify_terminal:
            jobs, ptjs = kube.list_children(str(meta["namespace"]), str(meta["name"]))
            why = trust.repair_terminal(model, observe(jobs=jobs, pytorchjobs=ptjs), meta["name"])
        if why is not None:
            events.append(EmitEvent("Warning", trust.STATUS_REPAIRED, why))
        elif status.get("observedGeneration") == generation:
            return None
        else:
            verdict = accept.choose(body, memory, check)
            if verdict.rejected or verdict.spec is None:
                return Start(status, None, verdict, memory=memory)
            revived, why = trust.revive(model, parse_spec(verdict.spec), generation, now)
            model.observed_generation = generation
            if revived:
                events.append(EmitEvent("Normal", trust.REVIVED, f"Failed → Pending: {why}"))
            else:
                events.append(EmitEvent("Warning", trust.NOT_REVIVED, why))
            if not revived:
                return Start(dump_status(model), None, verdict, events, memory)
        status = dump_status(model)
        body = {**body, "status": status}
    verdict = accept.choose(body, memory, check)
    return Start(status, verdict.spec, verdict, events, memory)


def finish(
    start: Start,
    decided: dict[str, Any] | None,
    spec: Mapping[str, Any],
    generation: int,
    now: datetime,
) -> tuple[dict[str, Any], list[EmitEvent]]:
    """The status to write (the decision's, or the starting one when nothing was decided)
    with the verdict recorded, and the verdict's Events."""
    model = load_status(decided if decided is not None else start.status)
    events = list(start.events)
    if start.verdict is not None:
        events += accept.report(model, start.verdict, generation, now.replace(microsecond=0), spec)
        if start.verdict.first and model.accepted_spec is not None:
            start.memory.remember_ok(spec)  # planning checked it
    if decided is None:
        model.observed_generation = generation
    return dump_status(model), events
