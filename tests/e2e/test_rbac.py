"""The chart's RBAC is enough to run a ContinualPretrain end to end, and no more than that.

Each test installs the chart with helm, mints a token for the chart's ServiceAccount with the
TokenRequest API (`kubectl create token`), and runs the operator as a local process exactly as
the chart's Deployment would run it (its command and env, its Secret references resolved the
way the kubelet would), with a kubeconfig that holds nothing but that token. The test then
plays the world around the operator: it applies a run as a user would, marks the training
pods done (KWOK annotations; Job pods complete by themselves) and writes the trainer's
progress.json and a committed checkpoint to S3 with the trainer's own code. Then it checks
that the run succeeds, that the operator read S3 and posted Events, and that its log holds no
permission error. Last, it asks the API server what this identity must NOT be able to do.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.cluster import Cluster, wait_for
from fixtures.s3 import S3Server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cpt"
RUN = "rbac-proof"
STEP = 10
RUN_TIMEOUT = 240.0
PERMISSION_ERROR = re.compile(r"[Ff]orbidden|HTTP/1\.1 403|status=403|Not enough permissions")
# A namespace named in a log line: an API path, or kopf's "[namespace/name]" object prefix.
NAMESPACE_IN_LOG = re.compile(
    r"/namespaces/([a-z0-9-]+)/|\[([a-z0-9-]+)/[a-z0-9.-]+\]|in namespace ([a-z0-9-]+)"
)


def concerns(line: str, namespace: str) -> bool:
    """Whether a log line is about `namespace` or about nothing namespaced at all."""
    named = {a or b or c for a, b, c in NAMESPACE_IN_LOG.findall(line)}
    return not named or namespace in named


def run_manifest(bucket: str) -> dict[str, Any]:
    """A small trn1 NxD run: preflight, tokenize, weights, one training attempt, export."""
    root = f"s3://{bucket}/cpt/{RUN}"
    return {
        "apiVersion": "cpt.dev/v1alpha1",
        "kind": "ContinualPretrain",
        "metadata": {"name": RUN},
        "spec": {
            "model": {
                "source": f"s3://{bucket}/models/small/",
                "configOverrides": {
                    "vocab_size": 32000,
                    "hidden_size": 1024,
                    "intermediate_size": 2816,
                    "num_hidden_layers": 8,
                    "num_attention_heads": 16,
                    "num_key_value_heads": 8,
                    "tie_word_embeddings": False,
                    "max_position_embeddings": 4096,
                },
            },
            "data": {
                "sources": [{"uri": f"s3://{bucket}/corpus/", "format": "jsonl"}],
                "blockSize": 1024,
                "shards": 2,
            },
            "training": {
                "instanceType": "trn1.32xlarge",
                "nodes": 1,
                "tensorParallel": 8,
                "globalBatchSize": 8,
                "maxSteps": 20,
                "optimizer": {"warmupSteps": 2},
            },
            "checkpoints": {"s3Uri": f"{root}/checkpoints/", "everySteps": STEP},
            "output": {"s3Uri": f"{root}/hf-model/"},
            "runtime": {"toolsNodeSelector": {"cpt.dev/pool": "cpu"}},
            "resiliency": {"maxAttempts": 1, "hangTimeoutSeconds": 0},
        },
    }


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_namespace(cluster: Cluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.api.create(
        "/api/v1/namespaces",
        {"metadata": {"name": name, "labels": {"cpt.dev/test": "true"}}},
        exist_ok=False,
    )
    wait_for(
        lambda: cluster.api.get_or_none(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
        timeout=30,
        what=f"ServiceAccount default in {name}",
    )
    return name


def token_kubeconfig(cluster: Cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig for the API server with a freshly minted token of `sa` and nothing else."""
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cpt-dev", "cluster": server}],
        "users": [{"name": sa, "user": {"token": token.strip()}}],
        "contexts": [
            {"name": sa, "context": {"cluster": "cpt-dev", "user": sa, "namespace": namespace}}
        ],
        "current-context": sa,
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def deployment_of(cluster: Cluster, release: str, namespace: str) -> dict[str, Any]:
    out = cluster.helm("get", "manifest", release, "--namespace", namespace).stdout
    deps = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
    assert len(deps) == 1
    return dict(deps[0])


