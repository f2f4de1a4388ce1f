"""Per-node restore: which files of a tag a node fetches, for NxD layouts and in general.

The NxD rank grid is checked against an independent construction (NxD's own description: a
``[PP, DP, TP]`` arange, and its TP=4 trn1 example groups). The seed's 70B run is modelled
with real shard sizes (the reference sharder on meta tensors), so the per-node fractions are
derived from the layout, not typed in. Restores run against local storage with ranks as
threads; the S3 and real-training versions are in tests/integration.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cpt_training import checkpoint as ck
from cpt_training.checkpoint import (
    COMMIT_NAME,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Selection,
    TagFiles,
)
from cpt_training.checkpoint.select import choose, node_ranks, select_for_ranks, union
from cpt_training.nxd.layout import (
    RANK_FILE_RE,
    LlamaShape,
    RankCoords,
    hf_param_names,
    nxd_rank_coords,
    nxd_rank_files,
    plan_layout,
    shard_file_name,
    shard_full_state,
)
from cpt_training.nxd.train import NxdPlan, missing_rank_files, restore_selector
from fixtures.collective import run_ranks

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------
# NxD's rank grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "tp", "pp"), [(32, 8, 4), (1024, 8, 8), (64, 2, 4), (16, 1, 2)])
def test_rank_coordinates_follow_nxds_pp_dp_tp_grid(world: int, tp: int, pp: int) -> None:
    dp = world // (tp * pp)
    grid = torch.arange(world).reshape(pp, dp, tp)
    for p in range(pp):
        for d in range(dp):
            for t in range(tp):
                r = int(grid[p, d, t])
                assert nxd_rank_coords(r, world_size=world, tp=tp, pp=pp) == RankCoords(t, p, d)


def test_tp4_on_trn1_uses_nxds_strided_groups_inside_a_node() -> None:
    # NxD's example for TP=4, PP=1 on two trn1.32xlarge (64 cores): TP groups [0, 8, 16, 24],
    # [1, 9, 17, 25], ... and DP groups [0..7, 32..39], [8..15, 40..47], ...
    coords = [nxd_rank_coords(r, world_size=64, tp=4, pp=1, local_world_size=32) for r in range(64)]
    for node_base in (0, 32):
        for i in range(8):
            group = [node_base + i + 8 * k for k in range(4)]
            assert [coords[r].tp for r in group] == [0, 1, 2, 3]
            assert len({coords[r].dp for r in group}) == 1
    for t in range(4):
        dp_group = [r for r in range(64) if coords[r].tp == t]
        assert dp_group == [*range(8 * t, 8 * t + 8), *range(32 + 8 * t, 40 + 8 * t)]
        assert [coords[r].dp for r in dp_group] == list(range(16))


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of TP x PP"):
        nxd_rank_coords(0, world_size=30, tp=8, pp=4)
    with pytest.raises(ValueError, match="outside"):
        nxd_rank_coords(32, world_size=32, tp=8, pp=4)


# ---------------------------------------------------------------------------------------------
# The seed's Llama-2-70B run: TP=8, PP=8, ZeRO-1 over DP=16, 32 trn1.32xlarge
# ---------------------------------------------------------------------------------------------

LLAMA2_70B = LlamaShape(
    num_layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=32000
)
SHARED = {"checkpoint": 2, "done": 2, "user_content.pt": 1500}


def _hf_meta_state(shape: LlamaShape) -> dict[str, torch.Tensor]:
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    dims = {
        "embed_tokens": (shape.vocab, h),
        "lm_head": (shape.vocab, h),
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (shape.intermediate, h),
        "up_proj": (shape.intermediate, h),
        "down_proj": (h, shape.intermediate),
    }
    out = {}
    for name in hf_param_names(shape):
        key = name.split(".")[-2]
        out[name] = torch.empty(dims.get(key, (h,)), device="meta")
    return out


@functools.lru_cache
def shard_params(shape: LlamaShape, tp: int, pp: int) -> dict[tuple[int, int], int]:
    """Parameters per (TP rank, PP stage) from the reference sharder. Every decoder layer
    shards alike, so one layer per stage is sharded and scaled by the stage's layer count."""
    layout = plan_layout(shape, tp=tp, pp=pp, qkv_linear=tp >= shape.kv_heads)
    one = dataclasses.replace(shape, num_layers=pp)
    small = plan_layout(one, tp=tp, pp=pp, qkv_linear=layout.qkv_linear)
    out = {}
    for (t, p), sd in shard_full_state(_hf_meta_state(one), small).items():
        layer = sum(w.numel() for k, w in sd.items() if k.startswith("model.layers."))
        rest = sum(w.numel() for k, w in sd.items() if not k.startswith("model.layers."))
        out[(t, p)] = layer * len(layout.layers_of_stage(p)) + rest
    return out


