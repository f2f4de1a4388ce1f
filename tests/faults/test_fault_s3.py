"""Fault matrix, S3: an upload killed mid-checkpoint, an S3 answering errors, and an S3
outage seen by the operator (docs/RELIABILITY.md, case 6).

The faults come from `S3FaultProxy` (tests/faults/_support.py), a loopback HTTP proxy in front
of the moto server that the code under test reaches through the standard AWS_ENDPOINT_URL,
exactly like any S3-compatible endpoint. Uploads, commits and restores are the workload's own
(`cpt_training.checkpoint`, `cpt_training.storage`), run in a separate process where a kill
is the fault.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.harness import FakeTrainer, OperatorProcess, Runs, committed_steps, s3_keys
from faults._support import S3FaultProxy, fault_spec, stays

from cpt_training import checkpoint as ck
from cpt_training import storage
from cpt_training.checkpoint import COMMIT_NAME, MANIFEST_NAME
from cpt_training.storage import TransferSettings
from fixtures.cluster import Cluster
from fixtures.s3 import S3Server

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

RETRYING = TransferSettings(max_concurrency=2, max_attempts=6, retry_mode="standard")


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[S3FaultProxy]:
    p = S3FaultProxy(s3.endpoint_url)
    yield p
    p.close()


@pytest.fixture
def via_proxy(
    proxy: S3FaultProxy, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> S3FaultProxy:
    """This process's S3 traffic goes through the proxy."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return proxy


def make_tag(root: Path, step: int, files: int = 6, size: int = 64 * 1024) -> Path:
    tag = root / f"step_{step}"
    (tag / "model").mkdir(parents=True)
    for i in range(files):
        (tag / "model" / f"shard_{i:02d}.pt").write_bytes(os.urandom(size))
    (tag / "user_content.pt").write_bytes(f"step {step}".encode())
    return tag


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


_UPLOADER = textwrap.dedent(
    """
    import sys
    from cpt_training import checkpoint as ck
    from cpt_training.storage import TransferSettings
    settings = TransferSettings(max_concurrency=2, max_attempts=2, retry_mode="standard")
    ck.upload_and_commit(sys.argv[1], sys.argv[2], settings=settings)
    print("COMMITTED", flush=True)
    """
)


