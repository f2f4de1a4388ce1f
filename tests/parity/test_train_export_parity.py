"""Train, export, load in transformers: the model HF runs is the model that was trained.

A few optimizer steps through the real ``train`` stage (one CPU process, fp32) on sequences
twice ``max_position_embeddings`` with dynamic rope (the case that used to train another
model than the exported one), then the real ``export-hf`` stage, then
``AutoModelForCausalLM.from_pretrained``: its logits equal, bit for bit, those of the native
model holding the trained checkpoint, at the trained length and beyond it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cpt_training.checkpoint import restore
from cpt_training.config import ExportHfStage
from cpt_training.export import native_state_dict
from cpt_training.export import run as export_run
from cpt_training.testing import TinyAssets, make_tiny_assets
from fixtures.train_stage import train_single_process

pytestmark = pytest.mark.parity

MAX_POS = 32
OVERRIDES: dict[str, Any] = {
    "max_position_embeddings": MAX_POS,
    "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), block_size=2 * MAX_POS, n_docs=150)


def test_trained_then_exported_model_gives_the_native_models_logits_in_transformers(
    assets: TinyAssets, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cpt_training.data import TokenBlocks
    from cpt_training.native.llama import Llama

    ckpt = str(tmp_path / "ckpt")
    train_single_process(
        assets,
        ckpt,
        tmp_path / "local",
        max_steps=3,
        configOverrides=OVERRIDES,
        optimizer={"lr": 1e-2, "minLr": 1e-3, "warmupSteps": 1},
        checkpoint={"everySteps": 3},
    )
    out = tmp_path / "hf"
    cfg = ExportHfStage.model_validate(
        {
            "modelUri": str(assets.model),
            "checkpointUri": ckpt,
            "outputUri": str(out),
            "dataUri": str(assets.data),
            "evalBlocks": 2,
            "dtype": "float32",
            "configOverrides": OVERRIDES,
        }
    )
    assert export_run(cfg) == 0

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "dynamic"
    assert hf.config.max_position_embeddings == MAX_POS
    trained = restore(ckpt, tmp_path / "restored", prune_local_dir=False)
    assert trained is not None and trained.step == 3 and trained.local_path is not None
    ours = Llama.from_hf_config(hf.config)
    ours.load_state_dict(native_state_dict(trained.local_path, hf.config), strict=True)
    ours.eval()
    base = load_file(str(assets.model / "model.safetensors"))
    moved = ours.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(moved, base["model.layers.0.mlp.up_proj.weight"])  # it trained

    held = torch.from_numpy(next(TokenBlocks(str(assets.data)).held_out(batch_size=2)))
    longer = torch.cat([held, held], dim=1)  # 4x max_position_embeddings
    with torch.no_grad():
        for ids in (held, longer, held[:, : MAX_POS // 2]):
            expected = ours.logits(ids.long())
            got = hf(input_ids=ids.long()).logits
            assert torch.equal(got, expected), (ids.shape, (got - expected).abs().max().item())
