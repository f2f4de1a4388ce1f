"""Two runs must never own overlapping S3 prefixes (reconcile/admission.py `shared_roots`):
the newer one is blocked before any child exists, the older one goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_operator.reconcile.admission import ROOT_IN_USE, RunRoots, shared_roots

pytestmark = pytest.mark.unit

SPECS = Path(__file__).resolve().parents[1] / "golden" / "specs"


def run_body(
    name: str, ckpt: str, output: str, *, ns: str = "team-a", created: str = "2026-11-01T10:00:00Z"
) -> dict[str, Any]:
    body = yaml.safe_load((SPECS / "trn1-nxd.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": ns, "creationTimestamp": created}
    body["spec"]["checkpoints"]["s3Uri"] = ckpt
    body["spec"]["output"]["s3Uri"] = output
    return body


def roots(body: dict[str, Any]) -> RunRoots:
    r = RunRoots.of(body)
    assert r is not None
    return r


OLD = run_body("old", "s3://bkt/runs/old/", "s3://bkt/models/old/")


@pytest.mark.parametrize(
    ("ckpt", "output", "field", "clash"),
    [
        ("s3://bkt/runs/old/", "s3://bkt/models/new/", "spec.checkpoints.s3Uri", "same prefix"),
        ("s3://bkt/runs/old/sub/", "s3://bkt/models/new/", "spec.checkpoints.s3Uri", "inside"),
        ("s3://bkt/runs/", "s3://bkt/models/new/", "spec.checkpoints.s3Uri", "around"),
        ("s3://bkt/runs/new/", "s3://bkt/models/old", "spec.output.s3Uri", "no trailing slash"),
    ],
)
def test_a_newer_run_overlapping_an_older_runs_prefix_is_blocked_naming_both(
    ckpt: str, output: str, field: str, clash: str
) -> None:
    new = roots(run_body("new", ckpt, output, ns="team-b", created="2026-11-02T10:00:00Z"))
    (blocker,) = shared_roots(new, [roots(OLD), new])
    assert blocker.reason == ROOT_IN_USE and blocker.field == field
    assert blocker.message.startswith(f"{field}: ") and "team-a/old" in blocker.message
    # The older run is never blocked by the newer one.
    assert shared_roots(roots(OLD), [roots(OLD), new]) == []


def test_sibling_prefixes_and_other_buckets_do_not_clash() -> None:
    for ckpt, out in [
        ("s3://bkt/runs/old2/", "s3://bkt/models/old2/"),  # shares a string prefix, not a folder
        ("s3://other/runs/old/", "s3://other/models/old/"),
    ]:
        new = roots(run_body("new", ckpt, out, created="2026-11-02T10:00:00Z"))
        assert shared_roots(new, [roots(OLD)]) == []


def test_runs_created_in_the_same_second_are_ordered_by_namespace_and_name() -> None:
    a = roots(run_body("a", "s3://bkt/runs/x/", "s3://bkt/models/a/"))
    b = roots(run_body("b", "s3://bkt/runs/x/", "s3://bkt/models/b/"))
    assert shared_roots(a, [a, b]) == [] and len(shared_roots(b, [a, b])) == 1


def test_a_run_that_already_writes_keeps_its_prefix_over_one_created_in_the_same_second() -> None:
    # "newer" sorts before "older" by name; the older one has children (it is tokenizing).
    older_body = run_body("older", "s3://bkt/runs/x/", "s3://bkt/models/older/")
    older_body["status"] = {"phase": "Tokenizing", "children": {"tokenize": "older-tokenize"}}
    older = roots(older_body)
    newer = roots(run_body("newer", "s3://bkt/runs/x/", "s3://bkt/models/newer/"))
    assert shared_roots(older, [older, newer]) == []
    (blocker,) = shared_roots(newer, [older, newer])
    assert "older" in blocker.message


def test_a_run_with_an_invalid_spec_owns_nothing() -> None:
    body = run_body("bad", "s3://bkt/runs/old/", "s3://bkt/models/bad/")
    body["spec"]["training"]["nodes"] = -1
    assert RunRoots.of(body) is None


def test_the_controller_keeps_each_runs_newest_prefixes_from_the_run_watch() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from test_handlers import FakeKube, new_run

    from cpt_operator import handlers
    from cpt_operator.settings import OperatorSettings

    ctl = handlers.Controller(OperatorSettings(), FakeKube(new_run()), ThreadPoolExecutor(1))
    body = run_body("r", "s3://bkt/runs/r/", "s3://bkt/models/r/")
    handlers.remember_roots(ctl, body)
    changed = run_body("r", "s3://bkt/runs/other/", "s3://bkt/models/r/")
    handlers.remember_roots(ctl, changed)
    assert dict(ctl.roots[("team-a", "r")].roots)["spec.checkpoints.s3Uri"] == (
        "s3://bkt/runs/other/"
    )
    changed["spec"]["training"]["nodes"] = -1  # invalid: it fails in planning, owns nothing
    handlers.remember_roots(ctl, changed)
    assert ctl.roots == {}