@pytest.mark.parametrize(
    "stall_at",
    [r"PUT /[^/]+/ckpt/step_20/model/shard_03\.pt", rf"PUT /[^/]+/ckpt/step_20/{COMMIT_NAME}"],
    ids=["amid-the-data-files", "just-before-the-commit-marker"],
)
def test_an_upload_killed_mid_checkpoint_is_never_restored_and_the_next_save_replaces_it(
    stall_at: str, proxy: S3FaultProxy, s3: S3Server, s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/ckpt"
    good = make_tag(tmp_path / "scratch", 10)
    ck.upload_and_commit(good, f"{root}/step_10")  # straight to S3: the last good checkpoint

    new = make_tag(tmp_path / "scratch", 20)
    proxy.stall_re = re.compile(stall_at)
    env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": proxy.url}
    proc = subprocess.Popen(
        [sys.executable, "-c", _UPLOADER, str(new), f"{root}/step_20"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proxy.stalled.wait(60), f"the upload never reached {stall_at}"
        os.kill(proc.pid, signal.SIGKILL)  # the pod dies at exactly this point
        out, _ = proc.communicate(timeout=30)
    finally:
        proxy.release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and b"COMMITTED" not in out

    keys = s3_keys(s3_env, bucket, "ckpt/step_20/")
    assert f"ckpt/step_20/{COMMIT_NAME}" not in keys
    if "COMMIT" in stall_at.upper():  # everything else made it: still not a checkpoint
        assert f"ckpt/step_20/{MANIFEST_NAME}" in keys and len(keys) >= 8
    assert [c.tag for c in ck.list_committed(root)] == ["step_10"]
    restored = ck.restore(root, tmp_path / "restore")
    assert restored is not None and restored.step == 10
    assert same_tree(good, tmp_path / "restore" / "step_10")

    # The next attempt saves step 20 again over the leftovers and that one is complete.
    again = make_tag(tmp_path / "scratch2", 20)
    ck.upload_and_commit(again, f"{root}/step_20")
    restored = ck.restore(root, tmp_path / "restore")
    assert restored is not None and restored.step == 20
    assert same_tree(again, tmp_path / "restore" / "step_20")
    assert committed_steps(s3_env, bucket, "ckpt/") == [10, 20]


def test_s3_errors_on_the_first_requests_are_retried_with_backoff(
    via_proxy: S3FaultProxy, bucket: str, tmp_path: Path
) -> None:
    proxy = via_proxy
    uri = f"s3://{bucket}/ckpt/progress.json"
    proxy.fail_next, proxy.fail_code = 3, 503  # SlowDown, SlowDown, SlowDown, then fine
    storage.open_storage(f"s3://{bucket}/ckpt", RETRYING).write_json("progress.json", {"step": 7})
    puts = proxy.requests(r"PUT .*/ckpt/progress\.json")
    assert [s.status for s in puts] == [503, 503, 503, 200]
    gaps = [b.at - a.at for a, b in itertools.pairwise(puts)]
    assert all(g > 0 for g in gaps) and sum(gaps) > 0.05, f"no backoff between retries: {gaps}"
    assert storage.read_json(uri) == {"step": 7}

    # A whole checkpoint through 500 InternalError answers: committed, and restores intact.
    proxy.fail_next, proxy.fail_code = 4, 500
    src = make_tag(tmp_path / "scratch", 30)
    ck.upload_and_commit(src, f"s3://{bucket}/ckpt/step_30", settings=RETRYING)
    assert len(proxy.requests(r".")) > 4 and sum(s.status == 500 for s in proxy.seen) == 4
    got = ck.restore(f"s3://{bucket}/ckpt", tmp_path / "restore", settings=RETRYING)
    assert got is not None and got.step == 30
    assert same_tree(src, tmp_path / "restore" / "step_30")


def test_an_s3_that_keeps_failing_fails_the_save_and_commits_nothing(
    via_proxy: S3FaultProxy, s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    proxy = via_proxy
    root = f"s3://{bucket}/ckpt"
    proxy.down = True
    budget = TransferSettings(max_concurrency=1, max_attempts=3, retry_mode="standard")
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:  # botocore / s3transfer raise their own types
        ck.upload_and_commit(make_tag(tmp_path / "s", 40), f"{root}/step_40", settings=budget)
    assert time.monotonic() - t0 < 120
    assert re.search(r"SlowDown|503|reduce your request rate", str(err.value)), err.value
    first = proxy.seen[0]
    same = [s for s in proxy.seen if (s.method, s.path) == (first.method, first.path)]
    assert len(same) == 3, "gave up after exactly max_attempts tries"
    assert committed_steps(s3_env, bucket, "ckpt/") == []
    proxy.down = False
    ck.upload_and_commit(make_tag(tmp_path / "s2", 40), f"{root}/step_40", settings=budget)
    assert committed_steps(s3_env, bucket, "ckpt/") == [40]


def test_an_s3_outage_during_training_is_not_mistaken_for_a_hang(
    fault_cluster: Cluster, fault_ns: str, proxy: S3FaultProxy, s3_env: S3Server, bucket: str
) -> None:
    hang = 8
    op = OperatorProcess(fault_cluster, fault_ns, proxy.server_env(s3_env))
    op.start()
    try:
        runs = Runs(fault_cluster, fault_ns, op)
        body = fault_spec("s3out", bucket, resiliency={"hangTimeoutSeconds": hang})
        runs.create(body)
        runs.wait_phase("s3out", "Training", timeout=120)
        pods = runs.training_pods("s3out", 1, count=2)
        trainer = FakeTrainer(body["spec"]["checkpoints"]["s3Uri"])  # straight to S3
        trainer.commit(10)
        trainer.progress(attempt=1, step=11, max_steps=40, committed=10)
        runs.wait(
            "s3out",
            lambda s: (s.get("progress") or {}).get("step") == 11,
            timeout=30,
            what="step 11 in status",
        )

        proxy.down = True  # the operator cannot read S3 for twice the hang timeout
        stays(
            lambda: (
                runs.status("s3out").get("attempt") == 1
                and runs.status("s3out")["checkpoint"]["step"] == 10
                and runs.status("s3out")["progress"]["step"] == 11
            ),
            seconds=2 * hang,
            what="an S3 outage keeps the attempt and the last known progress",
        )
        assert len(proxy.requests(r"GET .*progress\.json")) >= 2, "the operator kept trying"
        proxy.down = False
        # Back: the trainer gets a full hang timeout to report again before anything happens.
        stays(
            lambda: runs.status("s3out").get("attempt") == 1,
            seconds=hang - 3,
            what="no hang declared right after S3 comes back",
        )
        trainer.progress(attempt=1, step=40, max_steps=40, committed=40)
        trainer.commit(40)
        master = next(p for p in pods if "-master-" in p["metadata"]["name"])
        runs.finish_pod(master["metadata"]["name"])
        status = runs.wait_phase("s3out", "Succeeded", timeout=90)
        assert status["attempt"] == 1 and status["checkpoint"]["step"] == 40
        assert "AttemptFailed" not in runs.event_reasons("s3out")
    finally:
        op.stop()
