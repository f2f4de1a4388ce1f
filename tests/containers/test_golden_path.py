"""The golden path in real containers: `helm install`, then a tiny native run to a model.

The operator pod (from the chart as it renders) and every stage of the run (the tokenize
Job, a Master-only PyTorchJob with 2 gloo processes, the export Job) run as real containers
of the images `make images` built, on the real kubelet node (tests/fixtures/node.py). The run
reaches Succeeded, `kubectl get cpt` shows its step and loss, and the Hugging Face model it
wrote to S3 loads with `from_pretrained` and generates.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from containers.harness import (
    MAX_STEPS,
    RUN,
    OperatorRelease,
    container_statuses,
    describe,
    image_of,
    tiny_run,
)
from e2e.harness import REAL_VOCAB, Runs, download_prefix, prepare_real_inputs

from fixtures.cluster import Cluster, wait_for
from fixtures.node import RealNode
from fixtures.s3 import S3Server

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]


def run_pods(runs: Runs, component: str) -> list[dict[str, Any]]:
    return [p for p in runs.pods(f"cpt.dev/run={RUN}") if component in p["metadata"]["name"]]


def test_operator_pod_runs_as_the_chart_renders_it(
    real_node: RealNode, operator_release: OperatorRelease, cluster: Cluster
) -> None:
    pod = operator_release.running_pod()
    ns = operator_release.namespace
    spec = pod["spec"]
    assert spec["nodeName"] == real_node.name
    assert image_of(pod) in real_node.refs("operator")
    ctx = spec["containers"][0]["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
    # In-cluster config through the mounted token: kopf logged in and its watches started.
    # Ready alone proves little (no readiness probe by default: Ready once the process runs).
    name = pod["metadata"]["name"]
    wait_for(
        lambda: (
            "Initial authentication has finished" in operator_release.logs(name)
            or (container_statuses(operator_release.pods()[0]) or [{}])[0].get("restartCount")
        ),
        timeout=120,
        what="the operator's kopf login",
    )
    log = operator_release.logs(name)
    (status,) = container_statuses(cluster.api.get(f"/api/v1/namespaces/{ns}/pods/{name}"))
    previous = operator_release.logs(name, previous=True)
    assert status["restartCount"] == 0 and "Traceback" not in log, (log + previous)[-3000:]
    # kopf logs in through the kubernetes client's in-cluster config when that client is
    # installed (the operator's client), else through its own ServiceAccount login: both read
    # the mounted token, and the pod has no kubeconfig.
    assert re.search(r"login_(via_client|with_service_account)' succeeded", log), log[-3000:]
    env = {e["name"] for e in spec["containers"][0].get("env") or []}
    assert "KUBECONFIG" not in env


def test_a_tiny_native_run_goes_from_helm_install_to_a_model_that_generates(
    real_node: RealNode,
    operator_release: OperatorRelease,
    runs: Runs,
    cluster: Cluster,
    bucket: str,
    s3: S3Server,
) -> None:
    prepare_real_inputs(s3, bucket)
    runs.create(
        tiny_run(real_node.selector, real_node.tolerations, bucket, real_node.reachable(s3))
    )
    try:
        status = runs.wait_phase(RUN, "Succeeded", timeout=1200)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, runs.ns)}") from None
    assert status["checkpoint"]["step"] == MAX_STEPS

    # Every stage ran as a real container of the images `make images` built, on the node.
    tools = set(real_node.refs("trainer-cpu"))
    for component in ("tokenize", "train", "export"):
        pods = run_pods(runs, f"-{component}")
        assert pods, f"no {component} pod"
        for pod in pods:
            assert pod["spec"]["nodeName"] == real_node.name, pod["metadata"]["name"]
            assert image_of(pod) in tools, image_of(pod)
            for st in container_statuses(pod):
                term = st["state"].get("terminated") or {}
                assert term.get("exitCode") == 0, (pod["metadata"]["name"], st)
    master = run_pods(runs, "-train-1-master-0")[0]["metadata"]["name"]
    logs = cluster.kubectl("logs", "-n", runs.ns, master).stdout
    assert "step" in logs, logs[-2000:]

    # `kubectl get cpt` shows the run with its step and loss (the CRD's printer columns).
    table = cluster.kubectl("get", "cpt", RUN, "-n", runs.ns).stdout.splitlines()
    header, row = table[0].split(), dict(zip(table[0].split(), table[1].split(), strict=False))
    assert "STEP" in header and "LOSS" in header, table
    assert row["STEP"] == f"{MAX_STEPS}/{MAX_STEPS}" and float(row["LOSS"]) > 0, table

    # The Hugging Face model in S3 loads with plain transformers and generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        keys = download_prefix(s3, bucket, f"models/{RUN}/", Path(tmp))
        assert f"models/{RUN}/_SUCCESS" in keys
        model = AutoModelForCausalLM.from_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
        ids = tok("Document 1. the model reads", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        assert out.shape[-1] == ids["input_ids"].shape[-1] + 8
        assert model.config.vocab_size == REAL_VOCAB
