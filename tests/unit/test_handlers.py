"""The handler glue (read → observe → decide → apply → patch) against an in-memory API.

The fake stands in for the client layer only; the same paths run against the real control
plane in tests/integration/test_operator*.py and tests/e2e/.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from cpt_operator import handlers, passes
from cpt_operator.reconcile.patch import merge_patch

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
        self.events: list[tuple[str, str]] = []
        self.fail_patch = False
        self.version = 0

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in WRITES]

    async def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get_run", name))
        return copy.deepcopy(self.run)

    async def list_children(
        self, namespace: str, run: str
    ) -> tuple[list[Any], list[Any], list[Any]]:
        self.calls.append(("list_children", run))
        by_kind: dict[str, list[Any]] = {"Job": [], "PyTorchJob": [], "Pod": []}
        for (kind, _), obj in sorted(self.children.items()):
            by_kind[kind].append(copy.deepcopy(obj))
        return by_kind["Job"], by_kind["PyTorchJob"], by_kind["Pod"]

    async def get_nodes(self, names: list[str]) -> list[dict[str, Any]]:
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

    async def list_labelled(self, namespace: str | None) -> list[dict[str, Any]]:
        self.calls.append(("list_labelled", namespace or "*"))
        return [copy.deepcopy(obj) for _, obj in sorted(self.children.items())]

    async def list_runs(self, namespace: str | None) -> list[dict[str, Any]]:
        self.calls.append(("list_runs", namespace or "*"))
        return [copy.deepcopy(self.run)]

    async def create(self, manifest: Mapping[str, Any], namespace: str) -> dict[str, Any] | None:
        key = (manifest["kind"], manifest["metadata"]["name"])
        self.calls.append(("create", key[1]))
        if key in self.children:
            return None
        obj = copy.deepcopy(dict(manifest))
        self.version += 1
        obj["metadata"].update(
            namespace=namespace,
            creationTimestamp="2026-03-01T12:00:00Z",
            uid=f"uid-{key[1]}",
            resourceVersion=str(self.version),
        )
        self.children[key] = obj
        return copy.deepcopy(obj)

    async def delete(
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

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        self.calls.append(("patch_status", name))
        if self.fail_patch:
            raise RuntimeError("the API server went away")
        self.run["status"] = _apply_merge(self.run.get("status") or {}, patch)

    async def secret_exists(self, namespace: str, name: str) -> bool | None:
        self.calls.append(("secret_exists", name))
        return True

    async def pod_security_level(self, namespace: str) -> str | None:
        return None

    async def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str:
        self.calls.append(("dry_run_create", manifest["metadata"]["name"]))
        return ""

    async def post_event(
        self, run: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> None:
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
    m = kube.run["metadata"]
    return asyncio.run(passes.reconcile(kube, m["namespace"], m["name"], now=now))


def complete_job(kube: FakeKube, name: str) -> None:
    kube.children[("Job", name)]["status"] = {
        "conditions": [{"type": "Complete", "status": "True"}]
    }


@pytest.fixture(autouse=True)
def _no_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_storage(body: Mapping[str, Any], *, use_cache: bool = True) -> Any:
        return passes.StorageView()

    monkeypatch.setattr(passes, "read_storage", no_storage)
    monkeypatch.setattr(passes.STATE, "dry_runs", {})  # no accepted dry run from another test


def test_a_reconcile_with_nothing_to_do_makes_no_api_writes() -> None:
    kube = FakeKube(new_run())
    reconcile(kube)
    assert kube.run["status"]["phase"] == "Tokenizing"
    kube.calls.clear()
    reconcile(kube, T0 + timedelta(seconds=10))
    reconcile(kube, T0 + timedelta(seconds=20))
    assert kube.writes() == []
    assert [c[0] for c in kube.calls] == ["get_run", "list_children"] * 2


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
    kube.run["status"] = {"phase": "Succeeded"}
    assert reconcile(kube) is None
    assert kube.calls == [("get_run", "llama-gpu")]


def test_the_status_patch_is_the_minimal_merge_patch() -> None:
    kube = FakeKube(new_run())
    reconcile(kube)
    before = copy.deepcopy(kube.run["status"])
    complete_job(kube, "llama-gpu-tokenize")
    decision = reconcile(kube)
    patch = merge_patch(before, decision.status)
    assert patch["phase"] == "Training" and "plan" not in patch


def test_an_invalid_spec_event_fails_the_run_and_raises_a_permanent_error() -> None:
    body = new_run()
    body["spec"]["training"]["tensorParallel"] = 3
    kube = FakeKube(body)

    async def main() -> None:
        with pytest.raises(kopf.PermanentError, match="tensorParallel"):
            await handlers.run_event(type="ADDED", namespace="team-b", name="llama-gpu")
        while passes.STATE.records:  # the Event and status follow (deferred record)
            await asyncio.gather(*passes.STATE.records)

    run_as_operator(kube, main)
    assert kube.run["status"]["phase"] == "Failed"
    assert kube.children == {}
    assert kube.events == [("Warning", "InvalidSpec")]


def test_operator_settings_use_our_prefix_and_bounded_watch_timeouts() -> None:
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    assert settings.watching.server_timeout == 120 and settings.watching.client_timeout == 150
    assert settings.networking.request_timeout == 30
    assert settings.watching.chunk_size == handlers.LIST_PAGE > 0  # re-lists come in pages
    assert settings.persistence.finalizer == "cpt.dev/finalizer"
    assert settings.persistence.progress_storage.prefix == "cpt.dev"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("threshold", "frozen"), [(12345, True), (0, False)])
def test_the_operator_process_tunes_its_garbage_collector(threshold: int, frozen: bool) -> None:
    """In a process of its own: the setting is process-wide (a frozen test runner would
    never collect what it froze)."""
    code = (
        "import gc; from cpt_operator.__main__ import tune_gc; "
        f"before = gc.get_threshold(); tune_gc({threshold}); "
        "print(before[0], gc.get_threshold()[0], gc.get_threshold()[1:] == before[1:], "
        "gc.get_freeze_count() > 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    default = out[0]
    assert out[1:] == [str(threshold) if frozen else default, "True", str(frozen)]


def test_idle_kopf_workers_release_their_slot_quickly() -> None:
    """An idle per-object worker holds one of worker_limit's slots for idle_timeout (kopf's
    default 5 s): under a burst of new runs, run 129 waited 5 s for a slot (measured)."""
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    assert settings.queueing.worker_limit == 64
    assert settings.queueing.idle_timeout <= 0.5


def test_no_diff_essence_is_built_because_no_change_handler_needs_one() -> None:
    """cpt registers event handlers only (importing the handlers module registers them all),
    so kopf's per-event deep copies for change detection are skipped; a change handler added
    later would need them and makes configure() refuse to start."""
    assert handlers.change_handlers() == []
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, handlers.EventOnlyDiffBase)
    body = kopf.Body({"metadata": {"name": "r", "labels": {"a": "b"}}, "spec": {"x": [1, 2]}})
    assert storage.build(body=body) == {}

    registry = kopf.OperatorRegistry()

    @kopf.on.update("cpt.dev", "v1alpha1", "continualpretrains", registry=registry)
    def changed(**_: Any) -> None:
        pass

    assert handlers.change_handlers(registry) == [changed.__qualname__]


def run_as_operator(kube: FakeKube, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs `main` with the operator's process state wired to `kube` and a fresh index."""
    passes.STATE.kube = kube  # type: ignore[assignment]
    passes.STATE.index = passes.ChildIndex()
    try:
        asyncio.run(main())
    finally:
        passes.STATE.kube = None
        passes.STATE.runs.clear()
        passes.STATE.locks.clear()


