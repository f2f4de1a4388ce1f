"""Pod Security Standards: what cpt's pods need, proven against the real admission plugin.

The kube-apiserver's PodSecurity admission (on by default) enforces a namespace's
`pod-security.kubernetes.io/enforce` level on every pod, including the pods the Job controller
and the training operator create. These tests label namespaces and show:

* tokenize/export Job pods and a single-node (Master only) training pod are admitted under
  `restricted`: a CPU run goes through to Succeeded there;
* a trn1 run is refused by the operator before it creates anything, naming IPC_LOCK (EFA),
  in `restricted` and in `baseline`;
* the operator's pre-check says what admission really does: a pod with cpt's own trn1 training
  template is rejected for IPC_LOCK, and the training operator's Worker pods (its injected
  `init-pytorch` container has no securityContext) are never created under `restricted`, while
  `baseline` admits them (a multi-node CPU run trains there).
"""

from __future__ import annotations

from typing import Any

import pytest
from e2e.harness import Runs, spec_body
from e2e.test_operator_pipeline import finish_gang

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.builders import pytorchjob, stages
from cpt_operator.builders.jobs import RunRef
from fixtures.cluster import ApiError, wait_for

pytestmark = pytest.mark.e2e

ENFORCE = "pod-security.kubernetes.io/enforce"
BUCKET = "psa-bucket"


def enforce(runs: Runs, level: str) -> None:
    runs.api.patch(
        f"/api/v1/namespaces/{runs.ns}",
        {"metadata": {"labels": {ENFORCE: level, f"{ENFORCE}-version": "latest"}}},
    )


def cpu_run(name: str, *, nodes: int, bucket: str = BUCKET) -> dict[str, Any]:
    """A native run on CPU nodes: no accelerator, no EFA, emptyDir scratch."""
    return spec_body(
        name,
        bucket,
        training__instanceType="local-cpu",
        training__nodes=nodes,
        training__processesPerNode=1,
        training__tensorParallel=1,
        training__pipelineParallel=1,
        training__globalBatchSize=8,
        training__maxSteps=10,
        runtime__nodeSelector={"cpt.dev/pool": "cpu"},
        resiliency={"preflight": {"enabled": False}, "maxAttempts": 1},
    )


def admitted_pods(runs: Runs, run: str) -> list[dict[str, Any]]:
    return runs.pods(f"cpt.dev/run={run}")


def test_tool_jobs_and_a_single_node_training_pod_run_in_a_restricted_namespace(
    runs: Runs, bucket: str
) -> None:
    enforce(runs, "restricted")
    runs.create(cpu_run("strict", nodes=1, bucket=bucket))
    runs.wait_phase("strict", "Training", timeout=90)
    runs.training_pods("strict", 1, count=1)
    finish_gang(runs, "strict", "strict-train-1", count=1)
    runs.wait_phase("strict", "Succeeded", timeout=90)
    stages_seen = {p["metadata"]["labels"]["cpt.dev/stage"] for p in admitted_pods(runs, "strict")}
    assert stages_seen == {"tokenize", "train", "export"}, stages_seen
    for pod in admitted_pods(runs, "strict"):
        sc = pod["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["spec"]["containers"]:
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("level", ["restricted", "baseline"])
def test_a_trn1_run_in_an_enforcing_namespace_fails_before_creating_anything(
    level: str, runs: Runs
) -> None:
    enforce(runs, level)
    runs.create(spec_body("efa", BUCKET, resiliency={"preflight": {"enabled": False}}))
    status = runs.wait_phase("efa", "Failed", timeout=60)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodSecurityViolation"
    for text in ("IPC_LOCK", f"Pod Security level '{level}'", f"{ENFORCE}=privileged"):
        assert text in failed["message"], failed["message"]
    if level == "restricted":
        assert "init container" in failed["message"]
    assert runs.child_names("efa") == [] and admitted_pods(runs, "efa") == []
    assert any(e["type"] == "Warning" and "IPC_LOCK" in e["message"] for e in runs.events("efa"))


def _training_job(name: str, body: dict[str, Any], namespace: str) -> dict[str, Any]:
    """cpt's own training PyTorchJob for `body`, built by the operator's builder."""
    spec = ContinualPretrainSpec.model_validate(body["spec"])
    run = RunRef(name, namespace, "00000000-0000-4000-8000-0000000000aa")
    job = pytorchjob.training_job(spec, run, stages.train_stage(spec, name, 1, namespace))
    job["metadata"].pop("ownerReferences")
    job["metadata"]["namespace"] = namespace
    return job


def test_the_pre_check_matches_what_pod_security_admission_really_does(runs: Runs) -> None:
    ns = runs.ns
    # 1. cpt's trn1 training pod template, as a bare pod: IPC_LOCK is refused.
    for level in ("restricted", "baseline"):
        enforce(runs, level)
        job = _training_job("efa-direct", spec_body("efa-direct", BUCKET), ns)
        template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        pod = {
            "metadata": {"name": f"efa-{level}", **template["metadata"]},
            "spec": template["spec"],
        }
        with pytest.raises(ApiError) as err:
            runs.api.create(f"/api/v1/namespaces/{ns}/pods", pod)
        assert err.value.status == 403 and "IPC_LOCK" in str(err.value), err.value

    # 2. A 2-node CPU PyTorchJob: the training operator cannot create the Worker under
    #    restricted (its init container), while the Master (no init container) is admitted.
    enforce(runs, "restricted")
    job = _training_job("two", cpu_run("two", nodes=2), ns)
    runs.api.create(f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs", job)
    child = job["metadata"]["name"]
    replicas = f"training.kubeflow.org/job-name={child},training.kubeflow.org/replica-type"

    def refused() -> list[str]:
        path = f"/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name={child}"
        return [
            e["message"]
            for e in runs.api.get(path)["items"]
            if "violates PodSecurity" in e["message"] and "init-pytorch" in e["message"]
        ]

    wait_for(refused, timeout=60, what="the training operator's FailedCreate naming init-pytorch")
    # The operator creates the replicas in no fixed order: the Worker's refusal can come first.
    wait_for(lambda: runs.pods(f"{replicas}=master"), timeout=60, what="the admitted master pod")
    assert runs.pods(f"{replicas}=worker") == []

    # ... and baseline admits the Worker, whose injected init container has no securityContext.
    enforce(runs, "baseline")
    worker = wait_for(
        lambda: runs.pods(f"{replicas}=worker"),
        timeout=90,
        what="the worker pod once the namespace is baseline",
    )[0]
    inits = worker["spec"].get("initContainers") or []
    assert [c["name"] for c in inits] == ["init-pytorch"]
    assert (inits[0].get("securityContext") or {}).get("allowPrivilegeEscalation") is not False


def test_a_multi_node_cpu_run_trains_in_a_baseline_namespace(runs: Runs, bucket: str) -> None:
    enforce(runs, "baseline")
    runs.create(cpu_run("wide", nodes=2, bucket=bucket))
    status = runs.wait_phase("wide", "Training", timeout=90)
    assert not any(c["type"] == "Failed" and c["status"] == "True" for c in status["conditions"])
    runs.training_pods("wide", 1, count=2, timeout=90)