def nxd_manifest(
    shape: LlamaShape, *, tp: int, pp: int, dp: int, zero1: bool, tag: str = "step_100"
) -> Manifest:
    """A committed NxD tag as the 70B run writes it: bf16 model shards (DP rank 0), and fp32
    master weights + Adam moments (12 bytes per parameter) split over DP with ZeRO-1."""
    files = [FileEntry(p, n, "0" * 64) for p, n in SHARED.items()]
    for (t, p), params in shard_params(shape, tp, pp).items():
        files.append(FileEntry(f"model/{shard_file_name(t, p)}", 2 * params, "0" * 64))
        for d in range(dp if zero1 else 1):
            size = 12 * params // (dp if zero1 else 1)
            files.append(FileEntry(f"optim/{shard_file_name(t, p, d)}", size, "0" * 64))
    world = {
        "backend": "nxd",
        "tensorParallel": tp,
        "pipelineParallel": pp,
        "dataParallel": dp,
        "zero1": zero1,
    }
    return Manifest(tag=tag, step=100, files=files, world=world)


def plan_of(world: int, tp: int, pp: int, zero1: bool) -> NxdPlan:
    dp = world // (tp * pp)
    return NxdPlan(world, tp, pp, dp, 1, 8, 4096, zero1 and dp > 1, True)


def per_node(manifest: Manifest, plan: NxdPlan, lws: int) -> list[set[str]]:
    view = TagFiles("unused://", manifest)
    out = []
    for node in range(plan.world_size // lws):
        sel = select_for_ranks(
            view, node_ranks(node, lws), lambda r: restore_selector(plan, r, lws)
        )
        assert sel.paths is not None, sel.reason
        out.append(set(sel.paths))
    return out


def _pp(path: str) -> int:
    m = RANK_FILE_RE.match(path)
    assert m is not None
    return int(m["pp"])


def _bytes(manifest: Manifest, paths: set[str], prefix: str) -> int:
    return sum(f.size for f in manifest.files if f.path in paths and f.path.startswith(prefix))


def test_a_70b_node_fetches_its_stage_of_the_model_and_its_ranks_optimizer_shards() -> None:
    world, lws, tp, pp = 32 * 32, 32, 8, 8
    plan = plan_of(world, tp, pp, zero1=True)
    manifest = nxd_manifest(LLAMA2_70B, tp=tp, pp=pp, dp=plan.dp, zero1=True)
    nodes = per_node(manifest, plan, lws)
    everything = set(manifest.by_path())
    total_model = _bytes(manifest, everything, "model/")
    total_optim = _bytes(manifest, everything, "optim/")
    assert total_model + total_optim > 0.9e12, "the tag is ~1 TB, as the seed's estimate says"
    grid = torch.arange(world).reshape(pp, plan.dp, tp)
    for n, files in enumerate(nodes):
        ranks = set(node_ranks(n, lws))
        stages = {p for p in range(pp) if ranks & set(grid[p].flatten().tolist())}
        model = {f for f in files if f.startswith("model/")}
        optim = {f for f in files if f.startswith("optim/")}
        assert len(model) == tp * len(stages)
        assert len(optim) == lws, "ZeRO-1: one optimizer shard per rank of the node"
        assert set(SHARED) <= files
        # The node's model bytes are exactly its stages' shards ...
        assert _bytes(manifest, model, "model/") == sum(
            f.size for f in manifest.files if f.path.startswith("model/") and _pp(f.path) in stages
        )
        # ... which is about 1/PP of the model (the embedding stages are a little larger),
        # and its optimizer bytes about its share of the world's ranks.
        assert _bytes(manifest, model, "model/") / total_model == pytest.approx(
            len(stages) / pp, rel=0.05
        )
        assert _bytes(manifest, optim, "optim/") / total_optim == pytest.approx(
            lws / world, rel=0.05
        )
        assert _bytes(manifest, files, "") < total_optim / 20 + total_model / 6
    # Every file is fetched by some node; each optimizer shard by exactly one, each model
    # shard by every node of its stage (DP ranks per stage / DP ranks per node).
    count: dict[str, int] = {}
    for files in nodes:
        for f in files:
            count[f] = count.get(f, 0) + 1
    assert set(count) == set(manifest.by_path())
    nodes_per_stage = (world // pp) // lws
    for path, c in count.items():
        want = 1 if path.startswith("optim/") else nodes_per_stage
        assert c == (len(nodes) if path in SHARED else want), path


def test_without_zero1_every_dp_rank_reads_dp_rank_0s_optimizer_shard() -> None:
    plan = plan_of(64, 8, 2, zero1=False)
    manifest = nxd_manifest(LLAMA2_70B, tp=8, pp=2, dp=plan.dp, zero1=False)
    nodes = per_node(manifest, plan, 32)
    for files in nodes:
        optim = sorted(f for f in files if f.startswith("optim/"))
        assert optim and all(f.startswith("optim/dp_rank_00_") for f in optim)
        assert len(optim) == len([f for f in files if f.startswith("model/")])


def test_the_pretrained_tag_has_no_optimizer_and_needs_only_model_shards() -> None:
    plan = plan_of(64, 8, 2, zero1=True)
    full = nxd_manifest(LLAMA2_70B, tp=8, pp=2, dp=plan.dp, zero1=True, tag="pretrained_weight")
    files = [f for f in full.files if not f.path.startswith("optim/")]
    files.append(FileEntry("config.json", 600, "0" * 64))
    manifest = Manifest("pretrained_weight", 0, files, world=dict(full.world))
    nodes = per_node(manifest, plan, 32)
    assert nodes[0] == {
        "config.json",
        *SHARED,
        *(f"model/{shard_file_name(t, 0)}" for t in range(8)),
    }


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ({"tensorParallel": 4}, "tensorParallel=4 in the checkpoint but 8 now"),
        ({"dataParallel": 8}, "dataParallel=8 in the checkpoint but 4 now"),
    ],
)
def test_a_tag_written_with_other_degrees_is_restored_whole_with_the_reason(
    edit: dict[str, Any], why: str
) -> None:
    plan = plan_of(64, 8, 2, zero1=True)
    manifest = nxd_manifest(LLAMA2_70B, tp=8, pp=2, dp=plan.dp, zero1=True)
    manifest.world.update(edit)
    sel = choose(restore_selector(plan, 5, 32), TagFiles("unused://", manifest))
    assert sel.is_whole and why in sel.reason


