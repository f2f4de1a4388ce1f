"""The exported model's card: Hub front matter the huggingface_hub parser accepts, and a body
with the base model, the mixture, the training and the before/after table."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from cpt_training import __version__
from cpt_training.config import ExportHfStage
from cpt_training.model_card import base_license, render

pytestmark = pytest.mark.unit


def cfg(**kw: object) -> ExportHfStage:
    return ExportHfStage.model_validate(
        {
            "modelUri": "hf://meta-llama/Llama-3.2-1B@4e20de3",
            "checkpointUri": "s3://b/ckpt/",
            "outputUri": "s3://b/out/",
            "runName": "med-cpt",
            "sources": [
                {"hfDataset": "acme/pubmed", "role": "domain", "weight": 0.95},
                {"uri": "s3://b/web/", "role": "replay", "weight": 0.05},
            ],
            "mixture": [{"name": "domain", "weight": 0.95}, {"name": "replay", "weight": 0.05}],
            "globalBatchSize": 512,
            "seqLen": 4096,
            "instanceType": "p5.48xlarge",
            "nodes": 4,
            "tensorParallel": 8,
            **kw,
        }
    )


COMPARISON = {
    "sources": {
        "domain": {
            "blocks": 8,
            "tokens": 32760,
            "before": {"loss": 2.5, "perplexity": 12.18},
            "after": {"loss": 2.1, "perplexity": 8.17},
            "lossChange": -0.4,
        },
        "replay": {
            "blocks": 8,
            "tokens": 32760,
            "before": {"loss": 2.0, "perplexity": 7.39},
            "after": {"loss": 2.05, "perplexity": 7.77},
            "lossChange": 0.05,
        },
    },
    "totals": {
        "blocks": 16,
        "tokens": 65520,
        "before": {"loss": 2.25, "perplexity": 9.49},
        "after": {"loss": 2.075, "perplexity": 7.96},
        "lossChange": -0.175,
    },
}


def test_the_card_parses_with_the_hub_front_matter_and_reports_the_run(tmp_path: Path) -> None:
    text = render(
        cfg(),
        step=100,
        comparison=COMPARISON,
        tokens_seen={"domain": 199_000_000, "replay": 10_700_000},
        license_="llama3.2",
    )
    card = ModelCard(text)
    meta = card.data.to_dict()
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert meta["datasets"] == ["acme/pubmed"] and meta["license"] == "llama3.2"
    assert "continual-pretraining" in meta["tags"]
    body = card.text
    assert f"`meta-llama/Llama-3.2-1B` at revision `4e20de3` with cpt {__version__}" in body
    assert "| replay | `s3://b/web/` | 0.05 | 10,700,000 |" in body
    assert "- steps: 100 x 512 blocks of 4096 tokens = 209,715,200 tokens" in body
    assert "- hardware: 4 x p5.48xlarge" in body
    assert "| replay | 8 | 2.0000 | 2.0500 | +0.0500 | 7.39 | 7.77 |" in body
    assert "| total | 16 | 2.2500 | 2.0750 | -0.1750 |" in body


def test_without_eval_or_hub_base_the_card_still_parses_and_omits_what_it_lacks() -> None:
    text = render(
        cfg(modelUri="s3://b/models/base/", sources=[], mixture=None),
        step=3,
        comparison=None,
        tokens_seen=None,
        license_=None,
    )
    meta = ModelCard(text).data.to_dict()
    assert "base_model" not in meta and "license" not in meta and "datasets" not in meta
    assert "## Evaluation" not in text and "## Data" not in text


def test_the_license_comes_from_the_base_models_own_card(tmp_path: Path) -> None:
    assert base_license(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# Base\n")
    assert base_license(tmp_path) == "apache-2.0"
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert base_license(tmp_path) is None
