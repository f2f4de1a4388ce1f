"""The client layer (cpt_operator.k8s) and one reconcile pass against the real API server.

No operator process here: the reconcile is called in-process with the real `Kube` client,
wrapped to count writes, so "nothing to do makes no API writes" is checked on the real thing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from e2e.harness import Runs, install_crd, spec_body

from cpt_operator import passes
from cpt_operator.k8s.client import Kube
from fixtures.cluster import Cluster
from fixtures.s3 import S3Server

pytestmark = pytest.mark.integration


class CountingKube(Kube):
    """The real client, counting the calls that write to the API."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    async def create(self, manifest: Mapping[str, Any], namespace: str) -> dict[str, Any] | None:
        self.writes.append(f"create {manifest['metadata']['name']}")
        return await super().create(manifest, namespace)

    async def delete(self, *args: Any, **kwargs: Any) -> bool:
        self.writes.append(f"delete {args[2]}")
        return await super().delete(*args, **kwargs)

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> str | None:
        self.writes.append("patch_status")
        return await super().patch_status(namespace, name, patch)

    async def post_event(
        self, run: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
        self.writes.append(f"event {reason}")
        await super().post_event(run, type_, reason, message)


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


@pytest.mark.parametrize("http_client", ["aiohttp", "httpx"])
def test_create_is_create_if_absent_and_delete_tolerates_absence(
    runs: Runs, http_client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over either HTTP client (CPT_HTTP_CLIENT; the other tests use the default, aiohttp)."""
    monkeypatch.setenv("CPT_HTTP_CLIENT", http_client)

    async def go() -> tuple[Any, Any, list[str], bool, bool]:
        kube = Kube()
        assert type(kube._client._client._client._transport).__name__ == (
            "AiohttpTransport" if http_client == "aiohttp" else "AsyncHTTPTransport"
        )
        try:
            m = job_manifest(runs.ns, "r1", "r1-tokenize")
            first = await kube.create(m, runs.ns)
            second = await kube.create(m, runs.ns)
            await kube.create(job_manifest(runs.ns, "other", "other-tokenize"), runs.ns)
            jobs, _, _ = await kube.list_children(runs.ns, "r1")
            gone = await kube.delete("batch/v1", "Job", "r1-tokenize", runs.ns)
            again = await kube.delete("batch/v1", "Job", "r1-tokenize", runs.ns)
            return first, second, [j["metadata"]["name"] for j in jobs], gone, again
        finally:
            await kube.close()

    first, second, names, gone, again = asyncio.run(go())
    # The created object as the API server answered it (the index stores it), then "exists".
    assert first["kind"] == "Job" and first["metadata"]["uid"] and second is None
    assert first["metadata"]["labels"] == {"cpt.dev/run": "r1"}
    assert names == ["r1-tokenize"]
    assert (gone, again) == (True, False)


def test_status_patches_merge_and_events_land_on_the_run(runs: Runs, bucket: str) -> None:
    runs.create(spec_body("patched", bucket))

    async def go() -> None:
        kube = Kube()
        try:
            await kube.patch_status(runs.ns, "patched", {"phase": "Planning", "message": "x"})
            version = await kube.patch_status(runs.ns, "patched", {"message": None, "attempt": 2})
            body = await kube.get_run(runs.ns, "patched")
            assert body is not None
            assert version == body["metadata"]["resourceVersion"]  # the echo to skip
            await kube.post_event(body, "Normal", "Testing", "hello from the client layer")
            assert await kube.get_run(runs.ns, "absent") is None
        finally:
            await kube.close()

    asyncio.run(go())
    status = runs.status("patched")
    assert status["phase"] == "Planning" and status["attempt"] == 2 and "message" not in status
    (event,) = runs.events("patched")
    assert event["reason"] == "Testing" and event["source"]["component"] == "cpt-operator"


def test_a_reconcile_with_nothing_to_do_makes_no_writes_to_the_real_api(
    runs: Runs, bucket: str, s3_env: S3Server
) -> None:
    # Preflight: its PyTorchJob pods run until told otherwise, so the run stays put.
    runs.create(spec_body("steady", bucket))

    async def go() -> tuple[list[str], list[str]]:
        kube = CountingKube()
        try:
            await passes.reconcile(kube, runs.ns, "steady", now=datetime.now(UTC))
            first = list(kube.writes)
            kube.writes.clear()
            for _ in range(3):
                await passes.reconcile(kube, runs.ns, "steady", now=datetime.now(UTC))
            return first, kube.writes
        finally:
            await kube.close()

    first, later = asyncio.run(go())
    assert "create steady-preflight" in first and first[-1] == "patch_status"
    assert later == []
    assert runs.status("steady")["phase"] == "Preflight"


def test_the_index_listing_finds_every_labelled_child_of_the_namespace_with_its_kind(
    runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Page by page (one object a page here: the continue tokens are followed), each object
    projected to what the index keeps (a Job's spec is not)."""
    from cpt_operator.k8s import client as client_mod

    monkeypatch.setattr(client_mod, "LIST_PAGE", 1)
    shapes: list[tuple[str, set[str]]] = []

    async def go() -> list[tuple[str, str]]:
        kube = Kube()
        try:
            await kube.create(job_manifest(runs.ns, "a", "a-tokenize"), runs.ns)
            await kube.create(job_manifest(runs.ns, "b", "b-tokenize"), runs.ns)
            unlabelled = job_manifest(runs.ns, "c", "not-ours")
            unlabelled["metadata"]["labels"] = {}
            await kube.create(unlabelled, runs.ns)
            listed = await kube.list_labelled(runs.ns)
            shapes.extend((o["kind"], set(o)) for o in listed)
            return sorted((o["kind"], o["metadata"]["name"]) for o in listed)
        finally:
            await kube.close()

    found = asyncio.run(go())
    assert ("Job", "a-tokenize") in found and ("Job", "b-tokenize") in found
    assert all(name != "not-ours" for _, name in found)
    assert {kind for kind, _ in found} <= {"Job", "Pod"}
    assert all("spec" not in keys for kind, keys in shapes if kind == "Job")
    assert sum(1 for kind, _ in found if kind == "Job") == 2  # both pages of Jobs


def test_the_children_watch_gets_only_labelled_objects_and_resumes_where_it_was(
    runs: Runs,
) -> None:
    """The API server selects the label: an unlabelled Job never reaches the operator; a
    watch request started from the last version seen gets only what happened after it."""
    from cpt_operator.k8s import watch

    job = ("batch/v1", "Job")

    async def go() -> tuple[list[tuple[str, str]], set[tuple[str, str]], list[tuple[str, str]]]:
        kube = Kube()
        seen: list[tuple[str, str]] = []
        kinds: set[tuple[str, str]] = set()
        versions: list[str] = []
        got = asyncio.Event()
        watching = asyncio.Event()

        def deliver(type_: str, obj: dict[str, Any]) -> None:
            seen.append((type_, obj["metadata"]["name"]))
            versions.append(obj["metadata"]["resourceVersion"])
            kinds.add((obj["apiVersion"], obj["kind"]))
            if obj["metadata"]["name"] == "w1-tokenize":
                watching.set()
            if obj["metadata"]["name"] == "w2-tokenize" and type_ == "DELETED":
                got.set()

        try:
            await kube.create(job_manifest(runs.ns, "w1", "w1-tokenize"), runs.ns)
            task = asyncio.create_task(watch.follow(kube, job, runs.ns, deliver))
            # A watch from "now" starts when the API server takes the request: changes made
            # before that are not events (seen once under the full suite's load, where w2 was
            # created and deleted before the request arrived).
            await asyncio.wait_for(watching.wait(), 60)
            unlabelled = job_manifest(runs.ns, "x", "not-ours")
            unlabelled["metadata"]["labels"] = {}
            await kube.create(unlabelled, runs.ns)
            await kube.create(job_manifest(runs.ns, "w2", "w2-tokenize"), runs.ns)
            await kube.delete("batch/v1", "Job", "w2-tokenize", runs.ns)
            await asyncio.wait_for(got.wait(), 60)
            task.cancel()
            # A new request from the last version the loop saw: only what came after it.
            version = versions[-1]
            later: list[tuple[str, str]] = []
            await kube.create(job_manifest(runs.ns, "w3", "w3-tokenize"), runs.ns)
            async for line in kube.watch_labelled(job, runs.ns, version):
                type_, obj = watch.parse(line, job)
                later.append((type_, obj["metadata"]["name"]))
                if obj["metadata"]["name"] == "w3-tokenize":
                    break
            return seen, kinds, later
        finally:
            await kube.close()

    seen, kinds, later = asyncio.run(go())
    assert kinds == {job}
    names = {name for _, name in seen}
    assert "not-ours" not in names
    assert ("ADDED", "w1-tokenize") in seen  # already there: the initial state
    assert ("ADDED", "w2-tokenize") in seen and ("DELETED", "w2-tokenize") in seen
    assert later[-1] == ("ADDED", "w3-tokenize")
    assert ("ADDED", "w1-tokenize") not in later
    assert all(name != "w2-tokenize" for _, name in later)