def test_files_the_layout_does_not_explain_mean_the_whole_tag() -> None:
    coords = RankCoords(tp=1, pp=0, dp=3)
    base = ["done", f"model/{shard_file_name(1, 0)}", f"optim/{shard_file_name(1, 0, 3)}"]
    assert nxd_rank_files(base, coords, zero1=True) == set(base)
    # expert parallelism, or shards that exist but not for this rank: not ours to guess
    assert (
        nxd_rank_files(
            [*base, "model/dp_rank_00_ep_rank_01_tp_rank_01_pp_rank_00.pt"], coords, zero1=True
        )
        is None
    )
    assert (
        nxd_rank_files([*base[:2], f"optim/{shard_file_name(1, 0, 2)}"], coords, zero1=True) is None
    )
    # unknown non-shard files are fetched by everyone, xser companions go with their shard
    xser = [
        f"model/{shard_file_name(1, 0)}.tensors/tensor_7.pt",
        f"model/{shard_file_name(1, 0)}.info.pt",
        f"model/{shard_file_name(2, 0)}.tensors/tensor_7.pt",
        "optim/__0_0.distcp",
    ]
    got = nxd_rank_files([*base, *xser], coords, zero1=True)
    assert got == {*base, xser[0], xser[1], xser[3]}


def test_a_rank_checks_its_real_coordinates_against_what_its_node_restored(tmp_path: Path) -> None:
    tag = tmp_path / "step_4"
    paths = [
        "done",
        *(f"model/{shard_file_name(t, 0)}" for t in range(2)),
        *(f"optim/{shard_file_name(t, 0, d)}" for t in range(2) for d in range(2)),
    ]
    entries = [{"path": p, "size": 1, "sha256": "0" * 64} for p in paths]
    (tag / "model").mkdir(parents=True)
    (tag / "optim").mkdir()
    (tag / MANIFEST_NAME).write_text(json.dumps({"files": entries}))
    for p in ["done", f"model/{shard_file_name(1, 0)}", f"optim/{shard_file_name(1, 0, 1)}"]:
        (tag / p).write_text("x")
    assert missing_rank_files(tag, RankCoords(tp=1, pp=0, dp=1), zero1=True) == []
    assert missing_rank_files(tag, RankCoords(tp=0, pp=0, dp=1), zero1=True) == [
        f"model/{shard_file_name(0, 0)}",
        f"optim/{shard_file_name(0, 0, 1)}",
    ]


# ---------------------------------------------------------------------------------------------
# The selection rules
# ---------------------------------------------------------------------------------------------


def _view(paths: list[str]) -> TagFiles:
    return TagFiles("unused://", Manifest("step_1", 1, [FileEntry(p, 1, "0" * 64) for p in paths]))