def resolve_env(cluster: Cluster, namespace: str, env: list[dict[str, Any]]) -> dict[str, str]:
    """The container env as the kubelet would build it (values and secretKeyRefs)."""
    out: dict[str, str] = {}
    for item in env:
        if "valueFrom" not in item:
            out[item["name"]] = str(item.get("value", ""))
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        secret = json.loads(
            cluster.kubectl("get", "secret", ref["name"], "-n", namespace, "-o", "json").stdout
        )
        out[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return out


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    health_url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_operator(
    cluster: Cluster,
    release_ns: str,
    kubeconfig: Path,
    log_path: Path,
) -> OperatorProcess:
    """Run the chart's container command locally with the chart's env and the SA token."""
    dep = deployment_of(cluster, "cpt", release_ns)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    command = list(container["command"])
    assert command[:1] == ["python"], command
    argv = [sys.executable, *command[1:]]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "KUBE", "CPT_")) and k != "PYTHONPATH"
    }
    env.update(resolve_env(cluster, release_ns, container["env"]))
    env["KUBECONFIG"] = str(kubeconfig)
    env["CPT_RESYNC_SECONDS"] = "2"  # only faster; the chart's value is 10
    url = env["CPT_LIVENESS_ENDPOINT"].replace("0.0.0.0", "127.0.0.1")
    log = open(log_path, "wb")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(
        argv, cwd=str(log_path.parent), env=env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    op = OperatorProcess(proc, log_path, url)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the operator exited {proc.returncode}:\n{op.log()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_for(healthy, timeout=60, what="the operator's /healthz", interval=0.5)
    return op


def get_run(cluster: Cluster, namespace: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "continualpretrain", RUN, "-n", namespace, "-o", "json")
    return dict(json.loads(out.stdout))


def finish_pods(cluster: Cluster, namespace: str, stage: str) -> None:
    """What a healthy stage does on real nodes: KWOK completes the pods it annotates."""
    cluster.kubectl(
        "annotate", "pods", "-n", namespace, "-l", f"cpt.dev/run={RUN},cpt.dev/stage={stage}",
        "test.cpt.dev/outcome=succeed", "--overwrite",
    )  # fmt: skip


def write_training_progress(checkpoint_uri: str, workdir: Path) -> None:
    """Rank 0 of the trainer, with the trainer's own code: a committed checkpoint at STEP and
    progress.json saying so."""
    from cpt_training.checkpoint.store import upload_and_commit
    from cpt_training.progress import ProgressWriter

    tag = workdir / f"step_{STEP}"
    tag.mkdir(parents=True, exist_ok=True)
    (tag / "model.pt").write_bytes(os.urandom(2048))
    upload_and_commit(tag, f"{checkpoint_uri}step_{STEP}/", step=STEP)
    writer = ProgressWriter(f"{checkpoint_uri}progress.json", attempt=1, max_steps=20)
    writer.update(step=STEP, loss=2.5, tokens_per_sec=1000.0, force=True)
    writer.committed(STEP)


def drive_to_the_end(
    cluster: Cluster, namespace: str, checkpoint_uri: str, workdir: Path, op: OperatorProcess
) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_TIMEOUT
    seen: list[str] = []
    wrote = False
    while time.monotonic() < deadline:
        if op.proc.poll() is not None:
            raise AssertionError(f"the operator exited {op.proc.returncode}:\n{op.log()[-4000:]}")
        body = get_run(cluster, namespace)
        status = body.get("status") or {}
        phase = status.get("phase", "")
        if not seen or seen[-1] != phase:
            seen.append(phase)
        if phase in ("Succeeded", "Failed"):
            return body
        if phase == "Preflight":
            finish_pods(cluster, namespace, "preflight")
        elif phase == "Training":
            if not wrote:
                write_training_progress(checkpoint_uri, workdir)
                wrote = True
            progress = status.get("progress") or {}
            checkpoint = status.get("checkpoint") or {}
            # Let the pods finish only once the operator has read S3 with its own credentials.
            if progress.get("step") == STEP and checkpoint.get("step") == STEP:
                finish_pods(cluster, namespace, "train")
        time.sleep(1)
    raise AssertionError(
        f"the run did not finish in {RUN_TIMEOUT}s; phases {seen}; status "
        f"{json.dumps(get_run(cluster, namespace).get('status'), indent=1)[:3000]}\n"
        f"operator log tail:\n{op.log()[-4000:]}"
    )


def self_can_i(
    cluster: Cluster, kubeconfig: Path, verb: str, resource: str, namespace: str = ""
) -> bool:
    """`kubectl auth can-i` asked by the token itself (a SelfSubjectAccessReview)."""
    args = [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", "auth", "can-i"]
    args += [verb, resource]
    if namespace:
        args.append(f"--namespace={namespace}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert proc.stdout.strip() in {"yes", "no"}, proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


def as_can_i(cluster: Cluster, sa: str, verb: str, resource: str, namespace: str = "") -> bool:
    """`kubectl auth can-i --as=<sa>` asked by the admin (a SubjectAccessReview)."""
    args = ["auth", "can-i", verb, resource, f"--as={sa}"]
    if namespace:
        args.append(f"--namespace={namespace}")
    answer = str(cluster.kubectl(*args, check=False).stdout).strip()
    assert answer in {"yes", "no"}, f"can-i {verb} {resource}: {answer!r}"
    return answer == "yes"


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Installed:
    release_ns: str
    run_ns: str
    sa: str
    kubeconfig: Path
    one_namespace: bool


@pytest.fixture(params=["all-namespaces", "one-namespace"])
def installed(
    request: pytest.FixtureRequest, cluster: Cluster, s3: S3Server, namespace: str, tmp_path: Path
) -> Iterator[Installed]:
    """The chart installed in its own namespace; runs go to `namespace`."""
    one = request.param == "one-namespace"
    release_ns = new_namespace(cluster, "t-rbac-op")
    creds = "s3-credentials"
    try:
        values = ["--set", f"operator.healthPort={free_port()}"]
        if one:
            values += ["--set", f"watchNamespace={namespace}"]
        cluster.kubectl(
            "create", "secret", "generic", creds, "-n", release_ns,
            f"--from-literal=AWS_ACCESS_KEY_ID={s3.env['AWS_ACCESS_KEY_ID']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.env['AWS_SECRET_ACCESS_KEY']}",
        )  # fmt: skip
        values += [
            "--set", f"s3.endpointUrl={s3.endpoint_url}",
            "--set", f"s3.region={s3.env['AWS_DEFAULT_REGION']}",
            "--set", f"s3.credentialsSecret={creds}",
        ]  # fmt: skip
        cluster.helm("install", "cpt", str(CHART), "--namespace", release_ns, *values)
        sa = f"system:serviceaccount:{release_ns}:cpt"
        kubeconfig = token_kubeconfig(cluster, release_ns, "cpt", tmp_path / "sa.kubeconfig")
        yield Installed(release_ns, namespace, sa, kubeconfig, one)
    finally:
        cluster.helm("uninstall", "cpt", "--namespace", release_ns, check=False)
        cluster.api.delete(f"/api/v1/namespaces/{release_ns}")


# ------------------------------------------------------------------------------ tests


def test_the_charts_service_account_alone_runs_a_continual_pretrain_to_success(
    installed: Installed,
    cluster: Cluster,
    s3: S3Server,
    bucket: str,
    s3_env: S3Server,
    tmp_path: Path,
) -> None:
    op = start_operator(
        cluster, installed.release_ns, installed.kubeconfig, tmp_path / "operator.log"
    )
    try:
        manifest = run_manifest(bucket)
        cluster.kubectl("apply", "-n", installed.run_ns, "-f", "-", input=json.dumps(manifest))
        checkpoint_uri = manifest["spec"]["checkpoints"]["s3Uri"]
        body = drive_to_the_end(cluster, installed.run_ns, checkpoint_uri, tmp_path, op)
    finally:
        op.stop()
    status = body["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    # The operator read progress.json and the commit marker with the chart's S3 settings.
    assert status["checkpoint"]["step"] == STEP
    assert status["progress"]["step"] == STEP
    # Every child kind was created under the token's rights.
    children = status["children"]
    for key in ("preflight", "tokenize", "weights", "train", "export"):
        assert children.get(key), f"no {key} child recorded: {children}"
    # The operator posted Events on the run.
    events = json.loads(
        cluster.kubectl(
            "get", "events", "-n", installed.run_ns, "-o", "json",
            "--field-selector", f"involvedObject.name={RUN}",
        ).stdout
    )["items"]  # fmt: skip
    assert any(e.get("source", {}).get("component") == "cpt-operator" for e in events)
    # No permission problem in the operator's log. In all-namespaces mode it serves the whole
    # shared cluster, so lines about other tests' namespaces (e.g. one being deleted) are not
    # this test's business; cluster-scoped requests and this namespace are.
    problems = [
        line
        for line in op.log().splitlines()
        if PERMISSION_ERROR.search(line) and concerns(line, installed.run_ns)
    ]
    assert problems == [], "\n".join(problems)


def test_the_charts_service_account_cannot_reach_beyond_the_operators_needs(
    installed: Installed, cluster: Cluster
) -> None:
    kc, sa, run_ns = installed.kubeconfig, installed.sa, installed.run_ns
    denied_in_ns = [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("create", "pods/exec"),
        ("create", "serviceaccounts/token"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("delete", "continualpretrains.cpt.dev"),
    ]
    denied_cluster = [
        ("delete", "nodes"),
        ("patch", "nodes"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("escalate", "clusterroles.rbac.authorization.k8s.io"),
        ("bind", "clusterroles.rbac.authorization.k8s.io"),
        ("impersonate", "serviceaccounts"),
        ("impersonate", "users"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    for verb, res in denied_in_ns:
        for ns in (run_ns, installed.release_ns, "kube-system"):
            assert not self_can_i(cluster, kc, verb, res, ns), f"{verb} {res} in {ns}"
            assert not as_can_i(cluster, sa, verb, res, ns), f"{verb} {res} in {ns}"
    for verb, res in denied_cluster:
        assert not self_can_i(cluster, kc, verb, res), f"{verb} {res}"
        assert not as_can_i(cluster, sa, verb, res), f"{verb} {res}"
    # What it needs, it has, in the namespace it serves.
    for verb, res in [("create", "pytorchjobs.kubeflow.org"), ("create", "jobs.batch")]:
        assert self_can_i(cluster, kc, verb, res, run_ns)
    # One namespace mode: nothing namespaced anywhere else, not even in its own namespace.
    for ns in ("default", installed.release_ns):
        for verb, res in [
            ("create", "pytorchjobs.kubeflow.org"),
            ("create", "jobs.batch"),
            ("list", "continualpretrains.cpt.dev"),
            ("delete", "pods"),
        ]:
            allowed = self_can_i(cluster, kc, verb, res, ns)
            assert allowed is (not installed.one_namespace), f"{verb} {res} in {ns}"
    # And the token really is the ServiceAccount (not an admin in disguise).
    who = subprocess.run(
        [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={kc}", "auth", "whoami", "-o", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(who.stdout)["status"]["userInfo"]["username"] == sa
