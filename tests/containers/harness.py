"""Helpers of the real-container tier: the operator installed with helm, pods and logs.

The operator is `helm install`ed from charts/cpt exactly as the chart renders (its own
ServiceAccount token, non-root, read-only root filesystem); the only values are what any
installation sets: the namespace to watch, where its pod may run (the real node), and the S3
endpoint, region and credentials Secret.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml
from e2e.harness import Runs, real_run_spec

from fixtures.cluster import REPO, Cluster, wait_for
from fixtures.s3 import REGION, S3Server

CHART = REPO / "charts" / "cpt"
RUN = "tiny"
MAX_STEPS = 12
EVERY = 4
RELEASE = "cpt"
S3_SECRET = "s3-credentials"


@dataclass
class OperatorRelease:
    cluster: Cluster
    namespace: str
    name: str = RELEASE

    @property
    def deployment(self) -> str:
        return self.name  # the chart's full name for a release named "cpt"

    def pods(self) -> list[dict[str, Any]]:
        sel = f"app.kubernetes.io/instance={self.name}"
        out = self.cluster.api.get(f"/api/v1/namespaces/{self.namespace}/pods?labelSelector={sel}")
        return list(out.get("items") or [])

    def running_pod(self, timeout: float = 180) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            for pod in self.pods():
                conds = pod.get("status", {}).get("conditions") or []
                deleting = pod["metadata"].get("deletionTimestamp")
                if not deleting and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in conds
                ):
                    return pod
            return None

        return dict(wait_for(ready, timeout=timeout, what="a Ready operator pod"))

    def logs(self, pod: str, *, previous: bool = False) -> str:
        args = ["logs", "-n", self.namespace, pod] + (["--previous"] if previous else [])
        return self.cluster.kubectl(*args, check=False).stdout

    def uninstall(self) -> None:
        self.cluster.helm("uninstall", self.name, "--namespace", self.namespace, check=False)


def install_operator(
    cluster: Cluster,
    namespace: str,
    s3: S3Server,
    *,
    endpoint: str,
    selector: dict[str, str],
    tolerations: list[dict[str, str]],
) -> OperatorRelease:
    """`helm install` of the chart, its pod on the real node (`selector`, `tolerations`),
    S3 at `endpoint`; waits until the pod is Ready."""
    Runs(cluster, namespace, None).create_s3_secret(s3, S3_SECRET)
    values = {
        "watchNamespace": namespace,
        "nodeSelector": selector,
        "tolerations": tolerations,
        "s3": {
            "endpointUrl": endpoint,
            "region": REGION,
            "credentialsSecret": S3_SECRET,
        },
        "operator": {"reconcileIntervalSeconds": 2},
    }
    cluster.helm(
        "install", RELEASE, str(CHART), "--namespace", namespace, "--values", "-",
        input=yaml.safe_dump(values),
    )  # fmt: skip
    release = OperatorRelease(cluster, namespace)
    release.running_pod()
    return release


def container_statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("status", {}).get("containerStatuses") or [])


def describe(cluster: Cluster, namespace: str) -> str:
    """Pods and events of a namespace, for failure messages."""
    pods = cluster.kubectl("get", "pods", "-o", "wide", "-n", namespace, check=False).stdout
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
    ).stdout
    return f"{pods}\n{events[-4000:]}"


def image_of(pod: dict[str, Any]) -> str:
    return str(pod["spec"]["containers"][0]["image"])


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:3000]


def tiny_run(
    selector: dict[str, str],
    tolerations: list[dict[str, str]],
    bucket: str,
    endpoint: str,
    *,
    run: str = RUN,
    max_attempts: int = 2,
    **training: Any,
) -> dict[str, Any]:
    """The tiny native run of `prepare_real_inputs`'s model and corpus, every pod of it on
    the real node (`selector`, `tolerations`), reaching S3 at `endpoint`: one node, two
    gloo processes, a checkpoint every `EVERY` steps."""
    return real_run_spec(
        run,
        bucket,
        endpoint,
        data={"shards": 2, "heldOutFraction": 0.05},
        training={
            "nodes": 1,
            "processesPerNode": 2,
            "globalBatchSize": 4,
            "maxSteps": MAX_STEPS,
            "optimizer": {"lr": 1e-3, "minLr": 1e-4, "warmupSteps": 2},
            **training,
        },
        checkpoints={"everySteps": EVERY, "keep": 3},
        runtime={
            "s3CredentialsSecretRef": {"name": "s3-credentials"},
            "nodeSelector": selector,
            "toolsNodeSelector": selector,
            "tolerations": tolerations,
        },
        max_attempts=max_attempts,
    )
