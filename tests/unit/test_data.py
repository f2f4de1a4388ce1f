"""TokenBlocks: deterministic, resumable per-rank batches over the tokenize stage's output."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from cpt_training import tokenize as tk
from cpt_training.config import TokenizeStage
from cpt_training.data import DataError, TokenBlocks
from fixtures.textgen import make_corpus, make_texts, train_tokenizer

pytestmark = pytest.mark.unit

BLOCK = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("data")
    train_tokenizer(make_texts(200, seed=5), vocab_size=300, out_dir=base / "tok")
    make_corpus(base / "corpus", 30, seed=6)
    cfg = TokenizeStage.model_validate(
        {
            "sources": [{"uri": str(base / "corpus")}],
            "tokenizerUri": str(base / "tok"),
            "outputUri": str(base / "out"),
            "blockSize": BLOCK,
            "numShards": 3,
            "heldOutFraction": 0.1,
        }
    )
    for i in range(3):
        tk.run_tokenize(cfg.model_copy(update={"shard_index": i}))
    return base / "out"


def test_blocks_load_from_the_manifest_with_their_block_size(data_dir: Path) -> None:
    tb = TokenBlocks(str(data_dir), seed=1)
    assert tb.block_size == BLOCK
    assert len(tb) == tb.manifest["totalBlocks"] > 20
    rows = tb.get(np.array([0, len(tb) - 1]))
    assert rows.shape == (2, BLOCK) and rows.dtype == np.int64
    assert tb.root == data_dir, "a local dataset is read in place"


def test_each_epoch_visits_every_block_once_in_a_fresh_order(data_dir: Path) -> None:
    tb = TokenBlocks(str(data_dir), seed=1)
    n = len(tb)
    e0 = tb.positions_to_blocks(np.arange(0, n))
    e1 = tb.positions_to_blocks(np.arange(n, 2 * n))
    assert sorted(e0.tolist()) == list(range(n)) == sorted(e1.tolist())
    assert (e0 != e1).any()
    assert (TokenBlocks(str(data_dir), seed=2).positions_to_blocks(np.arange(n)) != e0).any()


def test_ranks_of_a_step_take_disjoint_blocks_that_fill_the_global_batch(data_dir: Path) -> None:
    tb = TokenBlocks(str(data_dir), seed=3)
    dp, mb, ga = 3, 2, 2
    for step in (0, 1, 7):
        per_rank = [np.concatenate(tb.step_indices(step, r, dp, mb, ga)) for r in range(dp)]
        allb = np.concatenate(per_rank)
        assert len(allb) == dp * mb * ga
        assert len(set(allb.tolist())) == len(allb), "no block twice within a step"
        g = dp * mb * ga
        expected = tb.positions_to_blocks(np.arange(step * g, (step + 1) * g))
        assert sorted(allb.tolist()) == sorted(expected.tolist())


def test_the_blocks_of_a_step_depend_only_on_the_global_batch(data_dir: Path) -> None:
    tb = TokenBlocks(str(data_dir), seed=4)

    def step_set(dp: int, mb: int, ga: int, step: int) -> list[int]:
        return sorted(
            np.concatenate(
                [np.concatenate(tb.step_indices(step, r, dp, mb, ga)) for r in range(dp)]
            ).tolist()
        )

    for step in (0, 5):
        assert step_set(4, 1, 2, step) == step_set(2, 2, 2, step) == step_set(1, 4, 2, step)


def test_resuming_at_step_k_yields_exactly_the_uninterrupted_batches(data_dir: Path) -> None:
    dp, mb, ga, steps, k = 2, 3, 2, 40, 17  # 40 steps x 12 blocks spans several epochs
    full = {
        r: list(TokenBlocks(str(data_dir), seed=9).batches(r, dp, mb, ga, max_steps=steps))
        for r in range(dp)
    }
    assert 2 * len(TokenBlocks(str(data_dir), seed=9)) < steps * dp * mb * ga
    for r in range(dp):
        fresh = TokenBlocks(str(data_dir), seed=9)  # a restarted process
        resumed = list(fresh.batches(r, dp, mb, ga, start_step=k, max_steps=steps))
        assert [b.step for b in resumed] == list(range(k, steps))
        for a, b in zip(full[r][k:], resumed, strict=True):
            assert a.step == b.step and len(b.micro_batches) == ga
            for x, y in zip(a.micro_batches, b.micro_batches, strict=True):
                assert x.shape == (mb, BLOCK)
                assert np.array_equal(x, y)
    # And what a rank sees is exactly the blocks its indices name.
    tb = TokenBlocks(str(data_dir), seed=9)
    ids = tb.step_indices(3, 1, dp, mb, ga)
    assert np.array_equal(full[1][3].micro_batches[1], tb.get(ids[1]))


def test_over_an_epoch_every_block_is_consumed_equally_often(data_dir: Path) -> None:
    tb = TokenBlocks(str(data_dir), seed=11)
    n, dp, mb, ga = len(tb), 2, 1, 1
    steps = (2 * n) // (dp * mb * ga)  # exactly two epochs of positions
    seen: collections.Counter[int] = collections.Counter()
    for step in range(steps):
        for r in range(dp):
            seen.update(np.concatenate(tb.step_indices(step, r, dp, mb, ga)).tolist())
    assert set(seen.values()) == {2} and len(seen) == n


def test_held_out_blocks_come_in_order_and_in_batches(data_dir: Path) -> None:
    tb = TokenBlocks(str(data_dir), seed=1)
    assert tb.num_held_out == tb.manifest["heldoutBlocks"] > 0
    batches = list(tb.held_out(4))
    assert sum(len(b) for b in batches) == tb.num_held_out
    assert all(b.shape[1] == BLOCK for b in batches)
    assert sum(len(b) for b in tb.held_out(4, max_blocks=5)) == 5


def test_bad_arguments_and_unfinished_datasets_are_refused(data_dir: Path, tmp_path: Path) -> None:
    tb = TokenBlocks(str(data_dir))
    with pytest.raises(ValueError, match="dp_rank 2 out of range for dp_size 2"):
        tb.step_indices(0, 2, 2, 1, 1)
    with pytest.raises(ValueError, match="micro_batch"):
        tb.step_indices(0, 0, 1, 0, 1)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / tk.done_name(0, 2)).write_text("{}")
    with pytest.raises(DataError, match=r"manifest.json does not exist.*tokenize stage"):
        TokenBlocks(str(tmp_path / "partial"))
