"""`make demo-cluster`: the operator itself on one machine, as a user meets it.

    python hack/node/demo_cluster.py up     # control plane, real node, images, helm, a run
    python hack/node/demo_cluster.py down   # the run, the release, the node, the S3 server

`up` brings up the local control plane (hack/devcluster) with the real kubelet node
(node.py), builds or reuses the images (hack/images/imagebuild.py), starts a loopback S3 server
with a tiny Llama, its tokenizer and a small corpus in it, `helm install`s charts/cpt, applies
a tiny native run and follows it with `kubectl get cpt -w` until it is Succeeded (or Failed),
then prints the commands to look around. Everything it starts keeps running until `down`.
The inputs and the run are the ones tests/containers/ uses (tests/containers/harness.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (HERE, REPO / "hack" / "devcluster", REPO / "hack" / "images", REPO / "tests"):
    sys.path.insert(0, str(p))

import devcluster  # noqa: E402
import imagebuild as images  # noqa: E402
import node as node_runtime  # noqa: E402

NAMESPACE = "cpt-demo"
BUCKET = "cpt-demo"


def _say(msg: str) -> None:
    print(f"demo-cluster: {msg}", file=sys.stderr, flush=True)


def _start_s3(node: node_runtime.Node) -> str:
    """moto in server mode on loopback (the tests' S3 server), kept running by PID file."""
    if node.pid_of("demo-s3") and (node.root / "demo-s3.url").exists():
        return (node.root / "demo-s3.url").read_text()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    node.start(
        "demo-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env
    )
    node_runtime.wait_for(
        lambda: node_runtime._connects(("127.0.0.1", port)), timeout=60, what="the S3 server"
    )
    url = f"http://127.0.0.1:{port}"
    (node.root / "demo-s3.url").write_text(url)
    return url


def up() -> int:
    from containers.harness import MAX_STEPS, RUN, install_operator, tiny_run
    from e2e.harness import Runs, install_crd, prepare_real_inputs

    from fixtures.s3 import S3Server

    if missing := node_runtime.missing_capabilities() + images.missing_tools():
        _say(f"this host lacks {'; '.join(missing)}")
        return 1
    t0 = time.monotonic()
    cluster = devcluster.up(persistent=True, log=_say)
    _say("building or reusing the kubelet and the images (cold: minutes)")
    kubelet_bin = node_runtime.kubelet_bin_dir()
    sources = images.Sources.detect()
    manifests = [images.build(i, sources) for i in images.DEFAULT]
    node = node_runtime.Node(node_runtime.default_root())
    with node_runtime.host_lock():
        node_runtime.up(node, cluster, kubelet_bin)
        node_runtime.import_images(node, manifests)
    _say(f"node {node.name} Ready with the images")
    s3 = S3Server(endpoint_url=_start_s3(node), log_path=node.logs / "demo-s3.log")
    port = int(s3.endpoint_url.rsplit(":", 1)[1])
    gateway = (node_runtime.GATEWAY, port)
    node_runtime.start_forwarder(node, "demo-s3", gateway, ("127.0.0.1", port))
    endpoint = f"http://{node_runtime.GATEWAY}:{port}"
    client = s3.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
        prepare_real_inputs(s3, BUCKET)
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    install_crd(cluster)
    selector = {node_runtime.LABEL: "true"}
    t = node_runtime.TAINT
    tolerations = [
        {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
    ]
    if cluster.helm("status", "cpt", "-n", NAMESPACE, check=False).returncode != 0:
        install_operator(
            cluster, NAMESPACE, s3, endpoint=endpoint, selector=selector, tolerations=tolerations
        )
    _say("operator installed with helm; applying the tiny run")
    runs = Runs(cluster, NAMESPACE, None)
    if runs.get(RUN) is None:
        runs.create(tiny_run(selector, tolerations, BUCKET, endpoint))
    kc = f"--kubeconfig={cluster.kubeconfig}"
    kubectl = str(cluster.bin_dir / "kubectl")
    watch = subprocess.Popen([kubectl, kc, "get", "cpt", "-n", NAMESPACE, "-w"])
    try:
        status = runs.wait(
            RUN,
            lambda s: s.get("phase") in ("Succeeded", "Failed"),
            timeout=1800,
            what="the run to finish",
        )
    finally:
        watch.terminate()
        watch.wait()
    _say(
        f"run {RUN}: {status.get('phase')} ({MAX_STEPS} steps) after {time.monotonic() - t0:.0f} s"
    )
    print(
        f"""
Look around:
  export KUBECONFIG={cluster.kubeconfig}
  {kubectl} get cpt -n {NAMESPACE}
  {kubectl} describe cpt {RUN} -n {NAMESPACE}
  {kubectl} get pods -n {NAMESPACE} -o wide
  {kubectl} logs -n {NAMESPACE} deploy/cpt                # the operator
  {kubectl} logs -n {NAMESPACE} {RUN}-train-1-master-0     # the trainer
The model, in the S3 server at {s3.endpoint_url} (keys testing/testing):
  AWS_ENDPOINT_URL={s3.endpoint_url} AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \\
    AWS_DEFAULT_REGION=us-east-1 {sys.executable} -c "import boto3; \\
    print([o['Key'] for o in boto3.client('s3').list_objects_v2(Bucket='{BUCKET}', \\
    Prefix='models/{RUN}/')['Contents']])"
Tear down: make demo-cluster-down (then make cluster-down for the control plane).
"""
    )
    return 0 if status.get("phase") == "Succeeded" else 1


def down() -> int:
    node = node_runtime.Node(node_runtime.default_root())
    cluster = devcluster.State(devcluster.default_state_dir()).cluster()
    if cluster is not None:
        cluster.helm("uninstall", "cpt", "-n", NAMESPACE, check=False)
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    node.stop("demo-s3")
    (node.root / "demo-s3.url").unlink(missing_ok=True)
    with node_runtime.host_lock():
        diffs = node_runtime.down(node, cluster)
    for d in diffs:
        _say(f"the host differs from before: {d}")
    _say("node stopped; `make cluster-down` stops the control plane")
    return 1 if diffs else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args()
    return up() if args.command == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
