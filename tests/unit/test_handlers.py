"""The controller (cpt_operator/handlers.py) against an in-memory API: one reconcile pass
(read → observe → decide → apply → patch), and the run loops that decide when passes run.

The fake stands in for the client layer only; the same paths run against the real control
plane in tests/integration/test_operator_client.py and tests/e2e/.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from cpt_operator import handlers
from cpt_operator.progress import StorageView
from cpt_operator.reconcile import accept
from cpt_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

SPECS = Path(__file__).resolve().parents[1] / "golden" / "specs"
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
WRITES = ("create", "delete", "patch_status", "post_event")


class FakeKube:
    """An in-memory API with create-if-absent semantics; records every call."""

    def __init__(self, run: dict[str, Any]) -> None:
        self.run = run
        self.children: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.memory = accept.Memory()
        self.events: list[tuple[str, str]] = []
        self.fail_patch = False
        self.patches: list[dict[str, Any]] = []
        self.created_at = "2026-03-01T12:00:00Z"  # T0; the loops' passes use the clock
        self.version = 0

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in WRITES]

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get_run", name))
        return copy.deepcopy(self.run)

    def _of_kind(self, kind: str) -> list[Any]:
        return [copy.deepcopy(o) for (k, _), o in sorted(self.children.items()) if k == kind]

    def list_children(self, namespace: str, run: str) -> tuple[list[Any], list[Any]]:
        self.calls.append(("list_children", run))
        return self._of_kind("Job"), self._of_kind("PyTorchJob")

    def list_workloads(self, namespace: str) -> list[Any]:
        return []

    def list_pods(self, namespace: str, run: str) -> list[Any]:
        self.calls.append(("list_pods", run))
        return self._of_kind("Pod")

    def get_nodes(self, names: list[str]) -> list[dict[str, Any]]:
        self.calls.append(("get_nodes", ",".join(names)))
        return [
            {
                "metadata": {"name": n},
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "lastTransitionTime": "2026-03-01T00:00:00Z",
                        }
                    ]
                },
            }
            for n in names
        ]

    def list_runs(self, namespace: str | None) -> list[dict[str, Any]]:
        self.calls.append(("list_runs", namespace or "*"))
        return [copy.deepcopy(self.run)]

    def create(self, manifest: Mapping[str, Any], namespace: str) -> bool:
        key = (manifest["kind"], manifest["metadata"]["name"])
        self.calls.append(("create", key[1]))
        if key in self.children:
            return False
        obj = copy.deepcopy(dict(manifest))
        self.version += 1
        obj["metadata"].update(
            namespace=namespace,
            creationTimestamp=self.created_at,
            uid=f"uid-{key[1]}",
            resourceVersion=str(self.version),
        )
        self.children[key] = obj
        return True

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str,
        *,
        propagation: str = "Background",
        grace_period: int | None = None,
    ) -> bool:
        self.calls.append(("delete", name))
        return self.children.pop((kind, name), None) is not None

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self.calls.append(("patch_status", name))
        self.patches.append(copy.deepcopy(dict(patch)))
        if self.fail_patch:
            raise RuntimeError("the API server went away")
        self.run["status"] = _apply_merge(self.run.get("status") or {}, patch)

    def secret_exists(self, namespace: str, name: str) -> bool | None:
        self.calls.append(("secret_exists", name))
        return True

    def pod_security_level(self, namespace: str) -> str | None:
        return None

    def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str:
        self.calls.append(("dry_run_create", manifest["metadata"]["name"]))
        return ""

    def post_event(self, run: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.calls.append(("post_event", reason))
        self.events.append((type_, reason))


def _apply_merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _apply_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def new_run(name: str = "p5-native") -> dict[str, Any]:
    body = yaml.safe_load((SPECS / f"{name}.yaml").read_text())
    body["metadata"]["creationTimestamp"] = "2026-03-01T12:00:00Z"
    return body


def reconcile(kube: FakeKube, now: datetime = T0) -> Any:
    """One pass, with the run loop's memory of what it checked (reconcile/accept.py)."""
    m = kube.run["metadata"]
    return handlers.reconcile(kube, m["namespace"], m["name"], now=now, memory=kube.memory)


def complete_job(kube: FakeKube, name: str) -> None:
    kube.children[("Job", name)]["status"] = {
        "conditions": [{"type": "Complete", "status": "True"}]
    }


