"""Fault matrix, tokenization: one shard's pod fails (docs/RELIABILITY.md, case 8).

The tokenize Job is Indexed with `backoffLimitPerIndex`: a failed shard reruns alone, the
finished shards are never recreated. Its pods wait behind the tool gate until the test has
marked the one that must fail (KWOK annotation), then all start together.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from e2e.harness import Runs
from faults._support import condition, fault_spec, gate

from fixtures.cluster import Cluster, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

INDEX = "batch.kubernetes.io/job-completion-index"
SHARDS = 4


def shard_pods(runs: Runs, run: str) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for pod in runs.pods(f"job-name={run}-tokenize"):
        out[int(pod["metadata"]["labels"][INDEX])].append(pod)
    return out


def gated_shards(runs: Runs, run: str) -> dict[int, dict[str, Any]]:
    """The first pod of every shard, still Pending behind the gate."""
    runs.wait_phase(run, "Tokenizing", timeout=60)

    def all_there() -> dict[int, list[dict[str, Any]]] | None:
        pods = shard_pods(runs, run)
        return pods if sorted(pods) == list(range(SHARDS)) else None

    pods = wait_for(all_there, timeout=60, what=f"{SHARDS} tokenize pods")
    return {i: p[0] for i, p in pods.items()}


def fail_shard(runs: Runs, pod: dict[str, Any], exit_code: int) -> None:
    runs.annotate_pod(
        pod["metadata"]["name"],
        {"test.cpt.dev/outcome": "fail", "test.cpt.dev/exit-code": str(exit_code)},
    )


def test_a_failed_tokenize_shard_reruns_only_its_own_index(
    runs: Runs, fault_cluster: Cluster, bucket: str
) -> None:
    body = fault_spec("shards", bucket, gated=True, data__shards=SHARDS)
    runs.create(body)
    first = gated_shards(runs, "shards")
    fail_shard(runs, first[2], exit_code=1)  # e.g. an OOM-free crash, retryable
    gate(fault_cluster, True)

    status = runs.wait_phase("shards", "PreparingWeights", timeout=90)
    pods = shard_pods(runs, "shards")
    for i in range(SHARDS):
        uids_i = [p["metadata"]["uid"] for p in pods[i]]
        if i == 2:
            phases = sorted(p["status"]["phase"] for p in pods[i])
            assert phases == ["Failed", "Succeeded"], phases
            assert first[2]["metadata"]["uid"] in uids_i
        else:
            assert uids_i == [first[i]["metadata"]["uid"]], f"shard {i} was rerun"
    (job,) = [j for j in runs.jobs("shards") if j["metadata"]["name"] == "shards-tokenize"]
    assert job["status"]["succeeded"] == SHARDS and job["status"]["failed"] == 1
    assert job["spec"]["backoffLimitPerIndex"] >= 1
    ready = condition(status, "DataReady")
    assert ready["status"] == "True" and ready["reason"] == "Completed"
    assert "AttemptFailed" not in runs.event_reasons("shards")
    assert not any(c["type"] == "Failed" and c["status"] == "True" for c in status["conditions"])


def test_a_shard_failing_on_bad_config_fails_the_run_at_once_and_starts_no_training(
    runs: Runs, fault_cluster: Cluster, bucket: str
) -> None:
    body = fault_spec("badshard", bucket, gated=True, data__shards=SHARDS)
    runs.create(body)
    first = gated_shards(runs, "badshard")
    fail_shard(runs, first[1], exit_code=2)  # cpt-train's "bad config": retrying cannot help
    gate(fault_cluster, True)

    status = runs.wait_phase("badshard", "Failed", timeout=90)
    failed = condition(status, "Failed")
    assert failed["reason"] == "TokenizationFailed"
    assert "badshard-tokenize failed" in failed["message"], failed["message"]
    assert "PodFailurePolicy" in failed["message"] and "exit code 2" in failed["message"], failed
    assert condition(status, "DataReady")["status"] == "False"
    assert len(shard_pods(runs, "badshard")[1]) == 1, "a bad-config shard must not be retried"
    assert runs.child_names("badshard") == ["badshard-tokenize"]
    warnings = [e for e in runs.events("badshard") if e["type"] == "Warning"]
    assert any("TokenizationFailed" in e["message"] for e in warnings), warnings


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        # The gate never opens: the shard pods stay unschedulable.
        ({"gated": True}, "Pending for more than 5s: Unschedulable"),
        # The Job controller cannot create pods naming a missing PriorityClass; the
        # planning-time dry run validates the Job, not its pods, so this is the first sign.
        ({"runtime__priorityClassName": "no-such-class"}, "has no pods after 5s"),
    ],
    ids=["unschedulable", "missing-priority-class"],
)
def test_a_tokenize_job_that_never_starts_fails_the_run_after_the_pending_timeout(
    runs: Runs, bucket: str, changes: dict[str, Any], expect: str
) -> None:
    body = fault_spec("nostart", bucket, resiliency={"pendingTimeoutSeconds": 5}, **changes)
    runs.create(body)
    status = runs.wait_phase("nostart", "Failed", timeout=90)
    failed = condition(status, "Failed")
    assert failed["reason"] == "TokenizationFailed", failed
    assert "Job nostart-tokenize" in failed["message"] and expect in failed["message"], failed
    ready = condition(status, "DataReady")
    assert ready["status"] == "False" and ready["reason"] == "PendingTimeout", ready
    # The Job goes, so its pods cannot start later for a run that already failed.
    wait_for(lambda: not runs.jobs("nostart"), timeout=30, what="the tokenize Job removed")
    assert not runs.pytorchjobs("nostart")
    warnings = [e for e in runs.events("nostart") if e["type"] == "Warning"]
    assert any(expect in e["message"] for e in warnings), warnings
