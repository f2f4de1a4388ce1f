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


def test_native_training_draws_tokens_per_source_by_the_weights(
    assets: TinyAssets, mixed: Path, tmp_path: Path
) -> None:
    mixture = [{"name": n, "weight": w} for n, w in WEIGHTS.items()]
    ckpt = tmp_path / "ckpt"
    cfg = native_train_config(
        assets, str(ckpt), tmp_path / "local", STEPS, dataUri=str(mixed), mixture=mixture
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
