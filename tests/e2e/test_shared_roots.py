"""Two runs must never own overlapping S3 prefixes (checkpoints, output): the newer one would
resume from, prune or overwrite the older one's checkpoints and model. On the real control
plane: the newer run fails in Planning naming both, with no child; the older run goes on; and
a restarted operator still knows the older runs before it plans a new one."""

from __future__ import annotations

from typing import Any

import pytest
from e2e.harness import OperatorProcess, Runs, spec_body

pytestmark = pytest.mark.e2e


def waiting_run(name: str, bucket: str, **changes: Any) -> dict[str, Any]:
    """Stays in Tokenizing: its tokenize pods ask for a node label no node has."""
    return spec_body(
        name,
        bucket,
        resiliency={"preflight": {"enabled": False}, "pendingTimeoutSeconds": 0},
        runtime__toolsNodeSelector={"test.cpt.dev/nowhere": "true"},
        **changes,
    )


def assert_refused(runs: Runs, name: str, field: str, other: str) -> None:
    status = runs.wait_phase(name, "Failed", timeout=60)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StorageRootInUse", failed
    assert failed["message"].startswith(f"{field}: ") and f"/{other}" in failed["message"]
    assert runs.child_names(name) == []
    warnings = [e for e in runs.events(name) if e["type"] == "Warning"]
    assert any("StorageRootInUse" in e["message"] for e in warnings), warnings


def test_a_run_reusing_another_runs_prefix_fails_before_any_child_and_the_first_goes_on(
    runs: Runs, bucket: str
) -> None:
    runs.create(waiting_run("first", bucket))
    runs.wait_phase("first", "Tokenizing")
    same = waiting_run("second", bucket, checkpoints__s3Uri=f"s3://{bucket}/runs/first/")
    runs.create(same)
    assert_refused(runs, "second", "spec.checkpoints.s3Uri", "first")
    inside = waiting_run("third", bucket, output__s3Uri=f"s3://{bucket}/runs/first/export/")
    runs.create(inside)
    assert_refused(runs, "third", "spec.output.s3Uri", "first")
    assert runs.status("first")["phase"] == "Tokenizing"


def test_a_restarted_operator_knows_the_older_runs_before_planning_a_new_one(
    runs: Runs, operator: OperatorProcess, bucket: str
) -> None:
    runs.create(waiting_run("older", bucket))
    runs.wait_phase("older", "Tokenizing")
    operator.kill()
    runs.create(waiting_run("newer", bucket, checkpoints__s3Uri=f"s3://{bucket}/runs/older/"))
    operator.start()
    assert_refused(runs, "newer", "spec.checkpoints.s3Uri", "older")
    assert runs.status("older")["phase"] == "Tokenizing"
