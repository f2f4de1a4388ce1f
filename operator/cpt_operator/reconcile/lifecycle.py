"""The run's lifecycle on a shared cluster, beside the phase rules of decide.py: the preflight
check's measurement in the status, the nxd precompile phase (builders/precompile.py), and the
run's deadline (spec.resiliency.activeDeadlineSeconds: stop, checkpoint, fail
DeadlineExceeded, export on request)."""

from __future__ import annotations

from datetime import datetime, timedelta

from cpt_operator.api.models import (
    CheckpointStatus,
    ConditionType,
    EvalStatus,
    ExcludedNode,
    Phase,
    PreflightStatus,
    ProgressStatus,
)
from cpt_operator.builders import meta, precompile
from cpt_operator.reconcile import conditions as cond
from cpt_operator.reconcile.observe import PyTorchJobState
from cpt_operator.reconcile.recovery import Recovery


class Lifecycle(Recovery):
    """The helpers named in the module docstring, and the two the phase rules share with
    them: the status's progress and checkpoint, stopping every running stage."""

    def _refresh_progress(self) -> None:
        ckpt = self.obs.checkpoint
        prog = self.obs.progress
        if ckpt is not None:
            cur = self.status.checkpoint
            if cur is None or cur.step != ckpt.step or cur.uri != ckpt.uri:
                cur = self.status.checkpoint = CheckpointStatus(step=ckpt.step, uri=ckpt.uri)
            if prog is not None and prog.last_commit_seconds is not None:
                cur.save_seconds = round(prog.last_commit_seconds, 1)
        if prog is None:
            return
        max_steps = prog.max_steps or self.spec.max_steps()
        eta: datetime | None = None
        tokens_per_step = self.spec.training.global_batch_size * self.spec.data.block_size
        if prog.tokens_per_sec and prog.tokens_per_sec > 0 and prog.updated_at is not None:
            remaining = max(max_steps - prog.step, 0) * tokens_per_step / prog.tokens_per_sec
            eta = (prog.updated_at + timedelta(seconds=remaining)).replace(microsecond=0)
        self.status.progress = ProgressStatus(
            step=prog.step,
            max_steps=max_steps,
            step_of_max=f"{prog.step}/{max_steps}",
            loss=None if prog.loss is None else round(prog.loss, 4),
            tokens_per_sec=None if prog.tokens_per_sec is None else round(prog.tokens_per_sec, 1),
            mfu_percent=None if prog.mfu is None else round(prog.mfu * 100, 2),
            lr=prog.lr,
            eta=eta,
            updated_at=prog.updated_at.replace(microsecond=0) if prog.updated_at else None,
        )
        if prog.eval is not None:  # a new attempt's file has none until its first eval
            self.status.eval = EvalStatus.make(prog.eval.step, list(prog.eval.sources))

    def _stop_children(self) -> bool:
        """Delete the running children of every stage; True when none is left running."""
        clean = True
        for name, job in sorted(self.obs.jobs.items()):
            if job.complete or job.failed:
                continue
            clean = False
            if not job.deleting:
                self.delete("batch/v1", "Job", name)
        for name, ptj in sorted(self.obs.pytorchjobs.items()):
            if ptj.condition in ("Succeeded", "Failed"):
                continue
            clean = False
            if not ptj.deleting:
                self.delete("kubeflow.org/v1", "PyTorchJob", name)
        for pod in self.obs.training_pods():
            if pod.node_name and self._node_gone_or_not_ready(pod.node_name):
                self.delete("v1", "Pod", pod.name, grace=0)
        return clean

    def _record_preflight(self) -> None:
        """result.json into status.preflight and one Event: the measured bus bandwidth, the
        threshold, pass/fail, and the nodes whose devices failed their check."""
        raw = self.obs.preflight
        if raw is None or self.status.preflight is not None:
            return
        failing = sorted(
            {str(r.get("host", "")) for r in raw.get("ranks") or [] if r and r.get("problems")}
            - {""}
        )

        def gbps(key: str) -> float | None:
            value = raw.get(key)
            return round(float(value), 2) if isinstance(value, int | float) else None

        result = PreflightStatus(
            passed=bool(raw.get("ok")),
            bus_bandwidth_gbps=gbps("busBandwidthGbps"),
            best_bus_bandwidth_gbps=gbps("bestBusBandwidthGbps"),
            min_bus_bandwidth_gbps=self.spec.resiliency.preflight.min_bus_bandwidth_gbps,
            world_size=raw.get("worldSize") if isinstance(raw.get("worldSize"), int) else None,
            failing_nodes=failing[:256],
            problems=[str(p)[:1024] for p in (raw.get("problems") or [])[:16]],
        )
        self.status.preflight = result
        verdict = "passed" if result.passed else "failed"
        msg = (
            f"preflight {verdict}: all-reduce bus bandwidth {result.bus_bandwidth_gbps} Gbps "
            f"over {result.world_size} ranks (threshold {result.min_bus_bandwidth_gbps} Gbps)"
        )
        if failing:
            msg += f"; device check failed on {', '.join(failing)}"
        self.event("Normal" if result.passed else "Warning", "PreflightMeasured", msg)

    def _exclude_preflight_nodes(self, name: str) -> bool:
        """A preflight that failed on some nodes' devices: exclude them (status.excludedNodes,
        attempt 0, as the bad-node rule does for training) and check again on others. False
        (the run fails) when it named no node, exclusions are off, or its nodes were excluded
        already (a second failure is not the nodes')."""
        pf = self.status.preflight
        if pf is None or not pf.failing_nodes or not self._exclusions_on():
            return False
        node_of = {p.name: p.node_name for p in self.obs.pods_of(name) if p.node_name}
        known = {e.node for e in self.status.excluded_nodes}
        new = sorted({node_of[h] for h in pf.failing_nodes if h in node_of} - known)
        if not new:
            return False
        for node in new:
            self.status.excluded_nodes.append(
                ExcludedNode(
                    node=node, reason=cond.EXCLUDED_PREFLIGHT_FAILED, attempt=0, since=self.now
                )
            )
            self.event(
                "Warning",
                cond.NODE_EXCLUDED,
                f"node {node} is excluded from this run: its devices failed the preflight check",
            )
        self._bound_exclusions()
        self.delete("kubeflow.org/v1", "PyTorchJob", name)
        self.status.preflight = None  # the next check records its own measurement
        msg = f"preflight failed on node(s) {', '.join(new)}: excluded; checking again without"
        self.condition(ConditionType.PREFLIGHT_PASSED, "False", "NodesExcluded", msg)
        self.status.message = msg
        return True

    def precompiling(self) -> None:
        """neuron_parallel_compile on the training gang (builders/precompile.py), unless the
        compile cache records this layout's key already."""
        cfg = precompile.precompile_stage(self.spec, self.run.name, self.run.namespace)
        name = meta.child_name(self.run.name, "precompile")
        ptj = self.obs.pytorchjobs.get(name)
        if ptj is None and self.obs.precompiled:
            msg = f"the compile cache holds the graphs of this layout (key {cfg.cache_key})"
            self.condition(ConditionType.PRECOMPILED, "True", "CacheHit", msg)
            self.transition(Phase.TRAINING, f"{msg}; training")
            return
        if ptj is None:
            self.create(precompile.precompile_job(self.spec, self.run.ref, cfg))
            self.status.children.precompile = name
            msg = f"precompiling the training graphs into {cfg.marker_uri.rsplit('/', 2)[0]}"
            self.condition(ConditionType.PRECOMPILED, "False", "InProgress", msg)
            self.status.message = msg
            return
        if ptj.deleting or self._queued_stage(name, ptj):
            return
        if ptj.condition == "Succeeded":
            msg = f"{name} compiled the graphs (key {cfg.cache_key})"
            self.condition(ConditionType.PRECOMPILED, "True", "Compiled", msg)
            self.transition(Phase.TRAINING, f"{msg}; training")
        elif ptj.condition in ("Failed", "Restarting"):
            msg = f"{name}: {ptj.reason} {ptj.message}".strip()
            self.condition(ConditionType.PRECOMPILED, "False", cond.PRECOMPILE_FAILED, msg)
            self.fail(cond.PRECOMPILE_FAILED, msg)

    def _queued_stage(self, name: str, ptj: PyTorchJobState) -> bool:
        held = ptj.suspended
        waited = self._queue_hold("PyTorchJob", "kubeflow.org/pytorchjob", name, ptj.uid, held)
        self.status.queued_seconds += waited or 0
        return held

    # -- deadline ---------------------------------------------------------------------------

    def _past_deadline(self) -> bool:
        """spec.resiliency.activeDeadlineSeconds passed: wall clock since the run started
        (its first child follows within the same reconcile), time suspended (spec.suspend)
        or queued by Kueue excluded."""
        limit = self.spec.resiliency.active_deadline_seconds
        start = self.status.start_time
        if not limit or start is None:
            return False
        away = self.status.suspended_seconds + self.status.queued_seconds
        away += sum(a.queued_seconds for a in self.status.attempts)
        queued = cond.get(self.status, ConditionType.QUEUED)
        if queued is not None and queued.status == "True":  # held by Kueue right now
            away += int((self.now - queued.last_transition_time).total_seconds())
        return (self.now - start).total_seconds() - away >= limit

    def deadline_exceeded(self) -> None:
        """Stop every running stage (the trainer gets SIGTERM: it finishes its step and
        commits a checkpoint within its grace period), then fail DeadlineExceeded once no
        pod of it is left, with the newest committed checkpoint in the status."""
        limit = self.spec.resiliency.active_deadline_seconds
        what = f"spec.resiliency.activeDeadlineSeconds ({limit}s) reached"
        clean = self._stop_children()
        alive = [p for p in self.obs.training_pods() if p.phase not in ("Succeeded", "Failed")]
        if not clean or alive:
            msg = f"{what}: stopping the running stage (a trainer commits a checkpoint first)"
            if self.status.message != msg:
                self.status.message = msg
                self.event("Warning", cond.DEADLINE_EXCEEDED, msg)
            return
        self._refresh_progress()
        kept = self.status.checkpoint
        ckpt = f"newest committed checkpoint: step {kept.step} ({kept.uri})" if kept else "none"
        msg = f"{what}; checkpoints are kept ({ckpt})"
        self.status.deadline_exceeded_at = self.now
        if self.status.phase == Phase.TRAINING:
            self.condition(ConditionType.TRAINING, "False", cond.DEADLINE_EXCEEDED, msg)
        if self.spec.resiliency.export_on_deadline and kept is not None:
            self.transition(Phase.CONVERTING, f"{msg}; exporting it (exportOnDeadline)")
            return
        self.fail(cond.DEADLINE_EXCEEDED, msg)