@pytest.fixture(autouse=True)
def _no_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "storage_view", lambda body: StorageView())


def test_a_reconcile_with_nothing_to_do_makes_no_api_writes() -> None:
    kube = FakeKube(new_run())
    reconcile(kube)
    assert kube.run["status"]["phase"] == "Tokenizing"
    kube.calls.clear()
    reconcile(kube, T0 + timedelta(seconds=10))
    reconcile(kube, T0 + timedelta(seconds=20))
    assert kube.writes() == []
    assert [c[0] for c in kube.calls] == ["get_run", "list_children", "list_pods"] * 2


def test_children_are_created_before_the_status_that_records_them_is_patched() -> None:
    kube = FakeKube(new_run())
    reconcile(kube)
    names = [c[0] for c in kube.writes()]
    assert names.index("create") < names.index("patch_status")
    assert names[-1] == "patch_status"
    assert ("Job", "llama-gpu-tokenize") in kube.children


def test_a_lost_status_patch_creates_no_duplicate_on_the_next_reconcile() -> None:
    kube = FakeKube(new_run())
    kube.fail_patch = True
    with pytest.raises(RuntimeError):
        reconcile(kube)
    kube.fail_patch = False
    reconcile(kube)  # the operator "restarted": status is still empty
    creates = [c for c in kube.calls if c[0] == "create"]
    assert creates == [("create", "llama-gpu-tokenize")]  # the second pass saw it exists
    assert list(kube.children) == [("Job", "llama-gpu-tokenize")]
    assert kube.run["status"]["phase"] == "Tokenizing"


def test_the_whole_pipeline_runs_through_the_glue_with_one_child_per_stage() -> None:
    kube = FakeKube(new_run())
    reconcile(kube)
    complete_job(kube, "llama-gpu-tokenize")
    reconcile(kube)
    assert kube.run["status"]["phase"] == "Training"
    kube.children[("PyTorchJob", "llama-gpu-train-1")]["status"] = {
        "conditions": [{"type": "Succeeded", "status": "True"}]
    }
    reconcile(kube)
    assert kube.run["status"]["phase"] == "Converting"
    complete_job(kube, "llama-gpu-export")
    reconcile(kube)
    assert kube.run["status"]["phase"] == "Succeeded"
    assert sorted(n for _, n in kube.children) == [
        "llama-gpu-export",
        "llama-gpu-tokenize",
        "llama-gpu-train-1",
    ]
    assert ("Normal", "Succeeded") in kube.events


def test_a_finished_run_is_not_even_read_beyond_its_own_object() -> None:
    kube = FakeKube(new_run())
    kube.run["status"] = {"phase": "Succeeded", "observedGeneration": 3}
    assert reconcile(kube) == "Succeeded"
    assert kube.calls == [("get_run", "llama-gpu")]


def test_the_status_patch_is_the_minimal_merge_patch() -> None:
    kube = FakeKube(new_run())
    reconcile(kube)
    complete_job(kube, "llama-gpu-tokenize")
    reconcile(kube)
    patch = kube.patches[-1]
    assert patch["phase"] == "Training" and "plan" not in patch


def test_an_invalid_spec_fails_the_run_with_an_event_and_creates_nothing() -> None:
    body = new_run()
    body["spec"]["training"]["tensorParallel"] = 3
    kube = FakeKube(body)
    assert reconcile(kube) == "Failed"
    assert kube.run["status"]["phase"] == "Failed"
    assert kube.children == {}
    assert [e for e in kube.events if e[0] == "Warning"] == [("Warning", "Failed")]


# -- the run loops: when passes run ------------------------------------------------------------


def run_with_controller(
    kube: FakeKube, main: Callable[[handlers.Controller, kopf.Memo], Coroutine[Any, Any, None]]
) -> handlers.Controller:
    """`main` with the controller the startup handler builds (its S3 prefixes read from the
    fake), the resync long enough that only wake-ups start passes."""

    box: list[handlers.Controller] = []
    kube.created_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def outer() -> None:
        memo = kopf.Memo(settings=OperatorSettings(resync_seconds=60, workers=2), kube=kube)
        await handlers.startup(settings=kopf.OperatorSettings(), memo=memo)
        box.append(handlers.controller(memo))
        try:
            await main(box[0], memo)
        finally:
            await handlers.cleanup(memo=memo)

    asyncio.run(outer())
    return box[0]


