"""convert-to-nxd and the nxd export, around NxD's checkpoint converter.

We test these aspects:
- The converter command line: switches NxD declares ``type=bool`` are passed only when true
  (argparse would read "False" as True), layout flags, our strict launcher module.
- The convert stage end to end: a multi-file safetensors HF model -> one flat state dict ->
  converter -> every expected shard checked against the trainer model's names -> uploaded
  with manifest and commit marker, layout recorded; a bad layout fails before any work.
- The export: TP/PP and qkv_linear/KV multiplier read back from a tag's files, merged to HF
  names, equal to the weights the tag holds.

STAND-IN: NxD (and torch_xla) cannot be installed here, so these tests put a stand-in package
``neuronx_distributed.scripts.checkpoint_converter`` on the *subprocess's* PYTHONPATH only.
It declares the same CLI flags as NxD's ``CheckpointConverterBase.get_arg_parser`` (2.28/2.29,
``type=bool`` switches included) and converts with cpt's pure-torch reference layout
(``cpt_training.nxd.layout``). The product code runs the real converter; what is tested here
is everything around it, and that our argv means what we intend under NxD's flag rules.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_training.checkpoint import latest_committed, read_manifest
from cpt_training.cli import ConfigError
from cpt_training.config import ConvertToNxdStage, ExportHfStage
from cpt_training.nxd import convert, export
from cpt_training.nxd.layout import (
    LlamaShape,
    plan_layout,
    shard_file_name,
    shard_full_state,
)

pytestmark = pytest.mark.unit

STUB = textwrap.dedent(
    '''
    """STAND-IN for NxD's checkpoint converter (tests only). Same flags, reference layout."""
    import argparse, json, os, sys


    class CheckpointConverterBase:
        def get_arg_parser(self):
            p = argparse.ArgumentParser()
            p.add_argument("--input_dir", type=str, default=None)
            p.add_argument("--hf_model_name", type=str, default=None)
            p.add_argument("--output_dir", type=str, required=True)
            p.add_argument("--hw_backend", type=str, required=True)
            p.add_argument("--config", type=str)
            p.add_argument("--model_key", type=str, default="model")
            p.add_argument("--tp_size", type=int, default=1)
            p.add_argument("--pp_size", type=int, default=1)
            p.add_argument("--ep_size", type=int, default=1)
            p.add_argument("--virtual_pp_size", type=int, default=1)
            p.add_argument("--n_layers", type=int, default=0)
            p.add_argument("--coalesce_qkv", type=bool, default=False)
            p.add_argument("--kv_size_multiplier", type=int, default=1)
            p.add_argument("--qkv_linear", type=bool, default=False)
            p.add_argument("--fuse_qkv", type=bool, default=False)
            p.add_argument("--i_tp_round_factor", type=int, default=0)
            p.add_argument("--pad_attn_heads", type=bool, default=False)
            p.add_argument("--load_xser", type=bool, default=False)
            p.add_argument("--save_xser", type=bool, default=False)
            p.add_argument("--convert_from_xser", action="store_true")
            p.add_argument("--convert_to_xser", action="store_true")
            p.add_argument("--convert_from_full_state", action="store_true")
            p.add_argument("--convert_to_full_state", action="store_true")
            p.add_argument("--model_style", type=str, choices=["hf", "megatron"], default="hf")
            p.add_argument("--nxdt_yaml_config", type=str)
            return p

        def run(self, args):
            modes = ["convert_from_full_state", "convert_to_full_state", "convert_from_xser",
                     "convert_to_xser"]
            assert sum(int(getattr(args, m)) for m in modes) == 1, "Exactly one '--convert_*'"
            if os.environ.get("STUB_CONVERTER_FAIL"):
                sys.exit(3)
            import torch
            from cpt_training.nxd.layout import (
                SHARD_FILE_RE, LlamaShape, merge_shards, plan_layout, shard_file_name,
                shard_full_state)
            config = json.load(open(args.config))
            shape = LlamaShape.from_config(config)
            layout = plan_layout(shape, tp=args.tp_size, pp=args.pp_size,
                                 kv_size_multiplier=args.kv_size_multiplier,
                                 qkv_linear=args.qkv_linear, hw_backend=args.hw_backend)
            if args.n_layers != shape.num_layers:
                sys.exit("stand-in: --n_layers disagrees with the config")
            if args.convert_from_full_state:
                if bool(args.coalesce_qkv) != layout.coalesce_qkv:
                    sys.exit("stand-in: --coalesce_qkv does not fit this model/layout")
                full = torch.load(args.input_dir, map_location="cpu")
                os.makedirs(os.path.join(args.output_dir, "model"), exist_ok=True)
                for (t, p), sd in shard_full_state(full, layout).items():
                    torch.save(sd, os.path.join(args.output_dir, "model", shard_file_name(t, p)))
            elif args.convert_to_full_state:
                shards = {}
                for name in os.listdir(args.input_dir):
                    m = SHARD_FILE_RE.match(name)
                    if m:
                        key = (int(m.group(2)), int(m.group(3)))
                        shards[key] = torch.load(os.path.join(args.input_dir, name))
                os.makedirs(args.output_dir, exist_ok=True)
                torch.save(merge_shards(shards, layout),
                           os.path.join(args.output_dir, "checkpoint.pt"))
    '''
)


@pytest.fixture
def stand_in_converter(tmp_path, monkeypatch):
    root = tmp_path / "stand-in"
    pkg = root / "neuronx_distributed" / "scripts"
    pkg.mkdir(parents=True)
    (root / "neuronx_distributed" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "checkpoint_converter.py").write_text(STUB)
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setenv("CPT_WORK_DIR", str(tmp_path))
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    return root


def hf_model_dir(tmp_path: Path, heads=8, kv=2, layers=4, tie=False) -> tuple[Path, dict]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    out = tmp_path / "hf"
    model.save_pretrained(out, max_shard_size="40KB")  # several safetensors files
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out, sd


def _parser():
    """The stand-in's parser (NxD's flag definitions)."""
    ns: dict = {}
    exec(compile(STUB, "stand-in", "exec"), ns)
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


def test_convert_stage_end_to_end(tmp_path, stand_in_converter):
    model_dir, hf_sd = hf_model_dir(tmp_path)
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    out = tmp_path / "ckpt" / "pretrained_weight"
    cfg = ConvertToNxdStage(
        model_uri=str(model_dir),
        output_uri=str(out),
        tensor_parallel=4,
        pipeline_parallel=2,
        kv_size_multiplier=2,
        qkv_linear=True,
    )
    assert convert.run(cfg) == 0
    ckpt = latest_committed(str(tmp_path / "ckpt"), include_pretrained=True)
    assert ckpt is not None and ckpt.tag == "pretrained_weight"
    manifest = read_manifest(str(out))
    assert manifest.world["tensorParallel"] == 4 and manifest.world["qkvLinear"] is True
    assert manifest.world["kvSizeMultiplier"] == 2
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    layout = plan_layout(
        LlamaShape.from_config(json.loads((model_dir / "config.json").read_text())),
        tp=4,
        pp=2,
        kv_size_multiplier=2,
        qkv_linear=True,
    )
    want = shard_full_state(hf_sd, layout)
    for (t, p), sd in want.items():
        got = torch.load(out / "model" / shard_file_name(t, p))
        assert sorted(got) == sorted(sd)
        for k in sd:
            assert torch.equal(got[k], sd[k]), k
    # the work dir is gone (the merged state dict alone is the size of the model)
    assert not list(tmp_path.glob("cpt-convert-*"))


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


@pytest.mark.parametrize(
    ("tp", "pp", "kvm", "qkv"),
    [
        pytest.param(2, 2, 1, False, id="gqa-tp2-pp2"),
        pytest.param(8, 1, 4, True, id="qkv-linear-kv-x4"),
    ],
)
def test_export_returns_the_tags_weights_under_hf_names(
    tmp_path, stand_in_converter, tp, pp, kvm, qkv
):
    model_dir, hf_sd = hf_model_dir(tmp_path)
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in hf_sd.items()}
    layout = plan_layout(
        LlamaShape.from_config(json.loads((model_dir / "config.json").read_text())),
        tp=tp,
        pp=pp,
        kv_size_multiplier=kvm,
        qkv_linear=qkv,
    )
    tag = tmp_path / "local" / "step_20"
    (tag / "model").mkdir(parents=True)
    for (t, p), sd in shard_full_state(trained, layout).items():
        torch.save(sd, tag / "model" / shard_file_name(t, p))
    (tag / "done").write_text("1")
    cfg = ExportHfStage(
        backend="nxd",
        model_uri=str(model_dir),
        checkpoint_uri=str(tmp_path / "ckpt"),
        output_uri=str(tmp_path / "out"),
        dtype="float32",
    )
    out = export.to_hf_state_dict(tag, cfg)
    assert sorted(out) == sorted(trained)
    for k, v in trained.items():
        assert torch.equal(out[k], v), k


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
