"""convert-to-nxd and the nxd export as whole stages, each running NxD's converter (a
stand-in, see tests/fixtures/nxd.py) in a subprocess: a multi-file safetensors HF model ->
one flat state dict -> converter -> every expected shard checked against the reference layout
-> uploaded with manifest and commit marker, layout recorded; and a tag's shards merged back
to HF names, equal to the weights it holds. (The argv rules, layout refusals and failures
are unit tests in tests/unit/test_nxd_convert.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpt_training.checkpoint import latest_committed, read_manifest
from cpt_training.config import ConvertToNxdStage, ExportHfStage
from cpt_training.nxd import convert, export
from cpt_training.nxd.layout import LlamaShape, plan_layout, shard_file_name, shard_full_state
from fixtures.nxd import hf_model_dir, use_converter

pytestmark = pytest.mark.integration


@pytest.fixture
def stand_in_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return use_converter(tmp_path, monkeypatch)


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