class GatedKube(FakeKube):
    """Status patches wait for `gate` (as they wait behind other runs' creates in a burst)."""

    def __init__(self, run: dict[str, Any]) -> None:
        super().__init__(run)
        self.gate = asyncio.Event()

    async def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.gate.wait()
        await super().patch_status(namespace, name, patch)

    async def create(self, manifest: Mapping[str, Any], namespace: str) -> dict[str, Any] | None:
        created = await super().create(manifest, namespace)
        if created is not None:  # reconcile_locked decides at the wall clock's time
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            key = (manifest["kind"], manifest["metadata"]["name"])
            self.children[key]["metadata"]["creationTimestamp"] = now
            created["metadata"]["creationTimestamp"] = now
        return created


def test_a_pass_returns_after_its_creates_and_records_status_later_holding_the_runs_lock() -> None:
    """The kopf worker is free once the children exist; the Events and the status patch are
    written by a task that keeps the run's lock, so the next pass of the run sees them."""
    kube = GatedKube(new_run())
    m = kube.run["metadata"]
    key = (m["namespace"], m["name"])

    async def main() -> None:
        decision = await passes.reconcile_locked(*key)
        assert decision is not None and decision.status["phase"] == "Tokenizing"
        assert ("Job", "llama-gpu-tokenize") in kube.children
        assert "status" not in kube.run or not kube.run["status"]  # not yet recorded
        assert passes.STATE.locks[key].locked()
        second = asyncio.create_task(passes.reconcile_locked(*key))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not second.done()  # waits for the record
        kube.gate.set()
        await second
        assert kube.run["status"]["phase"] == "Tokenizing"
        assert [c[0] for c in kube.writes()].count("patch_status") == 1  # the second saw it
        assert not passes.STATE.locks[key].locked()

    run_as_operator(kube, main)


