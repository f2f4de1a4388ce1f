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

from fixtures.cluster import REPO, Cluster, wait_for
from fixtures.node import RealNode
from fixtures.s3 import REGION, S3Server

CHART = REPO / "charts" / "cpt"
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


def create_s3_secret(cluster: Cluster, namespace: str, s3: S3Server) -> None:
    cluster.api.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "metadata": {"name": S3_SECRET},
            "stringData": {
                "AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"],
            },
        },
    )


def install_operator(
    node: RealNode, cluster: Cluster, namespace: str, s3: S3Server
) -> OperatorRelease:
    """`helm install` of the chart, its pod on the real node; waits until the pod is Ready."""
    create_s3_secret(cluster, namespace, s3)
    values = {
        "watchNamespace": namespace,
        "nodeSelector": node.selector,
        "tolerations": node.tolerations,
        "s3": {
            "endpointUrl": node.reachable(s3),
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
