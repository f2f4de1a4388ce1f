"""A child that vanishes, while the operator watches or while it is down, is noticed and
recreated: these prove on the real control plane that the operator never acts on children
that are no longer there (each reconcile LISTs them by label)."""

from __future__ import annotations

from typing import Any

import pytest
from e2e.harness import OperatorProcess, Runs, spec_body

from fixtures.cluster import wait_for

pytestmark = pytest.mark.e2e


def waiting_run(name: str, bucket: str) -> dict[str, Any]:
    """Stays in Tokenizing: its tokenize pods ask for a node label no node has."""
    return spec_body(
        name,
        bucket,
        resiliency={"preflight": {"enabled": False}, "pendingTimeoutSeconds": 0},
        runtime__toolsNodeSelector={"test.cpt.dev/nowhere": "true"},
    )


def job_uid(runs: Runs, name: str) -> str | None:
    jobs = [j for j in runs.jobs(name.rsplit("-", 1)[0]) if j["metadata"]["name"] == name]
    return str(jobs[0]["metadata"]["uid"]) if jobs else None


def delete_job(runs: Runs, name: str) -> None:
    runs.cluster.api.delete(
        f"/apis/batch/v1/namespaces/{runs.ns}/jobs/{name}",
        propagationPolicy="Background",
    )


def recreated(runs: Runs, name: str, old_uid: str) -> str:
    def check() -> str | None:
        uid = job_uid(runs, name)
        return uid if uid and uid != old_uid else None

    return str(wait_for(check, timeout=60, what=f"{name} re-created"))


def test_a_child_deleted_behind_the_operators_back_is_noticed_and_recreated(
    runs: Runs, bucket: str
) -> None:
    runs.create(waiting_run("gone", bucket))
    runs.wait_phase("gone", "Tokenizing")
    first = wait_for(lambda: job_uid(runs, "gone-tokenize"), timeout=30, what="tokenize Job")
    delete_job(runs, "gone-tokenize")
    second = recreated(runs, "gone-tokenize", first)
    assert second != first
    assert runs.status("gone")["phase"] == "Tokenizing"
    # Once more: the index must not keep the first deletion's mark on the new child.
    delete_job(runs, "gone-tokenize")
    recreated(runs, "gone-tokenize", second)


def test_an_operator_restarted_after_a_child_vanished_lists_again_and_recreates_it(
    runs: Runs, operator: OperatorProcess, bucket: str
) -> None:
    runs.create(waiting_run("restart", bucket))
    runs.wait_phase("restart", "Tokenizing")
    first = wait_for(lambda: job_uid(runs, "restart-tokenize"), timeout=30, what="tokenize Job")
    operator.kill()
    delete_job(runs, "restart-tokenize")
    wait_for(lambda: job_uid(runs, "restart-tokenize") is None, timeout=30, what="the Job gone")
    operator.start()
    recreated(runs, "restart-tokenize", first)
    assert operator.alive(), operator.log_tail()
    assert runs.status("restart")["phase"] == "Tokenizing"