def test_a_failed_record_releases_the_run_and_schedules_another_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube = FakeKube(new_run())
    kube.fail_patch = True
    m = kube.run["metadata"]
    key = (m["namespace"], m["name"])
    scheduled: list[tuple[tuple[str, str], float]] = []
    monkeypatch.setattr(passes, "schedule_reconcile", lambda k, d: scheduled.append((k, d)))

    async def main() -> None:
        await passes.reconcile_locked(*key)
        while passes.STATE.records:
            await asyncio.gather(*passes.STATE.records)
        assert not passes.STATE.locks[key].locked()

    run_as_operator(kube, main)
    assert scheduled == [(key, 5.0)]
    assert ("Job", "llama-gpu-tokenize") in kube.children


def test_stopping_the_operator_lets_pending_records_finish() -> None:
    kube = GatedKube(new_run())
    m = kube.run["metadata"]

    async def main() -> None:
        await passes.reconcile_locked(m["namespace"], m["name"])
        assert passes.STATE.records
        asyncio.get_running_loop().call_later(0.05, kube.gate.set)
        await handlers.cleanup()
        assert not passes.STATE.records

    run_as_operator(kube, main)
    assert kube.run["status"]["phase"] == "Tokenizing"


def test_deferred_records_wait_for_new_runs_to_pause_but_not_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst's Events and status patches follow its first children: a record waits until
    no new run's pass is under way and none started or ended for RECORD_QUIET_SECONDS, and at
    most until its deadline."""
    monkeypatch.setattr(passes, "RECORD_QUIET_SECONDS", 0.5)
    left = passes._hold_left
    assert left(now=100.0, new_run_at=float("-inf"), deadline=110.0) <= 0  # none lately
    assert left(now=100.0, new_run_at=99.8, deadline=110.0) == pytest.approx(0.3)
    assert left(now=100.0, new_run_at=99.4, deadline=110.0) <= 0  # quiet long enough
    assert left(now=109.9, new_run_at=109.9, deadline=110.0) == pytest.approx(0.1)  # hold ends
    # A new run's pass under way (its create waiting on the API server): the record waits,
    # however long ago a pass last started, until the deadline.
    assert left(now=100.0, new_run_at=90.0, deadline=110.0, in_flight=3) == pytest.approx(0.5)
    assert left(now=109.8, new_run_at=90.0, deadline=110.0, in_flight=3) == pytest.approx(0.2)
    assert left(now=110.0, new_run_at=90.0, deadline=110.0, in_flight=3) <= 0
