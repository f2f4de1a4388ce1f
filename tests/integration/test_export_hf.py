"""export-hf for real: HF weights -> native DCP checkpoint (step 0) -> export through the
loopback S3 server -> the HF weights again, bit for bit; plus eval.json and failure modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cpt_training import storage
from cpt_training.checkpoint import list_committed
from cpt_training.config import ExportHfStage
from cpt_training.export import run as export_run
from cpt_training.testing import TinyAssets, make_tiny_assets
from fixtures.train_stage import train_single_process

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tied_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    # Tied embeddings: the trickier case (one tensor under two names).
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), tie_word_embeddings=True)


@pytest.fixture(scope="module")
def local_step0(tied_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A step_0 checkpoint in local storage, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("step0")
    _train_step0(tied_assets, str(root / "ckpt"), root / "local")
    return str(root / "ckpt")


def _train_step0(assets: TinyAssets, ckpt: str, local: Path) -> None:
    """stopAfterSteps=0 commits the base weights as step_0."""
    train_single_process(assets, ckpt, local, max_steps=4, stopAfterSteps=0)


def _export_cfg(assets: TinyAssets, ckpt: str, out: str, **kw: Any) -> ExportHfStage:
    return ExportHfStage.model_validate(
        {
            "modelUri": str(assets.model),
            "checkpointUri": ckpt,
            "outputUri": out,
            "dataUri": str(assets.data),
            "evalBlocks": 6,
            "dtype": "float32",
            **kw,
        }
    )


def test_hf_to_native_checkpoint_to_hf_round_trips_the_weights_exactly(
    tied_assets: TinyAssets, s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    ckpt = f"s3://{bucket}/run/ckpt"
    out = f"s3://{bucket}/run/model"
    _train_step0(tied_assets, ckpt, tmp_path / "local")
    assert [c.tag for c in list_committed(ckpt)] == ["step_0"]

    assert export_run(_export_cfg(tied_assets, ckpt, out)) == 0

    st = storage.open_storage(out)
    files = set(st.list())
    assert {"config.json", "model.safetensors", "tokenizer.json", "eval.json", "_SUCCESS"} <= files
    st.download_file("model.safetensors", tmp_path / "exported.safetensors")
    original = load_file(str(tied_assets.model / "model.safetensors"))
    exported = load_file(str(tmp_path / "exported.safetensors"))
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype
        assert torch.equal(exported[name], tensor), name

    result = st.read_json("eval.json")
    assert result["step"] == 0 and result["blocks"] == 6
    assert result["tokens"] == 6 * (tied_assets.block_size - 1)
    # An untrained model over a 512-token vocab: loss near ln(512) = 6.24.
    assert 5.0 < result["loss"] < 7.5
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)


def test_export_reports_held_out_loss_that_matches_transformers(
    tied_assets: TinyAssets, local_step0: str, tmp_path: Path
) -> None:
    """Local storage this time; the loss is recomputed independently with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_training.data import TokenBlocks

    out = str(tmp_path / "out")
    cfg = _export_cfg(tied_assets, local_step0, out, evalBlocks=3, dtype="bfloat16")
    assert export_run(cfg) == 0
    result = json.loads((Path(out) / "eval.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    held = next(TokenBlocks(str(tied_assets.data)).held_out(batch_size=3))
    ids = torch.from_numpy(held)
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=ids).loss)
    assert result["loss"] == pytest.approx(expected, rel=1e-3)
    assert result["dtype"] == "bfloat16"


def test_export_without_a_committed_checkpoint_fails_and_removes_a_stale_success(
    tied_assets: TinyAssets, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "_SUCCESS").write_text("")  # left by an earlier export
    with pytest.raises(RuntimeError, match="no committed checkpoint"):
        export_run(_export_cfg(tied_assets, str(tmp_path / "empty"), str(out)))
    assert not (out / "_SUCCESS").exists()


def test_export_refuses_weights_that_do_not_fit_the_config(
    tied_assets: TinyAssets, local_step0: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = _export_cfg(tied_assets, local_step0, str(out), configOverrides={"num_hidden_layers": 3})
    with pytest.raises(RuntimeError, match=r"does not fit the model config.*layers\.2"):
        export_run(cfg)
    assert not (out / "_SUCCESS").exists()