async def settle(ctl: handlers.Controller) -> None:
    """Until no loop has a wake-up pending and every pass in flight is done."""
    for _ in range(200):
        await asyncio.sleep(0.01)
        if all(not loop.wake.is_set() for loop in ctl.loops.values()):
            await asyncio.sleep(0.05)
            if all(not loop.wake.is_set() for loop in ctl.loops.values()):
                return


def run_event(
    kube: FakeKube, memo: kopf.Memo, type_: str = "MODIFIED"
) -> Coroutine[Any, Any, None]:
    body = copy.deepcopy(kube.run)
    m = body["metadata"]
    return handlers.run_event(
        type=type_, body=body, namespace=m["namespace"], name=m["name"], memo=memo
    )


def test_a_new_run_gets_its_first_child_from_its_own_event() -> None:
    kube = FakeKube(new_run())

    async def main(ctl: handlers.Controller, memo: kopf.Memo) -> None:
        await run_event(kube, memo, "ADDED")
        await settle(ctl)

    run_with_controller(kube, main)
    assert ("Job", "llama-gpu-tokenize") in kube.children
    assert kube.run["status"]["phase"] == "Tokenizing"


def test_the_echo_of_a_status_write_wakes_nobody_but_a_spec_change_does() -> None:
    kube = FakeKube(new_run())
    kube.run["metadata"]["generation"] = 1

    async def main(ctl: handlers.Controller, memo: kopf.Memo) -> None:
        await run_event(kube, memo, "ADDED")
        await settle(ctl)
        before = ctl.passes
        await run_event(kube, memo)  # the echo of the status patch: same generation
        await settle(ctl)
        assert ctl.passes == before
        kube.run["metadata"]["generation"] = 2
        await run_event(kube, memo)
        await settle(ctl)
        assert ctl.passes == before + 1

    run_with_controller(kube, main)


def test_a_child_event_wakes_its_run_and_the_run_moves_on() -> None:
    kube = FakeKube(new_run())

    async def main(ctl: handlers.Controller, memo: kopf.Memo) -> None:
        await run_event(kube, memo, "ADDED")
        await settle(ctl)
        complete_job(kube, "llama-gpu-tokenize")
        labels = {"cpt.dev/run": "llama-gpu"}
        await handlers.child_event(type="MODIFIED", namespace="team-b", labels=labels, memo=memo)
        await settle(ctl)
        assert kube.run["status"]["phase"] == "Training"
        # a child of a run the operator does not know starts nothing
        unknown = {"cpt.dev/run": "someone-else"}
        await handlers.child_event(type="MODIFIED", namespace="team-b", labels=unknown, memo=memo)
        assert set(ctl.loops) == {("team-b", "llama-gpu")}

    run_with_controller(kube, main)


def test_a_finished_or_deleted_run_has_no_loop_left() -> None:
    kube = FakeKube(new_run())

    async def main(ctl: handlers.Controller, memo: kopf.Memo) -> None:
        await run_event(kube, memo, "ADDED")
        await settle(ctl)
        assert ("team-b", "llama-gpu") in ctl.loops
        await run_event(kube, memo, "DELETED")
        assert ctl.loops == {} and ctl.roots == {}
        kube.run["status"] = {"phase": "Succeeded", "observedGeneration": 3}
        await run_event(kube, memo)
        assert ctl.loops == {}

    run_with_controller(kube, main)


def test_a_failed_pass_is_retried_at_the_next_resync() -> None:
    kube = FakeKube(new_run())
    kube.fail_patch = True

    async def main(ctl: handlers.Controller, memo: kopf.Memo) -> None:
        ctl.settings = OperatorSettings(resync_seconds=0.2)
        await run_event(kube, memo, "ADDED")
        await asyncio.sleep(0.1)
        kube.fail_patch = False
        for _ in range(50):
            await asyncio.sleep(0.05)
            if (kube.run.get("status") or {}).get("phase") == "Tokenizing":
                return
        raise AssertionError(f"not retried: {kube.calls}")

    run_with_controller(kube, main)
    # the retry saw the child the failed pass had created: no second create, no delete
    assert [c for c in kube.calls if c[0] in ("create", "delete")] == [
        ("create", "llama-gpu-tokenize")
    ]
