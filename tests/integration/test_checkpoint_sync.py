"""Checkpoints on the loopback S3 server: multipart upload + verified restore, corruption,
a killed uploader, pruning, and the sync protocol over real torch.distributed (gloo)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from cpt_training import checkpoint as ck
from cpt_training import storage
from cpt_training.checkpoint import COMMIT_NAME, CheckpointCorruptError
from cpt_training.storage import TransferSettings, open_storage
from fixtures.legacy_ckpt import commit_the_old_way

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SMALL_PARTS = TransferSettings(
    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4
)


# ---------------------------------------------------------------------------------------------


def make_nxd_tag(local: Path, step: int, *, tp: int = 4, size: int = 3 * MiB) -> Path:
    """An NxD-style tag dir: checkpoint marker, per-TP-rank model/optim files, done."""
    tag = local / ck.tag_for_step(step)
    (tag / "model").mkdir(parents=True, exist_ok=True)
    (tag / "optim").mkdir(parents=True, exist_ok=True)
    (tag / "checkpoint").write_text("1")
    for r in range(tp):
        (tag / "model" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt").write_bytes(os.urandom(size))
        (tag / "optim" / f"dp_rank_00_tp_rank_{r:02d}_pp_rank_00.pt").write_bytes(
            os.urandom(2 * size + 17)
        )
    (tag / "user_content.pt").write_bytes(json.dumps({"total_steps": step}).encode())
    (tag / "done").write_text("1")
    return tag


def test_a_multipart_checkpoint_round_trips_through_s3_with_verification(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/runs/r1/ckpt"
    src = make_nxd_tag(tmp_path / "scratch", 100)
    manifest = ck.upload_and_commit(src, f"{root}/step_100", settings=SMALL_PARTS, world={"tp": 4})
    assert len(manifest.files) == 11
    client = storage.s3_client(SMALL_PARTS)
    head = client.head_object(
        Bucket=bucket, Key="runs/r1/ckpt/step_100/optim/dp_rank_00_tp_rank_00_pp_rank_00.pt"
    )
    assert "-" in head["ETag"], "6 MiB with 5 MiB parts is a multipart object"
    latest = ck.latest_committed(root)
    assert latest is not None and (latest.tag, latest.step) == ("step_100", 100)
    got = ck.restore(root, tmp_path / "restore", settings=SMALL_PARTS)
    assert got is not None and got.local_path is not None
    for f in manifest.files:
        assert (got.local_path / f.path).read_bytes() == (src / f.path).read_bytes()
    # What NxD's load_checkpoint looks for is there.
    assert (got.local_path / "done").read_text() == "1"


def test_a_flipped_byte_in_s3_is_detected_and_restore_falls_back(
    s3_env: Any, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = f"s3://{bucket}/ckpt"
    for step in (10, 20):
        ck.upload_and_commit(
            make_nxd_tag(tmp_path / "s", step, tp=2, size=MiB), f"{root}/step_{step}"
        )
    key = "ckpt/step_20/model/dp_rank_00_tp_rank_01_pp_rank_00.pt"
    client = s3_env.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[12345] ^= 0x80
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    got = ck.restore(root, tmp_path / "restore")
    assert got is not None and got.tag == "step_10"
    assert "s3://" in caplog.text and "step_20 (step 20) is corrupt" in caplog.text
    assert "model/dp_rank_00_tp_rank_01_pp_rank_00.pt: crc64nvme" in caplog.text
    st = open_storage(f"{root}/step_20")
    assert not st.exists(COMMIT_NAME) and st.exists(ck.CORRUPT_NAME)
    # Corrupt the only remaining tag too: the error names it.
    client.put_object(Bucket=bucket, Key="ckpt/step_10/done", Body=b"2")
    with pytest.raises(CheckpointCorruptError, match=r"no intact committed.*step_10.*done"):
        ck.restore(root, tmp_path / "restore2")


_UPLOADER = textwrap.dedent(
    """
    import sys
    from cpt_training import checkpoint as ck
    from cpt_training.storage import TransferSettings
    s = TransferSettings(multipart_threshold=5 << 20, multipart_chunksize=5 << 20,
                         max_concurrency=2, max_bandwidth=2 << 20, retry_mode="standard")
    ck.upload_and_commit(sys.argv[1], sys.argv[2], settings=s)
    print("COMMITTED", flush=True)
    """
)


def test_a_sha256_manifest_on_s3_still_restores_and_its_corruption_is_caught(
    s3_env: Any, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tags committed before the switch to CRC64NVME (entries under "sha256") keep working."""
    root = f"s3://{bucket}/legacy"
    ck.upload_and_commit(make_nxd_tag(tmp_path / "s", 1, tp=1, size=MiB), f"{root}/step_1")
    src = make_nxd_tag(tmp_path / "s", 2, tp=2, size=3 * MiB)
    commit_the_old_way(src, f"{root}/step_2", 2)
    assert {f.algorithm for f in ck.read_manifest(f"{root}/step_2").files} == {"sha256"}
    got = ck.restore(root, tmp_path / "restore", settings=SMALL_PARTS)
    assert got is not None and got.tag == "step_2" and got.local_path is not None
    for p in src.rglob("*.pt"):
        assert (got.local_path / p.relative_to(src)).read_bytes() == p.read_bytes()
    key = "legacy/step_2/optim/dp_rank_00_tp_rank_01_pp_rank_00.pt"
    client = s3_env.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[4 * MiB] ^= 0x04
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    got = ck.restore(root, tmp_path / "restore2", settings=SMALL_PARTS)
    assert got is not None and got.tag == "step_1"
    assert "optim/dp_rank_00_tp_rank_01_pp_rank_00.pt: sha256" in caplog.text
    assert open_storage(f"{root}/step_2").exists(ck.CORRUPT_NAME)


