"""Per-node restore from the loopback S3 server: an NxD-layout tag (TP=2, PP=2, ZeRO-1 over
DP=2; 8 ranks as threads on two "nodes" of four), restored with the nxd trainer's own file
selector. Each node must end up with exactly the shards its ranks load (derived here from
NxD's rank grid as NxD describes it) plus the shared files, byte-identical to what was saved.
The DCP version, with real training and resume, is in test_train_native.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cpt_training import checkpoint as ck
from cpt_training.nxd.layout import shard_file_name
from cpt_training.nxd.train import NxdPlan, restore_selector
from fixtures.collective import run_ranks

pytestmark = pytest.mark.integration

TP, PP, LWS, NODES = 2, 2, 4, 2
WORLD = LWS * NODES
DP = WORLD // (TP * PP)


def _save_tag(scratch: Path, step: int) -> Path:
    tag = scratch / ck.tag_for_step(step)
    files = {"checkpoint": b"1", "done": b"1", "user_content.pt": b"step %d" % step}
    for t in range(TP):
        for p in range(PP):
            files[f"model/{shard_file_name(t, p)}"] = os.urandom(40_000 + 1000 * t + 10 * p)
            for d in range(DP):
                files[f"optim/{shard_file_name(t, p, d)}"] = os.urandom(30_000 + 100 * d)
    for rel, data in files.items():
        (tag / rel).parent.mkdir(parents=True, exist_ok=True)
        (tag / rel).write_bytes(data)
    return tag


def _restore_as_rank(
    rank: int, coll: Any, root: str, tmp_path: Path, plan: NxdPlan, **extra: Any
) -> Any:
    """One rank of the two-node job, with the nxd trainer's own file selector."""
    node = rank // LWS
    return ck.restore_distributed(
        root,
        tmp_path / f"node{node}",
        collective=coll,
        node_id=f"n{node}",
        include_pretrained=True,
        select=restore_selector(plan, rank, LWS),
        **extra,
    )


def test_each_node_restores_exactly_its_ranks_nxd_shards_from_s3(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    root = f"s3://{bucket}/runs/nxd/ckpt"
    src = _save_tag(tmp_path / "saved", 8)
    world = {"backend": "nxd", "tensorParallel": TP, "pipelineParallel": PP}
    world |= {"dataParallel": DP, "zero1": True}
    manifest = ck.upload_and_commit(src, f"{root}/step_8", world=world)
    plan = NxdPlan(WORLD, TP, PP, DP, 1, 1, 16, True, False)

    def rank_main(rank: int, coll: Any) -> Any:
        got = _restore_as_rank(rank, coll, root, tmp_path, plan)
        assert got is not None and got.tag == "step_8"
        return got.local_path

    paths = run_ranks(WORLD, rank_main)
    # NxD: global ranks fill a [PP, DP, TP] grid row-major.
    grid = torch.arange(WORLD).reshape(PP, DP, TP)
    shared = {"checkpoint", "done", "user_content.pt"}
    total = 0
    for node in range(NODES):
        ranks = range(node * LWS, (node + 1) * LWS)
        want = set(shared)
        for p in range(PP):
            for d in range(DP):
                for t in range(TP):
                    if int(grid[p, d, t]) in ranks:
                        want |= {
                            f"model/{shard_file_name(t, p)}",
                            f"optim/{shard_file_name(t, p, d)}",
                        }
        local = paths[ranks[0]]
        have = {q.relative_to(local).as_posix() for q in local.rglob("*") if q.is_file()} - {
            ck.MANIFEST_NAME,
            ck.COMMIT_NAME,
        }
        assert have == want, node
        for rel in have:
            assert (local / rel).read_bytes() == (src / rel).read_bytes(), rel
        total += len(have - shared)
    assert total == len(manifest.files) - len(shared), "every shard went to exactly one node"


def test_a_tag_written_with_other_degrees_is_refused_on_every_rank_before_any_download(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    """The nxd trainer's pre-download check: this attempt runs TP=4, the tag was written with
    TP=2. Every rank gets the same refusal naming both sides, and no node fetched a byte
    (a 70B tag was downloaded in full before check_resume refused it)."""
    from cpt_training.nxd.train import resume_refusal

    root = f"s3://{bucket}/runs/nxd/refuse"
    src = _save_tag(tmp_path / "saved", 8)
    world = {"backend": "nxd", "tensorParallel": TP, "pipelineParallel": PP}
    world |= {"dataParallel": DP, "zero1": True}
    ck.upload_and_commit(src, f"{root}/step_8", world=world)
    plan = NxdPlan(WORLD, 4, 1, WORLD // 4, 1, 1, 16, True, False)

    def rank_main(rank: int, coll: Any) -> str:
        try:
            _restore_as_rank(rank, coll, root, tmp_path, plan, refuse=resume_refusal(plan))
        except ck.CheckpointRefused as exc:
            return str(exc)
        return "restored"

    answers = run_ranks(WORLD, rank_main)
    assert len(set(answers)) == 1, answers
    assert "tensorParallel=2 in the checkpoint but 4 now" in answers[0]
    assert "pipelineParallel=2 in the checkpoint but 1 now" in answers[0]
    fetched = [q for node in range(NODES) for q in (tmp_path / f"node{node}").rglob("*")]
    assert [q for q in fetched if q.is_file()] == []
    # The same attempt with its own degrees is not refused (the check is not a blanket no).
    assert (
        resume_refusal(NxdPlan(WORLD, TP, PP, DP, 1, 1, 16, True, False))(
            "step_8", ck.read_manifest(f"{root}/step_8")
        )
        is None
    )
