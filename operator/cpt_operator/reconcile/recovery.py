"""The training phase's recovery rules: attempt records, failure classification (pods
pending too long, bad nodes, device faults, lost or stalled progress), node exclusions, ending an
attempt and starting the next one once nothing of the last is left. The phase rule itself,
``training``, stays in decide.py's table; these are the helpers it calls."""

from __future__ import annotations

from datetime import timedelta

from cpt_operator.api.models import (
    AttemptStatus,
    CheckpointStatus,
    ConditionType,
    ExcludedNode,
)
from cpt_operator.builders import pytorchjob, stages
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.base import ReconcileBase
from cpt_operator.reconcile.observe import (
    Checkpoint,
    JobState,
    PodState,
    PyTorchJobState,
)
from cpt_training.preemption import EXIT_PREEMPTED

DEVICE_FAULT_MARKER = "cannot allocate unhealthy devices"
"""The kubelet's device manager refusing a pod because the node's device plugin reports its
accelerator devices (aws.amazon.com/neuron, vpc.amazonaws.com/efa, nvidia.com/gpu) unhealthy:
the pod fails with reason UnexpectedAdmissionError and this text in its message. Neuron
runtime and EFA errors (NRT/libfabric) only reach the container log, never the pod status, so
they are no signal here."""


def _seconds(td: timedelta) -> float:
    return td.total_seconds()