def test_a_selector_that_fails_or_names_unknown_files_means_the_whole_tag() -> None:
    view = _view(["a", "b"])

    def boom(_: TagFiles) -> Selection:
        raise RuntimeError("no metadata")

    assert choose(boom, view) == Selection.whole("file selection failed: RuntimeError: no metadata")
    sel = choose(lambda v: Selection.of({"a", "zzz"}), view)
    assert sel.is_whole and "zzz" in sel.reason
    assert choose(lambda v: Selection.of({"a"}), view) == Selection.of({"a"})
    assert union([Selection.of({"a"}), Selection.of({"b"})]) == Selection.of({"a", "b"})
    assert union([Selection.of({"a"}), Selection.whole("x")]).is_whole
    assert list(node_ranks(2, 32)) == list(range(64, 96))


def test_small_files_a_selector_reads_are_verified_against_the_manifest(tmp_path: Path) -> None:
    tag = tmp_path / "root" / "step_1"
    tag.mkdir(parents=True)
    (tag / ".metadata").write_bytes(b"meta")
    manifest = ck.upload_and_commit(tag, str(tag), step=1)
    view = TagFiles(str(tag), manifest)
    assert view.read_bytes(".metadata") == b"meta"
    (tag / ".metadata").write_bytes(b"evil")
    with pytest.raises(ValueError, match="does not match the manifest"):
        view.read_bytes(".metadata")
    with pytest.raises(KeyError):
        view.read_bytes("other")


# ---------------------------------------------------------------------------------------------
# Restores with a selection (local storage; ranks as threads)
# ---------------------------------------------------------------------------------------------


def _commit(root: Path, step: int, files: dict[str, bytes]) -> None:
    tag = root / ck.tag_for_step(step)
    for rel, data in files.items():
        (tag / rel).parent.mkdir(parents=True, exist_ok=True)
        (tag / rel).write_bytes(data)
    ck.upload_and_commit(tag, str(tag), step=step)


def _rank_files(step: int, world: int) -> dict[str, bytes]:
    files = {f"shard_{r}.bin": bytes([r, step]) * 100 for r in range(world)}
    files["shared.json"] = b"{}"
    return files


def _own(rank: int) -> Callable[[TagFiles], Selection]:
    return lambda view: Selection.of({"shared.json", f"shard_{rank}.bin"})


def test_single_process_restore_fetches_and_verifies_only_the_selection(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _commit(root, 2, _rank_files(2, 4))
    dst = tmp_path / "local"
    # a stale unselected file in scratch goes; an unselected corrupt file is not this node's
    (dst / "step_2").mkdir(parents=True)
    (dst / "step_2" / "shard_3.bin").write_bytes(b"stale")
    (root / "step_2" / "shard_2.bin").write_bytes(b"bitrot")
    got = ck.restore(str(root), dst, select=_own(1))
    assert got is not None and got.local_path is not None
    assert sorted(p.name for p in got.local_path.iterdir()) == sorted(
        [COMMIT_NAME, MANIFEST_NAME, "shard_1.bin", "shared.json"]
    )
    record = json.loads((got.local_path / COMMIT_NAME).read_text())
    assert record["files"] == ["shard_1.bin", "shared.json"]
    # the selected file corrupt: quarantined, the previous tag restored
    _commit(root, 4, _rank_files(4, 4))
    (root / "step_4" / "shard_1.bin").write_bytes(b"bitrot")
    got = ck.restore(str(root), dst, select=_own(1))
    assert got is not None and got.tag == "step_2"
    assert (root / "step_4" / ck.CORRUPT_NAME).exists()


def test_distributed_restore_gives_each_node_its_ranks_files_and_falls_back_together(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    world, per = 6, 3  # two nodes of three ranks
    _commit(root, 3, _rank_files(3, world))
    _commit(root, 6, _rank_files(6, world))
    (root / "step_6" / "shard_4.bin").write_bytes(b"bitrot")  # only node 1 reads it

    def undecided(view: TagFiles) -> Selection:
        raise RuntimeError("cannot tell")

    def rank_main(rank: int, coll: Any) -> Any:
        node = rank // per
        select = undecided if rank == 2 else _own(rank)  # rank 2 cannot decide: node 0 whole
        got = ck.restore_distributed(
            str(root),
            tmp_path / f"node{node}",
            collective=coll,
            node_id=f"n{node}",
            select=select,
        )
        assert got is not None and got.local_path is not None
        return got.tag, sorted(p.name for p in got.local_path.iterdir())

    results = run_ranks(world, rank_main)
    assert {tag for tag, _ in results} == {"step_3"}, "node 1 found step_6 corrupt: all fell back"
    markers = [COMMIT_NAME, MANIFEST_NAME]
    assert results[0][1] == sorted([*markers, "shared.json", *(f"shard_{r}.bin" for r in range(6))])
    assert results[3][1] == sorted(
        [*markers, "shared.json", "shard_3.bin", "shard_4.bin", "shard_5.bin"]
    )
    assert (root / "step_6" / ck.CORRUPT_NAME).exists()
