"""The benchmark harness's pure parts: measurement records, goals, report rendering, the
steady-state selection of training steps, the planner's held-out summary. No timing here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench import common, gpu_train, planner_bench, report  # noqa: E402

pytestmark = pytest.mark.unit


def _m(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "x.y", "machine": "m", "config": {}, "metric": "tokens/s"}
    base.update(kw)
    value = base.pop("value", 1.0)
    return common.measurement(
        base["name"],
        base["machine"],
        base["config"],
        base["metric"],
        value,
        baseline=base.get("baseline"),
        goal=base.get("goal"),
        date="2026-01-01T00:00:00+00:00",
        details=base.get("details"),
    )


def test_a_measurement_with_a_baseline_carries_value_over_baseline_as_its_ratio() -> None:
    m = _m(value=300.0, baseline=("seed", 100.0))
    assert m["ratio"] == pytest.approx(3.0)
    assert m["baselineName"] == "seed" and m["baselineValue"] == 100.0


def test_goals_compare_the_value_or_the_ratio_in_the_stated_direction() -> None:
    assert common.goal_met(_m(value=1.2e6, goal=common.goal(">=", 1e6))) is True
    assert common.goal_met(_m(value=0.9e6, goal=common.goal(">=", 1e6))) is False
    assert common.goal_met(_m(value=0.4, goal=common.goal("<=", 0.5))) is True
    ratio_goal = common.goal(">=", 1.5, "ratio")
    assert common.goal_met(_m(value=10.0, baseline=("b", 8.0), goal=ratio_goal)) is False
    assert common.goal_met(_m(value=10.0)) is None


def test_results_files_round_trip_and_incomplete_measurements_are_refused(tmp_path: Path) -> None:
    path = common.write_results("t", [_m(value=2.0)], tmp_path)
    loaded = common.load_results([path])
    assert loaded[0]["value"] == 2.0 and loaded[0]["source"] == "t.json"
    with pytest.raises(ValueError, match="lacks"):
        common.write_results("bad", [{"name": "n"}], tmp_path)
    (tmp_path / "notalist.json").write_text(json.dumps({"name": "n"}))
    with pytest.raises(ValueError, match="JSON list"):
        common.load_results([tmp_path / "notalist.json"])


def test_percentile_interpolates_and_cv_needs_two_samples() -> None:
    assert common.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert common.percentile([5.0], 99) == 5.0
    assert common.cv([1.0]) is None
    assert common.cv([1.0, 1.0]) == 0.0


def test_the_report_rewrites_only_the_marked_blocks_and_marks_misses() -> None:
    doc = (
        "# Perf\nprose stays\n<!-- bench:tokenize:begin -->\nold\n<!-- bench:tokenize:end -->\n"
        "<!-- bench:operator:begin -->\nold\n<!-- bench:operator:end -->\n"
        "<!-- bench:goals:begin -->\n<!-- bench:goals:end -->\n"
    )
    items = [
        _m(name="tokenize.per_core", value=0.5e6, goal=common.goal(">=", 1e6)),
        _m(
            name="tokenize.vs_seed",
            value=4.0,
            baseline=("seed", 1.0),
            goal=common.goal(">=", 3.0, "ratio"),
        ),
    ]
    out = report.apply_blocks(doc, report.render_blocks(items))
    assert "prose stays" in out and "old" not in out
    assert "`tokenize.per_core`" in out and "**missed**" in out and "4.00x" in out
    assert "_No results yet" in out  # the operator section has no results
    assert out == report.apply_blocks(out, report.render_blocks(items))  # idempotent


def test_report_numbers_are_formatted_by_metric() -> None:
    assert report.fmt(0.5234, "MFU") == "52.3%"
    assert report.fmt(1_234_567.0) == "1.23 M"
    assert report.fmt(54_321.0) == "54,321"
    assert report.fmt(None) == "-"


def _train_result(step_times: list[float], saves: list[int]) -> dict[str, Any]:
    return {
        "steps": [{"step": i + 1, "step_time_s": t} for i, t in enumerate(step_times)],
        "saves": [{"step": s, "blockingSeconds": 0.1} for s in saves],
        "tokensPerStep": 1000,
        "flopsPerToken": 1e9,
        "peakFlopsPerDevice": 1e12,
        "worldSize": 1,
        "dataWaits": [0.001, 0.002, 0.001],
    }


def test_steady_steps_skip_warm_up_and_everything_after_the_first_checkpoint() -> None:
    res = _train_result([9.0, 1.0, 1.0, 1.0, 1.0, 5.0, 1.0], saves=[5])
    kept = [s["step"] for s in gpu_train.steady_steps(res, warmup=1)]
    assert kept == [2, 3, 4, 5]


def test_run_summary_turns_the_median_step_into_tokens_per_second_and_mfu() -> None:
    res = _train_result([9.0, 1.0, 2.0, 1.0, 1.0], saves=[])
    s = gpu_train.summarize_run(res, warmup=1)
    assert s["medianStepSeconds"] == 1.0
    assert s["tokensPerSec"] == 1000.0
    assert s["mfu"] == pytest.approx(1e9 * 1000 / 1e12)
    with pytest.raises(ValueError, match="no steady-state steps"):
        gpu_train.summarize_run(res, warmup=10)


def test_kernel_names_fall_into_the_expected_categories() -> None:
    assert gpu_train._kernel_category("ncclDevKernel_AllGather_RING_LL") == "communication (NCCL)"
    assert gpu_train._kernel_category("flash_fwd_kernel") == "attention"
    assert gpu_train._kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert gpu_train._kernel_category("triton_per_fused_add_mul_0").startswith("fused")


def test_the_train_config_is_a_valid_train_stage_config(tmp_path: Path) -> None:
    from cpt_training.config import TrainStage

    wire = gpu_train.train_config(
        model_dir=tmp_path / "m",
        data_dir=tmp_path / "d",
        ckpt_dir=tmp_path / "c",
        seq=4096,
        micro=2,
        accum=4,
        world=2,
        steps=10,
        every=5,
        compile_model=True,
        ac="none",
        device="cuda",
    )
    cfg = TrainStage.model_validate(wire)
    assert cfg.global_batch_size == 16 and cfg.stop_after_steps == 10
    assert cfg.checkpoint.uri == cfg.checkpoint.local_dir


def test_planner_held_out_summary_takes_max_and_mean_per_group_with_a_goal_on_trn1() -> None:
    rows = [
        {"id": "a", "group": "nxd/trn1", "measured_mfu": 0.3, "loo_mfu": 0.33, "loo_error": 0.1},
        {"id": "b", "group": "nxd/trn1", "measured_mfu": 0.3, "loo_mfu": 0.24, "loo_error": -0.2},
        {
            "id": "c",
            "group": "native/h100",
            "measured_mfu": 0.4,
            "loo_mfu": 0.44,
            "loo_error": 0.1,
            "lso_error": -0.25,
        },
        {
            "id": "d",
            "group": "native/a100",
            "measured_mfu": 0.5,
            "loo_mfu": None,
            "loo_error": None,
        },
    ]
    ms = {m["name"]: m for m in planner_bench.loo_measurements(rows, "m")}
    assert ms["planner.loo.nxd_trn1.max"]["value"] == pytest.approx(0.2)
    assert ms["planner.loo.nxd_trn1.mean"]["value"] == pytest.approx(0.15)
    assert common.goal_met(ms["planner.loo.nxd_trn1.max"]) is False
    assert "goal" not in ms["planner.loo.native_h100.max"]
    assert ms["planner.lso.native_h100.max"]["value"] == pytest.approx(0.25)
    assert "planner.lso.nxd_trn1.max" not in ms
    # A group with one row cannot be held out: reported as not measurable, never as met.
    single = ms["planner.loo.native_a100.held_out_rows"]
    assert single["value"] == 0 and "goal" not in single
    assert single["details"]["status"].startswith("not measurable")
    assert "planner.loo.native_a100.max" not in ms


def test_planner_own_rows_are_leave_one_out_predictions_with_a_goal() -> None:
    rows = [
        {
            "id": "pub",
            "group": "native/h100",
            "measured_mfu": 0.4,
            "loo_mfu": 0.5,
            "loo_error": 0.25,
            "measured_by": "published",
        },
        {
            "id": "ours",
            "group": "native/h100",
            "measured_mfu": 0.5,
            "loo_mfu": 0.45,
            "loo_error": -0.1,
            "lso_mfu": 0.4,
            "lso_error": -0.2,
            "measured_by": "cpt",
        },
    ]
    (m,) = planner_bench.own_row_measurements(rows, "m")
    assert m["name"] == "planner.own.ours" and m["value"] == pytest.approx(0.1)
    assert common.goal_met(m) is True
    assert m["details"]["leaveStudyOutError"] == pytest.approx(-0.2)
    alone = [{**rows[1], "loo_mfu": None, "loo_error": None}]
    with pytest.raises(ValueError, match="cannot hold it out"):
        planner_bench.own_row_measurements(alone, "m")


def test_planner_bench_refuses_gpu_results_that_are_not_calibration_rows() -> None:
    results = [
        {
            "file": "bench/results/train-h100.json",
            "name": "train.native.mfu",
            "tokensPerSecPerDevice": 100.0,
        },
        {
            "file": "bench/results/scaling-h200x2.json",
            "name": "scaling.fsdp2.2gpu.mfu",
            "tokensPerSecPerDevice": 50.0,
        },
    ]
    anchors = [
        {
            "source": "bench/results/train-h100.json train.native.mfu (1x H100)",
            "tokens_per_sec_per_device": 100.0,
        },
        {
            "source": "bench/results/scaling-h200x2.json scaling.fsdp2.2gpu.mfu (2x H200)",
            "tokens_per_sec_per_device": 49.0,
        },
    ]
    assert planner_bench.unanchored(results, anchors) == [
        "bench/results/scaling-h200x2.json scaling.fsdp2.2gpu.mfu"
    ]
    assert planner_bench.unanchored(results[:1], anchors) == []


def test_planner_bench_finds_every_gpu_result_in_the_calibration_rows() -> None:
    common.bootstrap()
    from cpt_operator.api import planner

    ours = [
        {"source": a.source, "tokens_per_sec_per_device": a.tokens_per_sec_per_device}
        for a in planner.anchors()
        if a.measured_by == "cpt"
    ]
    found = planner_bench.result_rows(common.RESULTS)
    assert found and planner_bench.unanchored(found, ours) == []


def test_idle_writes_are_the_api_servers_mutating_requests_on_the_operators_resources() -> None:
    from bench import operator_bench as ob

    metrics = "\n".join(
        [
            "# HELP apiserver_request_total Counter of apiserver requests",
            'apiserver_request_total{code="201",component="apiserver",dry_run="",group="batch",'
            'resource="jobs",scope="resource",subresource="",verb="POST",version="v1"} 3',
            'apiserver_request_total{code="200",component="apiserver",dry_run="",group="cpt.dev",'
            'resource="continualpretrains",scope="resource",subresource="status",verb="PATCH",'
            'version="v1alpha1"} 2',
            'apiserver_request_total{code="200",component="apiserver",dry_run="",group="",'
            'resource="pods",scope="resource",subresource="",verb="GET",version="v1"} 50',
            'apiserver_request_total{code="201",component="apiserver",dry_run="",group="",'
            'resource="events",scope="resource",subresource="",verb="POST",version="v1"} 9',
        ]
    )
    counts = ob.request_counts(metrics)
    assert counts["PATCH continualpretrains/status"] == 2 and counts["GET pods"] == 50
    assert ob.write_requests(counts) == 5  # reads and Events (counted apart) left out


def test_the_operator_benchmark_run_is_a_valid_spec_that_waits_without_secrets() -> None:
    from bench import operator_bench as ob
    from cpt_operator.api.models import ContinualPretrainSpec

    body = ob.run_body("run-0001", "bucket")
    spec = ContinualPretrainSpec.model_validate(body["spec"])
    assert spec.data.shards == 1
    assert "hfTokenSecretRef" not in body["spec"]["runtime"]
    assert body["spec"]["checkpoints"]["s3Uri"] == "s3://bucket/runs/run-0001/"


def test_profiler_annotation_ranges_are_not_counted_as_kernels() -> None:
    assert gpu_train._is_annotation("Optimizer.step#AdamW.step")
    assert gpu_train._is_annotation("FSDP::pre_forward")
    assert not gpu_train._is_annotation("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT")


def test_annotation_time_is_parsed_from_the_profiler_table_and_removed_once() -> None:
    table = (
        "  Name  Self CPU %  Self CPU  CPU total %  CPU total  CPU time avg  Self CUDA  "
        "Self CUDA %  CUDA total  CUDA time avg  # of Calls\n"
        "  Optimizer.step#AdamW.step  0.00%  0.000us  0.00%  0.000us  0.000us  20.000ms  "
        "2.41%  20.000ms  10.000ms  2\n"
        "  aten::mm  7.26%  81.486ms  17.64%  197.949ms  72.990us  652.073ms  58.78%  "
        "671.551ms  247.622us  2712\n"
    )
    assert gpu_train.annotation_ms(table) == {"Optimizer.step#AdamW.step": 20.0}
    prof = {
        "categories": {
            "matmul": {"msPerStep": 30.0, "share": 0.5},
            "other kernels": {"msPerStep": 30.0, "share": 0.5},
        },
        "topKernels": [{"name": "Optimizer.step#AdamW.step", "msPerStep": 10.0}],
    }
    fixed = gpu_train.fix_profile(prof, table, steps=2)
    assert fixed["categories"]["other kernels"]["msPerStep"] == 20.0
    assert fixed["categories"]["matmul"]["share"] == pytest.approx(0.6)
    assert gpu_train.fix_profile(fixed, table, steps=2) == fixed
