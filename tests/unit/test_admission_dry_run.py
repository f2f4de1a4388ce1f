"""A burst of runs from one template costs one server-side dry run (admission.dry_run_key and
passes.dry_run): the key shares acceptance only between runs whose pod templates the API
server would judge alike, and a rejection is never shared."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator import passes
from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.builders.jobs import RunRef
from cpt_operator.reconcile import admission
from cpt_operator.reconcile.admission import dry_run_key

pytestmark = pytest.mark.unit

SPECS = Path(__file__).resolve().parents[1] / "golden" / "specs"
BASE = yaml.safe_load((SPECS / "trn1-nxd.yaml").read_text())["spec"]


def spec_for(name: str, **edits: Any) -> ContinualPretrainSpec:
    """The golden spec with per-run storage paths, as users write one run per name."""
    raw = copy.deepcopy(BASE)
    raw["checkpoints"]["s3Uri"] = f"s3://bkt/runs/{name}/"
    raw["output"]["s3Uri"] = f"s3://bkt/models/{name}/"
    for path, value in edits.items():
        node = raw
        *parents, leaf = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return ContinualPretrainSpec.model_validate(raw)


def key(name: str, ns: str = "team-a", **edits: Any) -> str | None:
    return dry_run_key(spec_for(name, **edits), RunRef(name, ns, f"uid-{name}"))


def test_runs_differing_only_in_name_and_storage_paths_share_a_key() -> None:
    assert key("run-0001") is not None
    assert key("run-0001") == key("run-0002") == key("abc-xyz1")


def test_what_the_server_validates_differently_gives_another_key() -> None:
    base = key("run-0001")
    assert key("run-01") != base  # name length: names and labels have length limits
    assert key("run-0001", ns="team-b") != base  # quota, policies, PSS are per namespace
    assert key("run-0001", runtime__images__tools="example.com/other:1") != base
    assert key("run-0001", runtime__images__trainerNeuron="example.com/other:1") != base
    assert key("run-0001", runtime__toolsNodeSelector={"pool": "tools"}) != base


def test_a_name_outside_dns_1035_shares_nothing() -> None:
    spec = spec_for("x")
    assert dry_run_key(spec, RunRef("1run", "team-a", "u")) is None
    assert dry_run_key(spec, RunRef("run.a", "team-a", "u")) is None


def _elsewhere(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with every storage location moved (same scheme, another place and length)."""
    out = copy.deepcopy(raw)
    for path, value in ContinualPretrainSpec.model_validate(raw).storage_locations().items():
        if value.startswith("hf://"):  # hf://org/name[@revision]
            moved = "hf://zz-elsewhere-org/another-model@v2"
        else:
            scheme = "s3://" if value.startswith("s3://") else "/"
            moved = value.replace(scheme, scheme + "zz-elsewhere/deeper/", 1)
        admission.set_at(out, path, moved)
    return out


@pytest.mark.parametrize("golden", sorted(p.name for p in SPECS.glob("*.yaml")))
def test_storage_locations_enter_only_what_the_key_blanks(golden: str) -> None:
    """The memo (`template_of`) cuts the storage locations: sound only while they reach the
    manifests as free text alone. Checked by building the manifests of every golden spec
    with its locations moved, without the memo."""
    raw = yaml.safe_load((SPECS / golden).read_text())["spec"]
    moved = _elsewhere(raw)
    assert moved != raw
    a, b = (ContinualPretrainSpec.model_validate(r) for r in (raw, moved))
    run = RunRef("run-0001", "team-a", "u")
    assert admission.template_of(a) == admission.template_of(b)
    assert admission._manifests_key(a, run) == admission._manifests_key(b, run)


def test_the_memo_answers_what_the_manifests_would() -> None:
    run = RunRef("run-0001", "team-a", "u")
    spec = spec_for("run-0001")
    admission._KEYS.clear()
    assert dry_run_key(spec, run) == admission._manifests_key(spec, run)
    assert len(admission._KEYS) == 1
    assert dry_run_key(spec_for("run-0002"), RunRef("run-0002", "team-a", "v")) == key("run-0001")
    assert len(admission._KEYS) == 1  # same template, name length and namespace: one entry
    other = spec_for("run-0001", runtime__images__tools="example.com/other:1")
    assert dry_run_key(other, run) == admission._manifests_key(other, run) != key("run-0001")
    assert len(admission._KEYS) == 2


class CountingKube:
    """Answers dry runs after a pause (so concurrent callers overlap); counts them."""

    def __init__(self, message: str = "") -> None:
        self.message = message
        self.calls = 0

    async def dry_run_create(self, manifest: Mapping[str, Any], namespace: str) -> str:
        self.calls += 1
        await asyncio.sleep(0.01)
        return self.message


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passes.STATE, "dry_runs", {})
    monkeypatch.setattr(passes, "DRY_RUN_CACHE_SECONDS", 30.0)


MANIFESTS = [
    ("tokenize Job", "spec.runtime", {"metadata": {"name": "a"}}),
    ("training pod template", "spec.runtime", {"metadata": {"name": "b"}}),
]


def ask_many(
    kube: CountingKube, n: int, key_: str | None = "k", built: list[int] | None = None
) -> list[list[str]]:
    """n concurrent runs' dry runs: the messages each got (one per manifest it asked)."""
    built = [] if built is None else built

    def build() -> passes.Manifests:
        built.append(1)
        return [(w, f, dict(m)) for w, f, m in MANIFESTS]

    async def main() -> list[list[str]]:
        answers = await asyncio.gather(
            *(passes.dry_run(kube, build, "ns", key_) for _ in range(n))  # type: ignore[arg-type]
        )
        return [[msg for _, _, msg in a] for a in answers]

    return asyncio.run(main())


def test_concurrent_runs_with_one_key_wait_for_one_dry_run_and_later_ones_reuse_it() -> None:
    kube = CountingKube()
    built: list[int] = []
    out = ask_many(kube, 20, built=built)
    assert sorted(out) == [[]] * 19 + [["", ""]]  # one asked, the others reused its answer
    assert kube.calls == 2  # one dry run of each of the two manifests
    assert len(built) == 1  # and only the asking run built its manifests
    assert ask_many(kube, 3, built=built) == [[]] * 3
    assert kube.calls == 2 and len(built) == 1


def test_an_accepted_dry_run_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = CountingKube()
    monkeypatch.setattr(passes, "DRY_RUN_CACHE_SECONDS", 0.0)
    ask_many(kube, 1)
    ask_many(kube, 1)
    assert kube.calls == 4
    monkeypatch.setattr(passes, "DRY_RUN_CACHE_SECONDS", 30.0)
    ask_many(kube, 1)
    for entry in passes.STATE.dry_runs.values():
        entry.expires = 0.0  # as if 30 s went by
    ask_many(kube, 1)
    assert kube.calls == 8


def test_a_rejection_is_not_shared_each_run_asks_for_itself() -> None:
    kube = CountingKube("spec.template: Invalid value")
    out = ask_many(kube, 3)
    assert out == [["spec.template: Invalid value"] * 2] * 3
    assert kube.calls == 6
    assert passes.STATE.dry_runs == {}


def test_runs_without_a_key_always_ask() -> None:
    kube = CountingKube()
    ask_many(kube, 3, None)
    assert kube.calls == 6
