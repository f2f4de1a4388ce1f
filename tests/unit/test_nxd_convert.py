"""convert-to-nxd and the nxd export, around NxD's checkpoint converter.

We test these aspects:
- The converter command line: switches NxD declares ``type=bool`` are passed only when true
  (argparse would read "False" as True), layout flags, our strict launcher module.
- The convert stage refuses a bad layout before any work and commits nothing when the
  converter fails; converter output with other names is refused.
- The export reads TP/PP back from a tag's file names.
(The whole convert and export stages, converter subprocess included, are integration tests:
tests/integration/test_nxd_convert_stage.py.)

STAND-IN: NxD (and torch_xla) cannot be installed here, so these tests put a stand-in package
``neuronx_distributed.scripts.checkpoint_converter`` (``tests/fixtures/nxd.py``) on the
*subprocess's* PYTHONPATH only. It declares the same CLI flags as NxD's
``CheckpointConverterBase.get_arg_parser`` (2.28/2.29, ``type=bool`` switches included) and
converts with cpt's pure-torch reference layout (``cpt_training.nxd.layout``). The product
code runs the real converter; what is tested here is everything around it, and that our
argv means what we intend under NxD's flag rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cpt_training.checkpoint import latest_committed
from cpt_training.config import ConfigError, ConvertToNxdStage
from cpt_training.nxd import convert, export
from cpt_training.nxd.layout import (
    LlamaShape,
    plan_layout,
    shard_file_name,
)
from fixtures.nxd import CONVERTER_STUB, hf_model_dir, use_converter

pytestmark = pytest.mark.unit


@pytest.fixture
def stand_in_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_converter(tmp_path, monkeypatch)


def _parser():
    """The stand-in's parser (NxD's flag definitions)."""
    ns: dict = {}
    exec(compile(CONVERTER_STUB, "stand-in", "exec"), ns)
    return ns["CheckpointConverterBase"]().get_arg_parser()


def test_bool_switches_are_passed_only_when_true_and_never_as_false():
    shape = LlamaShape(num_layers=4, hidden=32, heads=8, kv_heads=2, intermediate=48, vocab=64)
    plain = plan_layout(shape, tp=2, pp=2)
    linear = plan_layout(shape, tp=4, pp=1, kv_size_multiplier=2, qkv_linear=True)
    a = convert.from_full_argv(plain, input_file="f.pt", output_dir="o", config_file="c.json")
    b = convert.from_full_argv(linear, input_file="f.pt", output_dir="o", config_file="c.json")
    assert "--qkv_linear" not in a and "--coalesce_qkv" not in a and "False" not in a
    assert b[b.index("--qkv_linear") + 1] == "True"
    parser = _parser()
    pa, pb = parser.parse_args(a), parser.parse_args(b)
    assert (pa.qkv_linear, pa.coalesce_qkv, pa.tp_size, pa.pp_size) == (False, False, 2, 2)
    assert (pb.qkv_linear, pb.kv_size_multiplier, pb.n_layers) == (True, 2, 4)
    assert pa.convert_from_full_state and not pa.convert_to_full_state
    # the gotcha itself: NxD's parser turns the string "False" into True
    assert parser.parse_args([*a, "--qkv_linear", "False"]).qkv_linear is True


def test_mha_models_are_coalesced_and_export_flags_carry_xser_only_when_present():
    mha = plan_layout(
        LlamaShape(num_layers=2, hidden=32, heads=4, kv_heads=4, intermediate=48, vocab=64),
        tp=2,
        pp=1,
    )
    argv = convert.from_full_argv(mha, input_file="f", output_dir="o", config_file="c")
    assert argv[argv.index("--coalesce_qkv") + 1] == "True"
    plain = convert.to_full_argv(mha, model_dir="m", output_dir="o", config_file="c", xser=False)
    xser = convert.to_full_argv(mha, model_dir="m", output_dir="o", config_file="c", xser=True)
    assert "--load_xser" not in plain and xser[xser.index("--load_xser") + 1] == "True"
    assert plain[-1] == "--convert_to_full_state"


def test_the_converter_runs_through_our_strict_launcher():
    cmd = convert.converter_command(["--x"], python="/py")
    assert cmd == ["/py", "-m", "cpt_training.nxd.converter_main", "--x"]


def test_convert_refuses_a_bad_layout_before_any_work(tmp_path, stand_in_converter):
    model_dir, _ = hf_model_dir(tmp_path)
    out = tmp_path / "ckpt" / "pretrained_weight"
    cfg = ConvertToNxdStage(model_uri=str(model_dir), output_uri=str(out), tensor_parallel=3)
    with pytest.raises(ConfigError, match="tensorParallel=3 must divide"):
        convert.run(cfg)
    assert not out.exists()


def test_a_failing_converter_fails_the_stage_and_commits_nothing(
    tmp_path, stand_in_converter, monkeypatch
):
    model_dir, _ = hf_model_dir(tmp_path)
    monkeypatch.setenv("STUB_CONVERTER_FAIL", "1")
    out = tmp_path / "ckpt" / "pretrained_weight"
    cfg = ConvertToNxdStage(model_uri=str(model_dir), output_uri=str(out), tensor_parallel=2)
    with pytest.raises(RuntimeError, match="exit code 3"):
        convert.run(cfg)
    assert latest_committed(str(tmp_path / "ckpt"), include_pretrained=True) is None


def test_converter_output_with_other_names_is_refused():
    shape = LlamaShape(num_layers=2, hidden=32, heads=8, kv_heads=2, intermediate=48, vocab=64)
    layout = plan_layout(shape, tp=2, pp=1)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.qkv_proj.weight_q"]
    with pytest.raises(RuntimeError, match="does not match the nxd model"):
        convert.check_shard_names(layout, 0, names, where="x.pt")


def test_tags_describe_their_own_degrees():
    names = [shard_file_name(t, p) for t in range(4) for p in range(2)] + ["x.pt"]
    assert export.parallel_degrees(names) == (4, 2)
    with pytest.raises(ValueError, match="incomplete NxD checkpoint"):
        export.parallel_degrees(names[1:])
    assert export.is_xser(["dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors"])
    assert not export.is_xser(names)


def test_module_runs_as_converter_launcher_with_strict_flags(tmp_path, stand_in_converter):
    import subprocess

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpt_training.nxd.converter_main",
            "--output_dir",
            "o",
            "--hw_backend",
            "trn1",
            "--convert_from_full_model",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "unrecognized arguments: --convert_from_full_model" in res.stderr