def test_an_uploader_killed_mid_upload_leaves_nothing_restorable(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/ckpt"
    ck.upload_and_commit(make_nxd_tag(tmp_path / "s", 100, tp=1, size=MiB), f"{root}/step_100")
    big = make_nxd_tag(tmp_path / "s", 200, tp=4, size=4 * MiB)  # ~50 MiB at 2 MiB/s
    proc = subprocess.Popen(
        [sys.executable, "-c", _UPLOADER, str(big), f"{root}/step_200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    client = s3_env.client()
    deadline = time.monotonic() + 60
    started = False
    while time.monotonic() < deadline and proc.poll() is None:
        objs = client.list_objects_v2(Bucket=bucket, Prefix="ckpt/step_200/").get("KeyCount", 0)
        parts = client.list_multipart_uploads(Bucket=bucket, Prefix="ckpt/step_200/")
        if objs or parts.get("Uploads"):
            started = True
            time.sleep(0.5)  # let it get properly under way
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"uploader finished too early: {proc.communicate()}"
    assert started, "the upload never started"
    os.kill(proc.pid, signal.SIGKILL)
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and b"COMMITTED" not in out
    partial = client.list_objects_v2(Bucket=bucket, Prefix="ckpt/step_200/")
    assert not any(o["Key"].endswith(COMMIT_NAME) for o in partial.get("Contents", []))
    latest = ck.latest_committed(root)
    assert latest is not None and latest.tag == "step_100"
    got = ck.restore(root, tmp_path / "restore")
    assert got is not None and got.tag == "step_100"
    # The next attempt commits a newer tag; prune then removes the killed one, parts included.
    ck.upload_and_commit(make_nxd_tag(tmp_path / "s", 300, tp=1, size=MiB), f"{root}/step_300")
    assert "step_200" in ck.prune(root, keep=2)
    assert client.list_objects_v2(Bucket=bucket, Prefix="ckpt/step_200/")["KeyCount"] == 0
    assert not client.list_multipart_uploads(Bucket=bucket, Prefix="ckpt/step_200/").get("Uploads")
    assert [c.tag for c in ck.list_committed(root)] == ["step_100", "step_300"]


def test_prune_on_s3_keeps_n_and_never_touches_pretrained_weights(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/ckpt"
    for step in (1, 2, 3, 4, 5):
        ck.upload_and_commit(
            make_nxd_tag(tmp_path / "s", step, tp=1, size=1000), f"{root}/step_{step}"
        )
    pre = make_nxd_tag(tmp_path / "p", 0, tp=1, size=1000)
    ck.upload_and_commit(pre, f"{root}/{ck.PRETRAINED_TAG}", step=0)
    assert sorted(ck.prune(root, keep=3)) == ["step_1", "step_2"]
    assert open_storage(root).list_dirs() == [ck.PRETRAINED_TAG, "step_3", "step_4", "step_5"]
    assert ck.latest_committed(root, include_pretrained=True).tag == "step_5"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# The protocol over torch.distributed gloo: 3 ranks on 2 "nodes", S3 root.
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dist_worker(rank: int, world: int, port: int, root: str, tmp: str, out: str) -> None:
    import torch.distributed as dist

    from cpt_training.checkpoint import sync as cksync

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    node = "a" if rank < 2 else "b"
    local = Path(tmp) / f"node-{node}"
    syncer = ck.CheckpointSyncer(
        root, keep=2, collective=cksync.collective_for(), node_id=node, max_pending=4
    )
    committed: list[str] = []
    for step in range(1, 10):
        if step % 3 == 0:
            tag = local / ck.tag_for_step(step)
            tag.mkdir(parents=True, exist_ok=True)
            (tag / f"__{rank}_0.distcp").write_bytes(bytes([rank, step]) * (MiB // 2 + rank))
            if rank == 0:
                (tag / ".metadata").write_bytes(b"m%d" % step)
            syncer.submit(tag, step=step)
        committed += [c.tag for c in syncer.poll()]
        time.sleep(0.05)
    committed += [c.tag for c in syncer.finalize(timeout=60)]
    syncer.close()
    dist.barrier()
    if rank == 0:  # corrupt the newest committed tag in S3
        st = open_storage(f"{root}/step_9")
        st.write_bytes("__2_0.distcp", b"garbage")
    dist.barrier()
    got = ck.restore_distributed(root, Path(tmp) / f"restore-{node}", node_id=node)
    result = {
        "committed": committed,
        "failures": [f.tag for f in syncer.failures],
        "restored": got.tag if got else None,
        "files": sorted(os.listdir(got.local_path)) if got and got.local_path else [],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_three_ranks_on_two_nodes_commit_over_gloo_and_restore_together(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/dist/ckpt"
    world, port = 3, _free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_dist_worker,
            args=(r, world, port, root, str(tmp_path), str(tmp_path)),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for res in results:
        assert res["committed"] == ["step_3", "step_6", "step_9"]
        assert res["failures"] == []
        assert res["restored"] == "step_6", "step_9 was corrupted: all ranks fell back together"
        assert res["files"] == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
            "__2_0.distcp",
            COMMIT_NAME,
            ck.MANIFEST_NAME,
        ]
    m = ck.read_manifest(f"{root}/step_6")
    assert {(f.path, f.node) for f in m.files} == {
        (".metadata", 0),
        ("__0_0.distcp", 0),
        ("__1_0.distcp", 0),
        ("__2_0.distcp", 1),
    }
    assert m.world["worldSize"] == 3 and m.world["nodes"] == 2
    assert [c.tag for c in ck.list_committed(root)] == ["step_6"], "step_3 pruned, step_9 bad"
