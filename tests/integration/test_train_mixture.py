"""A weighted two-source mixture through the real native trainer (2 ranks, gloo, CPU): the
tokens each source contributed follow the weights, and the small source is repeated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cpt_training.config import MixtureSource
from cpt_training.data import TokenBlocks
from cpt_training.metrics import MetricsSink
from cpt_training.metrics import parse_metrics_lines as parse_metrics
from cpt_training.testing import (
    TinyAssets,
    make_tiny_assets,
    native_train_config,
    sample_texts,
    tokenize_sources,
)

pytestmark = pytest.mark.integration

STEPS = 10
WEIGHTS = {"domain": 0.9, "replay": 0.1}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), n_docs=120)


@pytest.fixture(scope="module")
def mixed(assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = sample_texts(400)
    short = sorted(texts[200:], key=len)  # a replay source smaller than its share
    corpora = {"domain": texts[:200], "replay": short[:6]}
    return tokenize_sources(tmp_path_factory.mktemp("mixed"), assets, corpora, WEIGHTS)


MIXTURE = [{"name": n, "weight": w} for n, w in WEIGHTS.items()]


def run_mixture(
    assets: TinyAssets, mixed: Path, ckpt: Path, local: Path, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """2-rank native training on the mixture; checkpoints every 2 steps."""
    cfg = native_train_config(
        assets, str(ckpt), local, STEPS, dataUri=str(mixed), mixture=MIXTURE, **kw
    )
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"),
            *("-m", "cpt_training.cli", "train"),
        ],
        env={**os.environ, "CPT_STAGE_CONFIG": json.dumps(cfg), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(
    assets: TinyAssets, mixed: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], Path]:
    root = tmp_path_factory.mktemp("run-a")
    proc = run_mixture(assets, mixed, root / "ckpt", root / "local", evalEverySteps=4, evalBlocks=3)
    return proc, root / "ckpt"


def test_native_training_draws_tokens_per_source_by_the_weights(
    assets: TinyAssets, mixed: Path, uninterrupted: tuple[Any, Path]
) -> None:
    proc, ckpt = uninterrupted
    mixture = MIXTURE
    progress: dict[str, Any] = json.loads((ckpt / "progress.json").read_text())
    assert progress["done"] is True
    seen = progress["tokensPerSource"]
    block, per_step = assets.block_size, 8 * assets.block_size
    assert sum(seen.values()) == STEPS * per_step
    # 80 blocks: the stratified order keeps each source within 2 blocks of its share.
    assert abs(seen["replay"] - 0.1 * STEPS * per_step) <= 2 * block, seen
    # The same count from the blocks the ranks were given, by the rows each source owns.
    blocks = TokenBlocks(str(mixed), mixture=[MixtureSource(**m) for m in mixture])
    replay_rows = set(blocks.source_rows[1].tolist())
    rows = [
        int(b)
        for step in range(STEPS)
        for rank in range(2)
        for mb in blocks.step_indices(step, rank, 2, 2, 2)
        for b in mb
    ]
    assert seen["replay"] == sum(r in replay_rows for r in rows) * block
    # The replay source is smaller than its share: the trainer says how often it repeats.
    assert seen["replay"] // block > len(replay_rows)
    assert "data source replay is repeated" in proc.stderr, proc.stderr[-3000:]

    # Held-out loss per source at steps 4, 8 and the last (10): metrics lines, the latest in
    # progress.json, every one in TensorBoard.
    evals = parse_metrics(proc.stdout, MetricsSink.EVAL_PREFIX)
    assert [e["step"] for e in evals] == [4, 8, 10]
    for e in evals:
        assert set(e["eval"]) == {"domain", "replay"}
        assert all(0 < loss < 10 for loss in e["eval"].values())
    assert progress["eval"]["step"] == 10
    last = progress["eval"]["sources"]
    assert last["domain"]["loss"] == pytest.approx(evals[-1]["eval"]["domain"])
    assert last["replay"]["perplexity"] == pytest.approx(2.718281828 ** last["replay"]["loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ckpt / "tensorboard" / "attempt-1"))
    acc.Reload()
    for name in ("domain", "replay"):
        points = acc.Scalars(f"eval/{name}/loss")
        assert [p.step for p in points] == [4, 8, 10]
        assert points[-1].value == pytest.approx(last[name]["loss"], rel=1e-5)


def test_export_evaluates_every_source_before_and_after_and_writes_a_model_card(
    assets: TinyAssets, mixed: Path, tmp_path: Path
) -> None:
    from huggingface_hub import ModelCard

    from cpt_training.config import DataSource, ExportHfStage
    from cpt_training.export import run as export_run
    from fixtures.train_stage import train_single_process

    mixture = [{"name": n, "weight": w} for n, w in WEIGHTS.items()]
    optimizer = {"lr": 3e-3, "minLr": 3e-4, "warmupSteps": 1, "warmupStartLr": 3e-4}
    ckpt = str(tmp_path / "ckpt")
    train_single_process(
        assets,
        ckpt,
        tmp_path / "local",
        max_steps=8,
        dataUri=str(mixed),
        mixture=mixture,
        optimizer=optimizer | {"decayStyle": "wsd"},
        activationCheckpointing="none",
        evalEverySteps=4,  # the one-device path (no FSDP) evaluates too
        progressUri=str(tmp_path / "progress.json"),
    )
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["eval"]["step"] == 8 and set(progress["eval"]["sources"]) == set(WEIGHTS)
    out = tmp_path / "model"
    cfg = ExportHfStage.model_validate(
        {
            "modelUri": str(assets.model),
            "checkpointUri": ckpt,
            "outputUri": str(out),
            "dataUri": str(mixed),
            "evalBlocks": 4,
            "dtype": "float32",
            "runName": "legal-cpt",
            "sources": [
                DataSource(uri="/corpora/domain", role="domain", weight=0.9).to_wire(),
                DataSource(hf_dataset="acme/web", role="replay", weight=0.1).to_wire(),
            ],
            "mixture": mixture,
            "globalBatchSize": 2,
            "seqLen": assets.block_size,
            "optimizer": optimizer | {"decayStyle": "wsd"},
            "instanceType": "local-cpu",
            "nodes": 1,
        }
    )
    assert export_run(cfg) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["sources"]) == {"domain", "replay"}
    for name, e in result["sources"].items():
        assert e["blocks"] > 0 and e["tokens"] == e["blocks"] * (assets.block_size - 1), name
        for when in ("before", "after"):
            assert 0 < e[when]["loss"] < 10
            assert e[when]["perplexity"] == pytest.approx(2.718281828 ** e[when]["loss"])
        assert e["lossChange"] == pytest.approx(e["after"]["loss"] - e["before"]["loss"])
    # 8 steps at 3e-3 on the domain: its held-out loss drops from the untrained ~ln(512).
    assert result["sources"]["domain"]["lossChange"] < -0.3
    totals = result["totals"]
    assert totals["tokens"] == sum(e["tokens"] for e in result["sources"].values())

    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict()["datasets"] == ["acme/web"]
    assert "continual-pretraining" in card.data.to_dict()["tags"]
    text = card.text
    assert "# legal-cpt" in text and "| domain | `/corpora/domain` | 0.9 |" in text
    assert "wsd, lr 0.003 -> minLr 0.0003, warmup 1 from 0.0003 (re-warmed)" in text
    assert "- steps: 8 x 2 blocks of 64 tokens = 1,024 tokens" in text
    domain = result["sources"]["domain"]
    assert f"| domain | {domain['blocks']} | {domain['before']['loss']:.4f} |" in text


def test_a_restarted_mixture_run_trains_on_the_same_blocks_as_an_uninterrupted_one(
    assets: TinyAssets, mixed: Path, uninterrupted: tuple[Any, Path], tmp_path: Path
) -> None:
    """Stopped after step 5 (step_4 committed), attempt 2 resumes at step 4: every loss of
    steps 5-10 equals the uninterrupted run's, and so do the tokens drawn per source."""
    reference, ref_ckpt = uninterrupted
    ckpt = tmp_path / "ckpt"
    run_mixture(assets, mixed, ckpt, tmp_path / "node-1", stopAfterSteps=5)
    second = run_mixture(assets, mixed, ckpt, tmp_path / "node-2", attempt=2)
    ref = {m["step"]: m["loss"] for m in parse_metrics(reference.stdout)}
    resumed = {m["step"]: m["loss"] for m in parse_metrics(second.stdout)}
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(ref[step], abs=1e-6), step
    done = json.loads((ckpt / "progress.json").read_text())
    assert (
        done["tokensPerSource"]
        == json.loads((ref_ckpt / "progress.json").read_text())["tokensPerSource"]
    )