class Recovery(ReconcileBase):
    """The helpers of the Training phase (see the module docstring)."""

    def _attempt_record(self) -> AttemptStatus:
        n = self.status.attempt
        if self.status.attempts and self.status.attempts[-1].attempt == n:
            return self.status.attempts[-1]
        rec = AttemptStatus(attempt=n)
        self.status.attempts.append(rec)
        return rec

    def _pending_too_long(self, pods: list[PodState]) -> PodState | None:
        limit = self.spec.resiliency.pending_timeout_seconds
        if not limit:
            return None
        for pod in pods:
            waiting = pod.phase == "Pending" and not pod.deleting and pod.created is not None
            if waiting and pod.created and _seconds(self.now - pod.created) > limit:
                return pod
        return None

    def _tool_job_not_started(self, job: JobState) -> str:
        """Why a tool Job (tokenize, weights, export) never got going within
        pendingTimeoutSeconds, or "": a pod still Pending (unschedulable, or a container that
        cannot be created, e.g. a missing Secret), or no pod at all (the Job controller was
        refused: a ResourceQuota, a missing PriorityClass, Pod Security admission)."""
        limit = self.spec.resiliency.pending_timeout_seconds
        if not limit or job.created is None:
            return ""
        created = job.created
        queued = cond.get(self.status, ConditionType.QUEUED)
        if queued is not None and queued.status == "False":  # admitted by Kueue: from then
            created = max(created, queued.last_transition_time)
        pods = self.obs.pods_of(job.name)
        stuck = self._pending_too_long(pods)
        if stuck is not None:
            why = ": ".join(x for x in (stuck.reason, stuck.message) if x) or "not started"
            return f"Job {job.name}: pod {stuck.name} Pending for more than {limit}s: {why}"
        started = pods or job.active or job.succeeded or job.failed_pods
        if not started and _seconds(self.now - created) > limit:
            return (
                f"Job {job.name} has no pods after {limit}s: the Job controller could not "
                "create them (a ResourceQuota, a missing PriorityClass, Pod Security admission, "
                f"...; see kubectl describe job {job.name})"
            )
        return ""

    def _bad_node(self, pods: list[PodState]) -> tuple[PodState, str] | None:
        """A pod whose node is NotReady past the grace period, or gone."""
        grace = self.spec.resiliency.node_not_ready_seconds
        for pod in pods:
            if not pod.node_name or pod.phase in ("Succeeded", "Failed"):
                continue
            node = self.obs.nodes.get(pod.node_name)
            if node is None:
                return pod, f"node {pod.node_name} of pod {pod.name} no longer exists"
            if not node.ready:
                since = node.since or self.now
                if _seconds(self.now - since) >= grace:
                    return pod, (
                        f"node {pod.node_name} of pod {pod.name} NotReady since "
                        f"{since.isoformat()} ({node.reason or 'no reason'})"
                    )
        return None

    def _failed_nodes(self, pods: list[PodState]) -> list[tuple[str, str, str]]:
        """(node, exclusion reason, why) for every node of `pods` that failed the attempt:
        gone, NotReady past the grace period, or refusing a pod for unhealthy devices."""
        grace = self.spec.resiliency.node_not_ready_seconds
        found: dict[str, tuple[str, str]] = {}
        for pod in pods:
            if not pod.node_name or pod.node_name in found:
                continue
            node = self.obs.nodes.get(pod.node_name)
            if node is None:
                found[pod.node_name] = (cond.EXCLUDED_GONE, "the node no longer exists")
            elif not node.ready and _seconds(self.now - (node.since or self.now)) >= grace:
                found[pod.node_name] = (
                    cond.EXCLUDED_NOT_READY,
                    f"NotReady for {grace}s or more ({node.reason or 'no reason'})",
                )
            elif pod.phase == "Failed" and DEVICE_FAULT_MARKER in pod.message:
                found[pod.node_name] = (
                    cond.EXCLUDED_DEVICE_UNHEALTHY,
                    f"the kubelet refused pod {pod.name}: {pod.message}",
                )
        return [(node, reason, why) for node, (reason, why) in found.items()]

    def _exclusions_on(self) -> bool:
        return self.spec.resiliency.exclude_failed_nodes

    def _exclude_failed_nodes(self, name: str, attempt: int) -> None:
        """Record the nodes attempt `attempt` failed on, so later attempts avoid them even
        once they are Ready again (a NotReady taint goes away with the condition)."""
        if not self._exclusions_on():
            return
        known = {e.node for e in self.status.excluded_nodes}
        for node, reason, why in self._failed_nodes(self.obs.pods_of(name)):
            if node in known:
                continue
            known.add(node)
            self.status.excluded_nodes.append(
                ExcludedNode(node=node, reason=reason, attempt=attempt, since=self.now)
            )
            self.event(
                "Warning",
                cond.NODE_EXCLUDED,
                f"node {node} is excluded from the later attempts of this run: {reason} in "
                f"attempt {attempt}: {why}",
            )
        self._bound_exclusions()

    def _bound_exclusions(self) -> None:
        """At most maxExcludedNodes: the oldest exclusions drop out (their nodes may be used
        again), so a run on a small or churning node group cannot exclude itself off it."""
        limit = self.spec.resiliency.max_excluded_nodes
        while len(self.status.excluded_nodes) > limit:
            old = self.status.excluded_nodes.pop(0)
            self.event(
                "Normal",
                cond.NODE_EXCLUSION_DROPPED,
                f"node {old.node} (excluded after attempt {old.attempt}: {old.reason}) may be "
                f"used again: at most {limit} nodes are excluded "
                "(spec.resiliency.maxExcludedNodes)",
            )

    def _excluded_nodes(self) -> list[ExcludedNode]:
        """The exclusions the current attempt was built with (recorded by earlier attempts)."""
        if not self._exclusions_on():
            return []
        n = self.status.attempt
        return [e for e in self.status.excluded_nodes if e.attempt < n]

    def _node_gone_or_not_ready(self, node_name: str) -> bool:
        node = self.obs.nodes.get(node_name)
        return node is None or not node.ready

    def _failure_of(self, name: str, ptj: PyTorchJobState) -> tuple[str, str] | None:
        if ptj.deleting:
            return cond.JOB_DELETED, f"PyTorchJob {name} is being deleted outside the operator"
        pods = self.obs.pods_of(name)
        preempted = self._preemption_of(pods)
        if preempted:
            return cond.PREEMPTED, preempted
        # A failed pod says more (which replica, exit code) than the job's generic "backoff
        # limit reached", and the job keeps failed pods: report the pod whichever came first.
        for pod in pods:
            if pod.phase == "Failed":
                code = "" if pod.exit_code is None else f" (exit code {pod.exit_code})"
                why = f": {pod.reason} {pod.message}".rstrip() if pod.reason or pod.message else ""
                return cond.POD_FAILED, f"pod {pod.name} failed{code}{why}"
        if ptj.condition == "Failed":
            return cond.JOB_FAILED, f"PyTorchJob {name} failed: {ptj.reason} {ptj.message}".strip()
        if ptj.condition == "Restarting":
            return cond.JOB_RESTARTING, f"PyTorchJob {name} is restarting pods: {ptj.message}"
        bad = self._bad_node(pods)
        if bad is not None:
            return cond.NODE_NOT_READY, bad[1]
        stuck = self._pending_too_long(pods)
        if stuck is not None:
            limit = self.spec.resiliency.pending_timeout_seconds
            excluded = self._excluded_nodes()
            note = ""
            if excluded:
                # The scheduler only says "didn't match Pod's node affinity/selector".
                names = ", ".join(f"{e.node} ({e.reason} in attempt {e.attempt})" for e in excluded)
                nodes = "1 node is" if len(excluded) == 1 else f"{len(excluded)} nodes are"
                note = (
                    f"; {nodes} excluded by this run after failing an earlier attempt: {names} "
                    "(status.excludedNodes; spec.resiliency.excludeFailedNodes, maxExcludedNodes)"
                )
            return cond.PENDING_TIMEOUT, (
                f"pod {stuck.name} Pending for more than {limit}s: "
                f"{stuck.message or stuck.reason or 'not scheduled'}{note}"
            )
        limit = self.spec.resiliency.pending_timeout_seconds
        live = [p for p in pods if not p.deleting]
        expected = self.spec.training.nodes
        admitted = self._attempt_record().admitted_time
        created = max(ptj.created, admitted) if ptj.created and admitted else ptj.created
        if limit and created and len(live) < expected and _seconds(self.now - created) > limit:
            # Pods the training operator cannot create never show up as Pending.
            return cond.PENDING_TIMEOUT, (
                f"PyTorchJob {name} has {len(live)} of {expected} pods after {limit}s: "
                "the training operator could not create the others (Pod Security "
                f"admission, a ResourceQuota, ...; see kubectl describe pytorchjob {name})"
            )
        return None

    def _preemption_of(self, pods: list[PodState]) -> str:
        """Why the attempt is being stopped from outside with a chance to checkpoint, or "":
        a pod the cluster is disrupting (DisruptionTarget: a scheduler preemption, an eviction
        or drain), that stopped with the trainer's EXIT_PREEMPTED, or deleted with its grace
        period. A pod that failed otherwise makes it a failure: the deletions that follow one
        (the training operator stops the other replicas) are not a preemption. A pod on a
        NotReady or vanished node is a node failure, not this."""
        pods = [p for p in pods if not (p.node_name and self._node_gone_or_not_ready(p.node_name))]
        for pod in pods:
            if pod.disruption:
                return f"pod {pod.name} is being stopped by the cluster ({pod.disruption})"
            if pod.phase == "Failed" and pod.exit_code == EXIT_PREEMPTED:
                return (
                    f"pod {pod.name} stopped on SIGTERM after committing a checkpoint "
                    f"(exit code {EXIT_PREEMPTED})"
                )
        if any(p.phase == "Failed" for p in pods):
            return ""
        for pod in pods:
            if pod.deleting and pod.phase not in ("Succeeded", "Failed"):
                return f"pod {pod.name} was deleted; its trainer checkpoints in its grace period"
        return ""

    def _queued(self, name: str, ptj: PyTorchJobState, rec: AttemptStatus) -> bool:
        """Kueue holds the attempt's job suspended (waiting for quota, or preempted by a
        higher-priority workload: its pods get SIGTERM and the trainer checkpoints): condition
        Queued with Kueue's reason, no pending or hang clock, no attempt spent. Once admitted
        the same job runs again and the trainer resumes from its newest commit."""
        held = ptj.suspended and not ptj.deleting
        waited = self._queue_hold("PyTorchJob", "kubeflow.org/pytorchjob", name, ptj.uid, held)
        if waited is not None:
            rec.admitted_time = self.now
            rec.queued_seconds += waited
        if held:
            rec.running_since = rec.last_step = rec.last_step_time = None
        return held

    def _queue_hold(
        self, kind: str, integration: str, name: str, uid: str, held: bool
    ) -> int | None:
        """Condition Queued for a child Kueue holds (`held`: suspended), with Kueue's reason
        from its Workload and one Queued event per reason. Returns the seconds it waited when
        it was just admitted, else None."""
        queued = cond.get(self.status, ConditionType.QUEUED)
        if not held:
            if queued is None or queued.status != "True":
                return None
            waited = max(int((self.now - queued.last_transition_time).total_seconds()), 0)
            self.condition(ConditionType.QUEUED, "False", "Admitted", f"{name} admitted")
            self.status.message = f"{kind} {name} admitted by Kueue"
            return waited
        queue = self.spec.runtime.kueue_queue_name
        wl = self.obs.workloads.get(uid)
        if wl is None:
            reason = "WaitingForKueue"
            msg = (
                f"{kind} {name} is suspended and has no Kueue Workload yet (is Kueue running "
                f"with the {integration} integration, and does LocalQueue {queue} exist?)"
            )
        else:
            reason = wl.reason or "Pending"
            msg = f"{kind} {name} queued in LocalQueue {queue}"
            msg += f": {wl.message}" if wl.message else ""
        if queued is None or queued.status != "True" or queued.reason != reason:
            self.event("Normal", "Queued", msg)
        self.condition(ConditionType.QUEUED, "True", reason, msg)
        self.status.message = msg
        return None

    def _failures(self) -> int:
        """Ended attempts that count against maxAttempts (preemptions do not)."""
        done = (cond.PREEMPTED, cond.COMPLETED, "")
        return sum(1 for a in self.status.attempts if a.end_time and a.reason not in done)

    def _track_progress(self, name: str, rec: AttemptStatus) -> tuple[str, str] | None:
        """Update the hang clock; a failure when the attempt made no step progress for
        hangTimeoutSeconds after all its pods were Running."""
        pods = [p for p in self.obs.pods_of(name) if not p.deleting]
        expected = self.spec.training.nodes
        if rec.running_since is None:
            if len(pods) >= expected and all(p.phase == "Running" for p in pods):
                rec.running_since = self.now
            return None
        prog = self.obs.progress
        ours = prog is not None and (prog.attempt is None or prog.attempt == rec.attempt)
        if prog is not None and ours and (rec.last_step is None or prog.step != rec.last_step):
            rec.last_step = prog.step
            rec.last_step_time = self.now
        limit = self.spec.resiliency.hang_timeout_seconds
        if self.obs.storage_error:
            # Without progress.json we cannot tell a hang from an unreachable S3; the trainer
            # could not report either, so it gets a whole timeout again once S3 is back.
            rec.last_step_time = self.now
            return None
        if not limit:
            return None
        clock = max(rec.running_since, rec.last_step_time or rec.running_since)
        if _seconds(self.now - clock) > limit:
            step = "no step yet" if rec.last_step is None else f"still at step {rec.last_step}"
            return cond.HANG, f"no training progress for more than {limit}s ({step})"
        return None

    def _end_attempt(self, name: str, reason: str, message: str) -> None:
        n = self.status.attempt
        max_attempts = self.spec.resiliency.max_attempts
        rec = self._attempt_record()
        rec.end_time = self.now
        rec.reason, rec.message = reason, message
        failures = self._failures()
        if reason == cond.PREEMPTED:
            self.event("Normal", "AttemptPreempted", f"attempt {n}: {message}")
        else:
            label = f"{n} of" if failures == n else f"{n} (failure {failures} of"
            label += f" {max_attempts}" + ("" if failures == n else ")")
            self.event("Warning", "AttemptFailed", f"attempt {label}: {reason}: {message}")
        self._exclude_failed_nodes(name, n)
        self._teardown(keep=None)
        if reason != cond.PREEMPTED and failures >= max_attempts:
            msg = f"all {max_attempts} training attempts failed; the last one: {reason}: {message}"
            self.condition(ConditionType.TRAINING, "False", cond.MAX_ATTEMPTS_EXCEEDED, msg)
            self.fail(cond.MAX_ATTEMPTS_EXCEEDED, msg)
            return
        self.status.attempt = n + 1
        self.status.children.train = None
        self._attempt_record()
        if reason == cond.PREEMPTED:
            msg = (
                f"attempt {n} preempted; attempt {n + 1} resumes from its checkpoint once its "
                "pods are gone (preemptions do not count against maxAttempts)"
            )
        else:
            msg = f"attempt {n} failed ({reason}); starting attempt {n + 1} of {max_attempts}"
            if failures != n:
                msg = (
                    f"attempt {n} failed ({reason}); starting attempt {n + 1} "
                    f"({failures} of {max_attempts} failures used)"
                )
        self.condition(ConditionType.TRAINING, "False", reason, msg)
        self.status.message = msg
        self.event("Normal", "Restarting", msg)

    def _teardown(self, keep: str | None) -> bool:
        """Delete every training PyTorchJob except `keep`, force-delete their pods stuck on
        NotReady or vanished nodes. True when nothing of them is left."""
        clean = True
        for name, ptj in sorted(self.obs.pytorchjobs.items()):
            if name == keep or ptj.attempt is None:
                continue
            clean = False
            if not ptj.deleting:
                self.delete("kubeflow.org/v1", "PyTorchJob", name)
        for pod in self.obs.training_pods():
            if keep is not None and pod.owner_name == keep:
                continue
            clean = False
            if pod.node_name and self._node_gone_or_not_ready(pod.node_name):
                self.delete("v1", "Pod", pod.name, grace=0)
            elif not pod.deleting and pod.owner_name not in self.obs.pytorchjobs:
                # An orphan (its job is already gone): the GC would get it, we are quicker.
                self.delete("v1", "Pod", pod.name)
        return clean

    def _grace_seconds(self) -> int:
        """The pods' grace period: from the plan's step time and checkpoint size, and the
        save time the last commit took where progress.json reported one."""
        plan = self.status.plan
        prog = self.obs.progress
        known = self.status.checkpoint.save_seconds if self.status.checkpoint else None
        measured = prog.last_commit_seconds if prog is not None else None
        return pytorchjob.termination_grace_seconds(
            self.spec,
            step_seconds=plan.est_step_seconds if plan else None,
            checkpoint_gib=plan.checkpoint_size_gib if plan else None,
            save_seconds=measured if measured is not None else known,
        )

    def _start_attempt(self, name: str, rec: AttemptStatus) -> None:
        ckpt = self.obs.checkpoint
        if ckpt is None and self.obs.storage_error and self.status.checkpoint is not None:
            # S3 unreadable right now: record the newest commit we know of, not "none" (the
            # trainer finds the real one itself when it starts).
            known = self.status.checkpoint
            ckpt = Checkpoint(step=known.step, uri=known.uri)
        if ckpt is not None:
            self.status.resume_from = CheckpointStatus(step=ckpt.step, uri=ckpt.uri)
            rec.resume_from_step = ckpt.step
        else:
            self.status.resume_from = None
            rec.resume_from_step = None
        cfg = stages.train_stage(self.spec, self.run.name, self.status.attempt, self.run.namespace)
        if self._exclusions_on():
            self._bound_exclusions()  # maxExcludedNodes may have been lowered since
        avoid = [e.node for e in self._excluded_nodes()]
        self.create(
            pytorchjob.training_job(
                self.spec,
                self.run.ref,
                cfg,
                resume_step=ckpt.step if ckpt else None,
                resume_uri=ckpt.uri if ckpt else None,
                exclude_nodes=avoid,
                grace_seconds=self._grace_seconds(),
            )
        )
        rec.start_time = self.now
        rec.running_since = rec.last_step = rec.last_step_time = None
        self.status.children.train = name
        frm = (
            f"resuming from step {ckpt.step} ({ckpt.uri})"
            if ckpt
            else "starting from the base model"
        )
        msg = f"attempt {self.status.attempt} of {self.spec.resiliency.max_attempts}: {frm}"
        self.status.message = msg
        self.condition(ConditionType.TRAINING, "True", "AttemptRunning", msg)
        avoiding = f"; avoiding node(s) {', '.join(avoid)} (status.excludedNodes)" if avoid else ""
        self.event("Normal", "AttemptStarted", f"created PyTorchJob {name}; {frm}{avoiding}")
