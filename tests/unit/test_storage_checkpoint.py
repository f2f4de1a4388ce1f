"""Checkpoint commit/restore/prune and the sync protocol on local folders (fast, no servers).

The multi-rank protocol runs here with ranks as threads over an in-memory all-gather; the
same protocol over real torch.distributed (gloo) and S3 is in
tests/integration/test_checkpoint_sync.py."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from cpt_training import checkpoint as ck
from cpt_training.checkpoint import (
    COMMIT_NAME,
    CORRUPT_NAME,
    MANIFEST_NAME,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointSyncer,
)
from cpt_training.storage import open_storage
from fixtures.collective import run_ranks

pytestmark = pytest.mark.unit


def write_tag(local: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    return local


def saved(tmp: Path, step: int, n: int = 3, size: int = 1000) -> Path:
    """A DCP-like tag dir with deterministic content per step."""
    files = {f"__{i}_0.distcp": bytes([step % 256, i]) * (size // 2) for i in range(n)}
    files[".metadata"] = json.dumps({"step": step}).encode()
    return write_tag(tmp / "scratch" / ck.tag_for_step(step), files)


def test_tags_and_steps_round_trip() -> None:
    assert ck.tag_for_step(120) == "step_120"
    assert ck.step_of_tag("step_120") == 120
    assert ck.step_of_tag("pretrained_weight") is None
    assert ck.step_of_tag("step_x") is None


def test_commit_writes_a_manifest_and_then_a_marker_bound_to_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    src = saved(tmp_path, 10)
    manifest = ck.upload_and_commit(src, str(root / "step_10"), world={"worldSize": 1})
    tag = open_storage(str(root / "step_10"))
    assert tag.list() == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "__2_0.distcp",
        COMMIT_NAME,
        MANIFEST_NAME,
    ]
    body = tag.read_bytes(MANIFEST_NAME)
    marker = tag.read_json(COMMIT_NAME)
    assert marker["manifestSha256"] == ck.manifest.sha256_bytes(body)
    assert marker["step"] == 10 and marker["files"] == 4
    m = json.loads(body)
    assert m["world"] == {"worldSize": 1}
    assert {f["path"] for f in m["files"]} == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "__2_0.distcp",
    }
    assert manifest.total_bytes == m["totalBytes"] == sum(p.stat().st_size for p in src.iterdir())
    entry = manifest.by_path()["__1_0.distcp"]
    assert entry.algorithm == ck.HASH_ALGORITHM == m["algorithm"] == "crc64nvme"
    assert entry.digest == ck.file_digest(src / "__1_0.distcp", "crc64nvme")


def test_commit_refuses_a_tag_whose_upload_is_missing_or_short(tmp_path: Path) -> None:
    src = saved(tmp_path, 3)
    tag_uri = str(tmp_path / "root" / "step_3")
    entries = ck.upload_node_files(src, tag_uri, 0)
    open_storage(tag_uri).write_bytes("__1_0.distcp", b"short")
    open_storage(tag_uri).delete("__2_0.distcp")
    with pytest.raises(CheckpointError, match=r"2 file\(s\) not uploaded intact.*__1_0.distcp"):
        ck.commit(tag_uri, step=3, entries=entries)
    assert ck.latest_committed(str(tmp_path / "root")) is None


def test_commit_without_entries_hashes_the_tag_in_place(tmp_path: Path) -> None:
    tag_dir = saved(tmp_path, 7)
    # Written straight into the durable root (as NxD's own S3 storage would).
    m = ck.commit(str(tag_dir))
    assert m.step == 7 and len(m.files) == 4
    assert ck.latest_committed(str(tag_dir.parent)).tag == "step_7"  # type: ignore[union-attr]
    with pytest.raises(CheckpointError, match="cannot infer the step"):
        ck.commit(str(write_tag(tmp_path / "odd", {"x": b"1"})))


def test_latest_committed_ignores_uncommitted_tags_and_pretrained_weights(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert ck.latest_committed(str(root)) is None
    for step in (5, 20):
        ck.upload_and_commit(saved(tmp_path, step), str(root / f"step_{step}"))
    ck.upload_node_files(saved(tmp_path, 30), str(root / "step_30"), 0)  # never committed
    pre = write_tag(tmp_path / "pre", {"model/tp_rank_00.pt": b"w"})
    ck.upload_and_commit(pre, str(root / ck.PRETRAINED_TAG), step=0)
    (root / "notes").mkdir()
    latest = ck.latest_committed(str(root))
    assert latest is not None and (latest.tag, latest.step) == ("step_20", 20)
    assert [c.tag for c in ck.list_committed(str(root))] == ["step_5", "step_20"]
    assert [c.tag for c in ck.list_committed(str(root), include_pretrained=True)] == [
        ck.PRETRAINED_TAG,
        "step_5",
        "step_20",
    ]
    only_pre = tmp_path / "root2"
    ck.upload_and_commit(pre, str(only_pre / ck.PRETRAINED_TAG), step=0)
    assert ck.latest_committed(str(only_pre)) is None
    got = ck.latest_committed(str(only_pre), include_pretrained=True)
    assert got is not None and got.tag == ck.PRETRAINED_TAG


def test_restore_downloads_verifies_and_reuses_an_intact_local_copy(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for step in (1, 2):
        ck.upload_and_commit(saved(tmp_path, step), str(root / f"step_{step}"))
    dst = tmp_path / "restore"
    (dst / "step_1").mkdir(parents=True)  # an older local tag: pruned after restore
    got = ck.restore(str(root), dst)
    assert got is not None and got.tag == "step_2" and got.local_path == dst / "step_2"
    assert (dst / "step_2" / "__0_0.distcp").read_bytes() == (
        tmp_path / "scratch" / "step_2" / "__0_0.distcp"
    ).read_bytes()
    assert sorted(os.listdir(dst)) == ["step_2"]
    # The pod restarts on the same node: the verified local copy is reused even if the
    # object store is slow or (here) the data objects are gone.
    (dst / "step_2" / "stale-leftover").write_bytes(b"x")
    open_storage(str(root / "step_2")).delete("__0_0.distcp")
    again = ck.restore(str(root), dst)
    assert again is not None and again.tag == "step_2"
    assert not (dst / "step_2" / "stale-leftover").exists()


def test_restore_falls_back_from_a_corrupted_tag_and_quarantines_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    for step in (1, 2):
        ck.upload_and_commit(saved(tmp_path, step), str(root / f"step_{step}"))
    victim = root / "step_2" / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[7] ^= 0x01
    victim.write_bytes(bytes(data))
    got = ck.restore(str(root), tmp_path / "restore")
    assert got is not None and got.tag == "step_1"
    assert "step_2 (step 2) is corrupt" in caplog.text and "__1_0.distcp: crc64nvme" in caplog.text
    assert not (root / "step_2" / COMMIT_NAME).exists()
    assert "crc64nvme" in json.loads((root / "step_2" / CORRUPT_NAME).read_text())["reason"]
    assert ck.latest_committed(str(root)).tag == "step_1"  # type: ignore[union-attr]
    assert not (tmp_path / "restore" / "step_2").exists()


def test_restore_raises_clearly_when_no_committed_tag_is_intact(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ck.upload_and_commit(saved(tmp_path, 4), str(root / "step_4"))
    (root / "step_4" / ".metadata").write_bytes(b"{}")  # truncated
    with pytest.raises(
        CheckpointCorruptError,
        match=r"no intact committed checkpoint.*step_4.*"
        r"\.metadata: size 2 != manifest",
    ):
        ck.restore(str(root), tmp_path / "restore", quarantine=False)
    assert (root / "step_4" / COMMIT_NAME).exists(), "quarantine=False leaves the marker"
    assert ck.restore(str(tmp_path / "empty"), tmp_path / "restore") is None
    with pytest.raises(CheckpointError, match=r"step_9.*not committed"):
        ck.restore(str(root), tmp_path / "restore", tag="step_9")


def test_a_rewritten_manifest_no_longer_matches_its_commit_marker(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ck.upload_and_commit(saved(tmp_path, 1), str(root / "step_1"))
    m = json.loads((root / "step_1" / MANIFEST_NAME).read_text())
    m["files"] = m["files"][:1]
    (root / "step_1" / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(CheckpointCorruptError, match="does not match the digest"):
        ck.read_manifest(str(root / "step_1"))


def test_prune_keeps_the_newest_n_and_removes_stale_uncommitted_tags(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for step in (10, 20, 30, 40):
        ck.upload_and_commit(saved(tmp_path, step), str(root / f"step_{step}"))
    ck.upload_node_files(saved(tmp_path, 25), str(root / "step_25"), 0)  # killed upload
    ck.upload_node_files(saved(tmp_path, 50), str(root / "step_50"), 0)  # upload in flight
    pre = write_tag(tmp_path / "pre", {"w.pt": b"w"})
    ck.upload_and_commit(pre, str(root / ck.PRETRAINED_TAG), step=0)
    deleted = ck.prune(str(root), keep=2)
    assert sorted(deleted) == ["step_10", "step_20", "step_25"]
    assert sorted(os.listdir(root)) == [ck.PRETRAINED_TAG, "step_30", "step_40", "step_50"]
    assert ck.prune(str(root), keep=2) == []
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ck.prune(str(root), keep=0)


def test_an_interrupted_deletion_is_never_restorable(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for step in (1, 2):
        ck.upload_and_commit(saved(tmp_path, step), str(root / f"step_{step}"))
    # Prune deletes the marker first; simulate dying right after that.
    ck.uncommit(str(root / "step_2"))
    assert ck.latest_committed(str(root)).tag == "step_1"  # type: ignore[union-attr]
    got = ck.restore(str(root), tmp_path / "r")
    assert got is not None and got.tag == "step_1"


def test_prune_local_keeps_newer_in_progress_dirs(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step}").mkdir()
    (tmp_path / "other").mkdir()
    assert ck.prune_local(tmp_path, keep_tags=["step_3"]) == ["step_1", "step_2"]
    assert sorted(os.listdir(tmp_path)) == ["other", "step_3", "step_4"]


def test_merge_entries_accepts_identical_duplicates_and_rejects_conflicts() -> None:
    a = ck.FileEntry("done", 1, "aa", 0)
    b = ck.FileEntry("done", 1, "aa", 1)
    assert ck.merge_entries([[a, ck.FileEntry("m/0.pt", 5, "x", 0)], [b]]) == [
        a,
        ck.FileEntry("m/0.pt", 5, "x", 0),
    ]
    with pytest.raises(CheckpointError, match="nodes 0 and 1 wrote different content to 'done'"):
        ck.merge_entries([[a], [ck.FileEntry("done", 1, "bb", 1)]])


# ---------------------------------------------------------------------------------------------
# The protocol with ranks as threads
# ---------------------------------------------------------------------------------------------


def test_two_nodes_upload_their_own_files_and_rank0_commits_the_merged_manifest(
    tmp_path: Path,
) -> None:
    root = str(tmp_path / "durable")
    world, per_node = 4, 2

    def rank_main(rank: int, coll: Any) -> Any:
        node = rank // per_node
        local = tmp_path / f"node{node}"
        syncer = CheckpointSyncer(
            root, keep=2, collective=coll, node_id=f"n{node}", world_info={"backend": "native"}
        )
        committed = []
        for step in range(1, 13):
            if step % 4 == 0:
                tag_dir = local / ck.tag_for_step(step)
                files = {f"__{rank}_0.distcp": bytes([rank, step]) * 300}
                if rank == 0:
                    files[".metadata"] = b"meta%d" % step
                write_tag(tag_dir, files)
                syncer.submit(tag_dir, step=step)
            committed += syncer.poll()
            time.sleep(0.01)
        committed += syncer.finalize(timeout=30)
        syncer.close()
        return [c.tag for c in committed], syncer.failures

    results = run_ranks(world, rank_main)
    for tags, failures in results:
        assert tags == ["step_4", "step_8", "step_12"]
        assert failures == []
    latest = ck.latest_committed(root)
    assert latest is not None and latest.tag == "step_12"
    m = ck.read_manifest(latest.uri)
    assert {(f.path, f.node) for f in m.files} == {
        (".metadata", 0),
        ("__0_0.distcp", 0),
        ("__1_0.distcp", 0),
        ("__2_0.distcp", 1),
        ("__3_0.distcp", 1),
    }
    assert m.world == {"worldSize": 4, "nodes": 2, "backend": "native"}
    assert [c.tag for c in ck.list_committed(root)] == ["step_8", "step_12"], "pruned to keep=2"
    for node in (0, 1):
        assert sorted(os.listdir(tmp_path / f"node{node}")) == ["step_12"], "local_keep=1"
    got = ck.restore(root, tmp_path / "restored")
    assert got is not None and len(os.listdir(got.local_path)) == 5 + 2  # + manifest, marker


def test_uploads_wait_for_async_saves_on_every_rank_of_the_node(tmp_path: Path) -> None:
    root = str(tmp_path / "durable")
    futures = [Future[None]() for _ in range(2)]

    def rank_main(rank: int, coll: Any) -> Any:
        syncer = CheckpointSyncer(root, collective=coll, node_id="n0")
        tag_dir = tmp_path / "local" / "step_1"
        if rank == 0:
            write_tag(tag_dir, {"a": b"a"})
        coll.all_gather_object(None)  # both ranks see the dir
        syncer.submit(tag_dir, step=1, ready=futures[rank])
        for _ in range(5):
            assert syncer.poll() == []
            time.sleep(0.02)
        states = coll.all_gather_object(syncer._pending[0].upload)
        assert all(s is None for s in states), "no upload before every rank's save is done"
        if rank == 1:
            write_tag(tag_dir, {"b": b"b"})
            futures[1].set_result(None)
            futures[0].set_result(None)
        done = syncer.finalize(timeout=20)
        syncer.close()
        return [c.tag for c in done]

    assert run_ranks(2, rank_main) == [["step_1"], ["step_1"]]
    files = {f.path for f in ck.read_manifest(str(tmp_path / "durable" / "step_1")).files}
    assert files == {"a", "b"}


def test_a_failed_save_on_one_rank_fails_the_tag_on_every_rank(tmp_path: Path) -> None:
    root = str(tmp_path / "durable")

    def rank_main(rank: int, coll: Any) -> Any:
        syncer = CheckpointSyncer(root, collective=coll, node_id=f"n{rank}")
        tag_dir = write_tag(tmp_path / f"l{rank}" / "step_2", {f"r{rank}": b"x"})
        fut: Future[None] = Future()
        if rank == 1:
            fut.set_exception(OSError("disk full"))
        else:
            fut.set_result(None)
        syncer.submit(tag_dir, step=2, ready=fut)
        committed = syncer.finalize(timeout=20)
        # The next save goes through.
        syncer.submit(write_tag(tmp_path / f"l{rank}" / "step_3", {f"r{rank}": b"y"}), step=3)
        committed += syncer.finalize(timeout=20)
        syncer.close()
        return [c.tag for c in committed], [(f.tag, f.reason) for f in syncer.failures]

    for tags, failures in run_ranks(2, rank_main):
        assert tags == ["step_3"]
        assert failures == [("step_2", "rank 1: OSError: disk full")]
    assert ck.latest_committed(root).tag == "step_3"  # type: ignore[union-attr]


def test_saves_faster_than_uploads_supersede_the_queued_tag(tmp_path: Path) -> None:
    root = str(tmp_path / "durable")
    syncer = CheckpointSyncer(root, collective=ck.SingleProcess(), max_pending=2)
    gate: Future[None] = Future()
    for step in (1, 2, 3):
        syncer.submit(saved(tmp_path, step), step=step, ready=gate if step == 1 else None)
    assert syncer.pending == ["step_1", "step_3"]
    gate.set_result(None)
    assert [c.tag for c in syncer.finalize(timeout=20)] == ["step_1", "step_3"]
    assert [f.tag for f in syncer.failures] == ["step_2"]
    syncer.close()


def test_finalize_timeout_fails_pending_tags_on_all_ranks_together(tmp_path: Path) -> None:
    root = str(tmp_path / "durable")

    def rank_main(rank: int, coll: Any) -> Any:
        syncer = CheckpointSyncer(root, collective=coll, node_id="n")
        never: Future[None] = Future()
        syncer.submit(
            write_tag(tmp_path / "l" / "step_1", {"x": b"1"}),
            step=1,
            ready=never if rank == 1 else None,
        )
        out = syncer.finalize(timeout=0.3 if rank == 0 else 30, interval=0.05)
        syncer.close()
        return out, [f.reason for f in syncer.failures]

    assert run_ranks(2, rank_main) == [([], ["finalize timeout"])] * 2
    assert ck.latest_committed(root) is None


def test_ranks_that_disagree_on_the_pending_tag_get_a_clear_error(tmp_path: Path) -> None:
    def rank_main(rank: int, coll: Any) -> Any:
        syncer = CheckpointSyncer(str(tmp_path / "d"), collective=coll, node_id="n")
        syncer.submit(
            write_tag(tmp_path / f"l{rank}" / f"step_{rank + 1}", {"x": b"1"}), step=rank + 1
        )
        with pytest.raises(CheckpointError, match=r"ranks disagree.*same step"):
            syncer.poll()
        syncer.close()

    run_ranks(2, rank_main)


def test_a_single_process_syncer_works_without_torch_distributed(tmp_path: Path) -> None:
    syncer = CheckpointSyncer(str(tmp_path / "durable"), keep=1)
    assert syncer.collective.world_size == 1
    seen: list[str] = []
    syncer.on_commit = lambda c: seen.append(c.tag)
    syncer.submit(saved(tmp_path, 5), step=5, extra={"tokens": 123})
    syncer.finalize(timeout=10)
    syncer.close()
    assert seen == ["step_5"]
    assert syncer.last_committed is not None and syncer.last_committed.step == 5
    assert ck.read_manifest(syncer.last_committed.uri).extra == {"tokens": 123}


def test_ready_accepts_callables_torch_style_futures_and_async_save_responses() -> None:
    from cpt_training.checkpoint.sync import _ready_state

    class TorchLikeFuture:
        def __init__(self, done: bool, error: Exception | None = None) -> None:
            self._done, self._error = done, error

        def done(self) -> bool:
            return self._done

        def wait(self) -> None:
            if self._error:
                raise self._error

    class AsyncSaveResponse:
        def __init__(self, upload: Any) -> None:
            self.staging_completion = TorchLikeFuture(True)
            self.upload_completion = upload

    assert _ready_state(None) == (True, None)
    assert _ready_state(lambda: False) == (False, None)
    assert _ready_state(TorchLikeFuture(False)) == (False, None)
    assert _ready_state(TorchLikeFuture(True)) == (True, None)
    assert _ready_state(TorchLikeFuture(True, OSError("io"))) == (False, "OSError: io")
    assert _ready_state(AsyncSaveResponse(TorchLikeFuture(False))) == (False, None)
    assert _ready_state(AsyncSaveResponse(TorchLikeFuture(True))) == (True, None)
