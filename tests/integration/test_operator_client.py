"""The client layer (cpt_operator/kube.py) and one reconcile pass against the real API server.

No operator process here: the reconcile is called in-process with the real `Kube` client,
wrapped to count writes, so "nothing to do makes no API writes" is checked on the real thing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from e2e.harness import Runs, install_crd, spec_body

from cpt_operator import handlers
from cpt_operator.kube import Kube, api_client
from fixtures.cluster import Cluster
from fixtures.s3 import S3Server

pytestmark = pytest.mark.integration


class CountingKube(Kube):
    """The real client, counting the calls that write to the API."""

    def __init__(self) -> None:
        super().__init__(api_client())
        self.writes: list[str] = []

    def create(self, manifest: Mapping[str, Any], namespace: str) -> bool:
        self.writes.append(f"create {manifest['metadata']['name']}")
        return super().create(manifest, namespace)

    def delete(self, *args: Any, **kwargs: Any) -> bool:
        self.writes.append(f"delete {args[2]}")
        return super().delete(*args, **kwargs)

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self.writes.append("patch_status")
        super().patch_status(namespace, name, patch)

    def post_event(self, run: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.writes.append(f"event {reason}")
        super().post_event(run, type_, reason, message)


@pytest.fixture
def runs(cluster: Cluster, namespace: str) -> Iterator[Runs]:
    install_crd(cluster)
    yield Runs(cluster, namespace, None)


def job_manifest(namespace: str, run: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": {"cpt.dev/run": run}},
        "spec": {
            "template": {
                "metadata": {"annotations": {"test.cpt.dev/hold": "true"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox", "command": ["true"]}],
                },
            }
        },
    }


def test_create_is_create_if_absent_and_delete_tolerates_absence(runs: Runs) -> None:
    kube = Kube(api_client())
    try:
        m = job_manifest(runs.ns, "r1", "r1-tokenize")
        first, second = kube.create(m, runs.ns), kube.create(m, runs.ns)
        kube.create(job_manifest(runs.ns, "other", "other-tokenize"), runs.ns)
        jobs, ptjs = kube.list_children(runs.ns, "r1")
        assert kube.dry_run_create(job_manifest(runs.ns, "r1", "Bad_Name"), runs.ns)
        gone = kube.delete("batch/v1", "Job", "r1-tokenize", runs.ns)
        again = kube.delete("batch/v1", "Job", "r1-tokenize", runs.ns)
    finally:
        kube.close()
    assert (first, second) == (True, False)
    assert [(j["kind"], j["metadata"]["name"]) for j in jobs] == [("Job", "r1-tokenize")]
    assert jobs[0]["metadata"]["labels"] == {"cpt.dev/run": "r1"} and ptjs == []
    assert (gone, again) == (True, False)


def test_status_patches_merge_and_events_land_on_the_run(runs: Runs, bucket: str) -> None:
    runs.create(spec_body("patched", bucket))
    kube = Kube(api_client())
    try:
        kube.patch_status(runs.ns, "patched", {"phase": "Planning", "message": "x"})
        kube.patch_status(runs.ns, "patched", {"message": None, "attempt": 2})
        body = kube.get_run(runs.ns, "patched")
        assert body is not None
        kube.post_event(body, "Normal", "Testing", "hello from the client layer")
        assert kube.get_run(runs.ns, "absent") is None
        assert kube.secret_exists(runs.ns, "absent") is False
        assert kube.pod_security_level(runs.ns) == ""
    finally:
        kube.close()
    status = runs.status("patched")
    assert status["phase"] == "Planning" and status["attempt"] == 2 and "message" not in status
    (event,) = runs.events("patched")
    assert event["reason"] == "Testing" and event["source"]["component"] == "cpt-operator"


def test_a_reconcile_with_nothing_to_do_makes_no_writes_to_the_real_api(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    # Preflight: its PyTorchJob pods run until told otherwise, so the run stays put.
    runs.create(spec_body("steady", bucket))
    kube = CountingKube()
    try:
        handlers.reconcile(kube, runs.ns, "steady", now=datetime.now(UTC))
        first = list(kube.writes)
        kube.writes.clear()
        for _ in range(3):
            handlers.reconcile(kube, runs.ns, "steady", now=datetime.now(UTC))
        later = kube.writes
    finally:
        kube.close()
    assert "create steady-preflight" in first and first[-1] == "patch_status"
    assert later == []
    assert runs.status("steady")["phase"] == "Preflight"
