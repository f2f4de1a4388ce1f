"""The child index (cpt_operator/index.py): events, write-through, LIST merges, and the glue
reading children from it instead of listing them (the fake API from test_handlers)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from test_handlers import T0, FakeKube, new_run

from cpt_operator import passes
from cpt_operator.index import ALL_NAMESPACES, ChildIndex, trim
from cpt_operator.reconcile.observe import observe

pytestmark = pytest.mark.unit

NS, RUN = "team-a", "r1"
KEY = (NS, RUN)


def job(name: str, rv: int, uid: str = "", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid or f"uid-{name}",
            "resourceVersion": str(rv),
            "labels": {"cpt.dev/run": RUN, "cpt.dev/stage": "tokenize"},
            "managedFields": [{"manager": "x" * 500}],
            "creationTimestamp": "2026-03-01T12:00:00Z",
        },
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i" * 500}]}}},
        "status": status,
    }


def pod(name: str, rv: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "resourceVersion": str(rv),
            "labels": {"cpt.dev/run": RUN, "cpt.dev/stage": "train", "cpt.dev/attempt": "2"},
            "ownerReferences": [
                {"kind": "Job", "name": "r1-train", "controller": True, "uid": "u", "x": 1}
            ],
            "creationTimestamp": "2026-03-01T12:00:00Z",
            "deletionTimestamp": "2026-03-01T12:05:00Z",
        },
        "spec": {"nodeName": "trn-0", "containers": [{"name": "c", "image": "i"}]},
        "status": {
            "phase": "Failed",
            "conditions": [
                {"type": "Ready", "status": "False", "lastProbeTime": None},
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"},
            ],
            "containerStatuses": [
                {"name": "c", "imageID": "sha", "state": {"terminated": {"exitCode": 137}}}
            ],
        },
    }


def names(index: ChildIndex) -> list[str]:
    jobs, ptjs, pods = index.children(KEY)
    return [o["metadata"]["name"] for o in [*jobs, *ptjs, *pods]]


def test_trimmed_children_give_the_same_observation_as_the_full_objects() -> None:
    full_job = job(
        "r1-tokenize",
        5,
        active=1,
        failed=2,
        failedIndexes="1",
        conditions=[
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "m"}
        ],
    )
    full_pod = pod("r1-train-0", 6)
    ptj = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "r1-train-2", "labels": {"cpt.dev/run": RUN, "cpt.dev/attempt": "2"}},
        "status": {
            "conditions": [
                {"type": "Running", "status": "True", "lastTransitionTime": "2026-03-01T12:01:00Z"},
                {
                    "type": "Restarting",
                    "status": "True",
                    "lastTransitionTime": "2026-03-01T12:02:00Z",
                    "reason": "r",
                    "message": "m",
                },
            ]
        },
    }
    full = observe(jobs=[full_job], pytorchjobs=[ptj], pods=[full_pod])
    trimmed = observe(jobs=[trim(full_job)], pytorchjobs=[trim(ptj)], pods=[trim(full_pod)])
    assert trimmed == full
    assert "managedFields" not in trim(full_job)["metadata"] and "spec" not in trim(full_job)
    assert trim(full_pod)["spec"] == {"nodeName": "trn-0"}
    # The verification LIST arrives projected (Kube.list_labelled) and the index trims again.
    assert all(trim(trim(o)) == trim(o) for o in (full_job, ptj, full_pod))


def test_a_run_is_not_vouched_for_until_a_list_covers_it() -> None:
    index = ChildIndex()
    index.apply("ADDED", job("r1-tokenize", 1))
    assert not index.synced(KEY) and index.needs_list(KEY)
    token = index.begin_list()
    index.end_list(token, [job("r1-tokenize", 1)], scope=NS)
    assert index.synced(KEY) and index.synced((NS, "a-new-run"))
    assert not index.synced(("other-namespace", "r"))
    token = index.begin_list()
    index.end_list(token, [], scope=ALL_NAMESPACES)
    assert index.synced(("other-namespace", "r"))


def test_events_update_children_and_report_only_changes_the_decision_can_see() -> None:
    index = ChildIndex()
    index.end_list(index.begin_list(), [], scope=NS)
    assert index.apply("ADDED", job("r1-tokenize", 1)) == KEY
    assert index.apply("MODIFIED", job("r1-tokenize", 2)) is None  # only the version moved
    assert index.apply("MODIFIED", job("r1-tokenize", 3, active=1)) == KEY
    assert index.apply("MODIFIED", job("r1-tokenize", 2)) is None  # older: ignored
    assert index.children(KEY)[0][0]["status"] == {"active": 1}
    assert index.apply("DELETED", job("r1-tokenize", 4, uid="someone-else")) is None
    assert names(index) == ["r1-tokenize"]  # a tombstone of another incarnation
    assert index.apply("DELETED", job("r1-tokenize", 4)) == KEY
    assert names(index) == []


def test_our_create_is_seen_at_once_and_its_added_event_wakes_nobody() -> None:
    index = ChildIndex()
    index.end_list(index.begin_list(), [], scope=NS)
    index.created(job("r1-tokenize", 7))
    assert names(index) == ["r1-tokenize"]
    assert index.apply("ADDED", job("r1-tokenize", 7)) is None


def test_a_create_that_finds_its_child_already_there_forces_a_fresh_list() -> None:
    index = ChildIndex()
    index.end_list(index.begin_list(), [], scope=NS)
    index.create_conflict(KEY)
    assert index.needs_list(KEY)
    index.end_list(index.begin_list(), [job("r1-tokenize", 3)], run=KEY)
    assert not index.needs_list(KEY) and names(index) == ["r1-tokenize"]


def test_a_deleted_child_stays_visible_as_deleting_until_it_is_really_gone() -> None:
    index = ChildIndex()
    index.end_list(index.begin_list(), [job("r1-train", 1)], scope=NS)
    index.deleting(KEY, "Job", "r1-train")
    (stored,) = index.children(KEY)[0]
    assert stored["metadata"]["deletionTimestamp"]
    assert index.needs_list(KEY)  # its DELETED event might never come: the resync re-lists
    index.end_list(index.begin_list(), [], run=KEY)  # the LIST no longer has it
    assert names(index) == [] and not index.needs_list(KEY)


def test_a_list_keeps_what_events_changed_while_it_was_in_flight() -> None:
    index = ChildIndex()
    index.end_list(index.begin_list(), [job("r1-old", 1)], scope=NS)
    token = index.begin_list()  # the LIST's snapshot: r1-old only, at version 1
    index.apply("ADDED", job("r1-new", 5))  # created meanwhile
    index.apply("DELETED", job("r1-old", 6))  # deleted meanwhile
    index.end_list(token, [job("r1-old", 1)], scope=NS)
    assert names(index) == ["r1-new"]
    # A LIST newer than what the events said wins; one older does not.
    token = index.begin_list()
    index.apply("MODIFIED", job("r1-new", 8, active=1))
    index.end_list(token, [job("r1-new", 7)], scope=NS)
    assert index.children(KEY)[0][0]["status"] == {"active": 1}


def test_a_verification_list_drops_children_whose_delete_event_was_lost() -> None:
    index = ChildIndex()
    index.end_list(index.begin_list(), [job("r1-a", 1), job("r1-b", 2)], scope=NS)
    index.end_list(index.begin_list(), [job("r1-b", 2)], scope=NS)
    assert names(index) == ["r1-b"]


def test_the_glue_reads_children_from_the_index_once_it_can_vouch_for_the_run() -> None:
    kube = FakeKube(new_run())
    index = ChildIndex()
    m = kube.run["metadata"]
    key = (m["namespace"], m["name"])

    def go() -> Any:
        return asyncio.run(passes.reconcile(kube, *key, now=T0, index=index))

    go()  # not vouched for: the run's own LIST, then the create is written through
    assert ("list_children", m["name"]) in kube.calls
    assert [o["metadata"]["name"] for o in index.children(key)[0]] == ["llama-gpu-tokenize"]
    kube.calls.clear()
    go()
    assert [c[0] for c in kube.calls] == ["get_run"]  # no LIST, no writes
    # A child deleted behind the operator's back and its event lost: the verification LIST
    # (from the resync) notices, and the next pass re-creates the child.
    del kube.children[("Job", "llama-gpu-tokenize")]
    asyncio.run(passes.verify_index(kube, index, (m["namespace"],)))
    kube.calls.clear()
    go()
    assert ("create", "llama-gpu-tokenize") in kube.calls


def test_the_echo_of_our_own_status_patch_is_skipped_and_older_events_read_the_run() -> None:
    key = ("ns", "r")
    passes.STATE.written[key] = "10"
    try:
        body = {"metadata": {"resourceVersion": "10"}}
        assert passes.run_event_body(key, body) is passes.SKIP
        assert passes.run_event_body(key, {"metadata": {"resourceVersion": "9"}}) is None
        newer = {"metadata": {"resourceVersion": "11"}, "spec": {"suspend": True}}
        got = passes.run_event_body(key, newer)
        assert got == newer and got is not newer
        assert passes.run_event_body(("ns", "never-patched"), copy.deepcopy(newer)) == newer
    finally:
        passes.STATE.written.clear()
