"""Local mode's pure parts: how a run.yaml is reshaped for this machine and how bad input is
refused. The full local pipeline runs in `make demo` (hack/demo.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from cpt_operator import local
from cpt_operator.api.models import ContinualPretrainSpec
from cpt_operator.builders import stages
from cpt_training.config import TrainStage

pytestmark = pytest.mark.unit

SPECS = Path(__file__).resolve().parents[1] / "golden" / "specs"


def spec_of(name: str) -> ContinualPretrainSpec:
    body = yaml.safe_load((SPECS / f"{name}.yaml").read_text())
    return ContinualPretrainSpec.model_validate(body["spec"])


def test_a_cluster_run_is_reshaped_to_cpu_processes_and_says_so() -> None:
    spec, notes = local.localize(spec_of("trn1-nxd"), processes=3)
    t = spec.training
    assert (t.instance_type, t.resolved_backend(), t.nodes) == ("local-cpu", "native", 1)
    assert (t.tensor_parallel, t.pipeline_parallel, t.resolved_processes_per_node()) == (1, 1, 3)
    assert len(notes) == 1 and "trn1.32xlarge -> local-cpu" in notes[0]
    # Model, data and hyper-parameters are kept.
    assert spec.model == spec_of("trn1-nxd").model and t.max_steps == 100


def test_a_local_cpu_run_keeps_its_shape_unless_processes_are_given() -> None:
    same, notes = local.localize(spec_of("local-cpu"), processes=None)
    assert same.training == spec_of("local-cpu").training and notes == []
    more, _ = local.localize(spec_of("local-cpu"), processes=4)
    assert more.training.resolved_processes_per_node() == 4 and more.training.nodes == 2


def test_each_local_node_gets_its_own_scratch_for_checkpoints(tmp_path: Path) -> None:
    spec = spec_of("local-cpu")
    run = local.LocalRun("tiny", spec, tmp_path, io.StringIO())
    cfg = stages.train_stage(spec, "tiny", 1)
    a, b = local._node_local(run, cfg, "tiny-node0"), local._node_local(run, cfg, "tiny-node1")
    assert isinstance(a, TrainStage) and isinstance(b, TrainStage)
    assert a.checkpoint.local_dir != b.checkpoint.local_dir
    assert a.checkpoint.local_dir.startswith(str(tmp_path))
    assert a.checkpoint.uri == b.checkpoint.uri == cfg.checkpoint.uri


def test_an_invalid_run_yaml_is_refused_naming_the_field_and_runs_nothing(tmp_path: Path) -> None:
    body = yaml.safe_load((SPECS / "local-cpu.yaml").read_text())
    del body["spec"]["output"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    out = io.StringIO()
    assert local.run_local(path, workdir=tmp_path / "work", out=out) == local.EXIT_BAD_SPEC
    assert "spec.output" in out.getvalue()
    assert not (tmp_path / "work").exists()


def test_an_unknown_stage_is_refused_with_the_allowed_names(tmp_path: Path) -> None:
    out = io.StringIO()
    code = local.run_local(SPECS / "local-cpu.yaml", workdir=tmp_path, stage="nap", out=out)
    assert code == local.EXIT_BAD_SPEC
    assert "allowed: preflight, tokenize, weights, train, export" in out.getvalue()


def _local_run(tmp_path: Path) -> local.LocalRun:
    spec = spec_of("local-cpu")
    ckpt = spec.checkpoints.model_copy(update={"s3_uri": str(tmp_path / "ckpt") + "/"})
    spec = spec.model_copy(update={"checkpoints": ckpt})
    return local.LocalRun("tiny", spec, tmp_path / "work", io.StringIO())


def test_local_mode_ends_by_drawing_the_curves_of_every_attempt(tmp_path: Path) -> None:
    from fixtures.tb_events import write_attempt

    run = _local_run(tmp_path)
    tb = Path(stages.paths(run.spec, run.name).tensorboard)
    write_attempt(tb, 1, 0, 12, evals=False)
    write_attempt(tb, 2, 10, 20, evals=False)
    local._plot(run)
    assert (run.workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert f"curves: {run.workdir / 'curves.png'} (2 attempt(s)" in run.out.getvalue()  # type: ignore[attr-defined]


def test_a_run_without_tensorboard_files_still_ends_and_says_why_there_is_no_picture(
    tmp_path: Path,
) -> None:
    run = _local_run(tmp_path)
    local._plot(run)
    assert "curves: not drawn (PlotError: no TensorBoard event files" in run.out.getvalue()  # type: ignore[attr-defined]
    assert not (run.workdir / "curves.png").exists()
