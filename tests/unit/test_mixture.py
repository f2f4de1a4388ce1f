"""Weighted data mixtures: the sampler's proportions, exact resume, independence of the DP
split, and the tokenize stage's per-source runs read back by TokenBlocks on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cpt_training import tokenize as tk
from cpt_training.config import MixtureSource, TokenizeStage
from cpt_training.data import DataError, TokenBlocks
from cpt_training.mixture import WINDOW, Mixture, MixtureError, quotas
from fixtures.textgen import make_corpus, make_texts, train_tokenizer

pytestmark = pytest.mark.unit

BLOCK = 32


def test_quotas_apportion_the_window_exactly_by_largest_remainder() -> None:
    assert quotas([0.9, 0.1], 10) == [9, 1]
    assert quotas([1, 1, 1], 10) == [4, 3, 3]
    assert sum(quotas([0.37, 0.21, 0.42, 0.0])) == WINDOW
    assert quotas([0.5, 0.0, 0.5], 4) == [2, 0, 2]
    with pytest.raises(MixtureError, match="positive sum"):
        quotas([0, 0])


@pytest.mark.parametrize("weights", [[0.9, 0.1], [0.5, 0.3, 0.2], [0.97, 0.03]])
def test_sampled_shares_match_the_weights_within_one_over_the_window(
    weights: list[float],
) -> None:
    """Over N = 10 windows + a part window, each source's share is within 1/WINDOW + the
    part window's worth (here < 0.5%) of its weight: stated tolerance 0.5 percentage points."""
    mix = Mixture([500, 70, 40][: len(weights)], weights, seed=3)
    n = 10 * WINDOW + 1234
    src, _ = mix.blocks(np.arange(n))
    shares = np.bincount(src, minlength=len(weights)) / n
    assert np.allclose(shares, np.asarray(weights) / sum(weights), atol=0.005), shares
    assert mix.seen(n) == np.bincount(src, minlength=len(weights)).tolist()
    # After whole windows the counts are exactly the quotas.
    whole = mix.seen(10 * WINDOW)
    assert whole == [10 * q for q in quotas(weights)]


def test_a_small_source_repeats_every_block_once_per_epoch() -> None:
    mix = Mixture([1000, 7], [0.9, 0.1], seed=1)
    src, idx = mix.blocks(np.arange(2 * WINDOW))
    small = idx[src == 1]
    first = small[:7]
    assert sorted(first.tolist()) == list(range(7)), "one epoch visits every block once"
    counts = np.bincount(small, minlength=7)
    assert counts.max() - counts.min() <= 1
    assert mix.epochs(2 * WINDOW)[1] == pytest.approx(len(small) / 7)
    assert mix.epochs(2 * WINDOW)[1] > 100


def test_weight_zero_sources_are_never_sampled_and_tiny_weights_are_refused() -> None:
    mix = Mixture([100, 100, 100], [1.0, 0.0, 1.0], seed=0)
    src, _ = mix.blocks(np.arange(3 * WINDOW))
    assert 1 not in set(src.tolist())
    with pytest.raises(MixtureError, match="too small to sample"):
        Mixture([100, 100], [1.0, 1e-6], seed=0)
    with pytest.raises(MixtureError, match="no training blocks"):
        Mixture([100, 0], [0.5, 0.5], seed=0, names=["domain", "replay"])


def test_any_position_is_a_pure_function_so_resume_is_an_exact_seek() -> None:
    a = Mixture([300, 50], [0.8, 0.2], seed=9)
    full = a.blocks(np.arange(3 * WINDOW))
    b = Mixture([300, 50], [0.8, 0.2], seed=9)  # a fresh process, no cached windows
    tail = b.blocks(np.arange(2 * WINDOW + 17, 3 * WINDOW))
    assert (tail[0] == full[0][2 * WINDOW + 17 :]).all()
    assert (tail[1] == full[1][2 * WINDOW + 17 :]).all()
    other = Mixture([300, 50], [0.8, 0.2], seed=10).blocks(np.arange(3 * WINDOW))
    assert (other[1] != full[1]).any(), "the seed decides the order"


def test_the_natural_mixture_keeps_the_order_of_one_shuffled_pool() -> None:
    mix = Mixture([30, 20], None, seed=4)
    _, idx = mix.blocks(np.arange(100))
    for e in range(2):
        perm = np.random.default_rng([4, e]).permutation(50)
        assert (idx[50 * e : 50 * (e + 1)] == perm).all()


# -- on real tokenized data ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("mix")
    train_tokenizer(make_texts(200, seed=5), vocab_size=300, out_dir=base / "tok")
    make_corpus(base / "domain", 40, seed=6)
    make_corpus(base / "replay", 12, seed=7, files=1)

    def tokenize(out: str, sources: list[dict[str, object]], shards: int) -> None:
        cfg = TokenizeStage.model_validate(
            {
                "sources": sources,
                "tokenizerUri": str(base / "tok"),
                "outputUri": str(base / out),
                "blockSize": BLOCK,
                "numShards": shards,
                "heldOutFraction": 0.1,
            }
        )
        for i in range(shards):
            tk.run_tokenize(cfg.model_copy(update={"shard_index": i}))

    both = [
        {"uri": str(base / "domain"), "role": "domain", "weight": 0.9},
        {"uri": str(base / "replay"), "role": "replay", "weight": 0.1},
    ]
    tokenize("both", both, 1)
    tokenize("both3", both, 3)
    tokenize("domain-only", [{"uri": str(base / "domain")}], 1)
    tokenize("replay-only", [{"uri": str(base / "replay")}], 1)
    return base


MIX = [MixtureSource(name="domain", weight=0.9), MixtureSource(name="replay", weight=0.1)]


def test_the_manifest_counts_tokens_per_source_and_no_block_mixes_sources(
    two_sources: Path,
) -> None:
    manifest = TokenBlocks(str(two_sources / "both")).manifest
    srcs = manifest["sources"]
    assert [s["name"] for s in srcs] == ["domain", "replay"]
    assert sum(s["tokens"] for s in srcs) == manifest["totalTokens"]
    assert sum(s["heldoutBlocks"] for s in srcs) == manifest["heldoutBlocks"]
    assert all(s["tokens"] == s["blocks"] * BLOCK and s["docs"] > 0 for s in srcs)
    # One shard: each source's rows are exactly those of the source tokenized alone.
    tb = TokenBlocks(str(two_sources / "both"), mixture=MIX)
    for i, alone in enumerate(("domain-only", "replay-only")):
        ref = TokenBlocks(str(two_sources / alone))
        assert len(tb.source_rows[i]) == len(ref)
        assert (tb.get(tb.source_rows[i]) == ref.get(np.arange(len(ref)))).all()
        held = np.concatenate(list(tb.held_out(4, source=i)))
        assert (held == np.concatenate(list(ref.held_out(4)))).all()


def test_weighted_batches_are_identical_across_dp_splits_and_after_a_restart(
    two_sources: Path,
) -> None:
    tb = TokenBlocks(str(two_sources / "both3"), mixture=MIX, seed=11)
    g, steps = 16, 40

    def global_blocks(dp: int, micro: int, accum: int, start: int) -> list[list[int]]:
        out = []
        for step in range(start, steps):
            ids: list[int] = []
            for r in range(dp):
                ids += [int(b) for m in tb.step_indices(step, r, dp, micro, accum) for b in m]
            out.append(sorted(ids))
        return out

    base = global_blocks(1, 4, 4, 0)
    assert global_blocks(4, 2, 2, 0) == base == global_blocks(2, 1, 8, 0)
    again = TokenBlocks(str(two_sources / "both3"), mixture=MIX, seed=11)
    assert [
        sorted(int(b) for m in again.step_indices(s, 0, 1, 4, 4) for b in m)
        for s in range(25, steps)
    ] == base[25:]
    # The rows drawn per source follow the weights, and tokens_seen counts them exactly.
    rows = np.array([b for step in base for b in step])
    in_replay = np.isin(rows, tb.source_rows[1])
    seen = tb.tokens_seen(steps, g)
    assert seen == {
        "domain": int((~in_replay).sum()) * BLOCK,
        "replay": int(in_replay.sum()) * BLOCK,
    }
    assert abs(in_replay.mean() - 0.1) < 0.02


def test_weights_for_data_tokenized_without_runs_are_refused(two_sources: Path) -> None:
    import json

    path = two_sources / "both" / "manifest.json"
    manifest = json.loads(path.read_text())
    old = two_sources / "old"
    old.mkdir(exist_ok=True)
    for shard in manifest["shards"] + manifest["heldoutShards"]:
        shard.pop("runs")
        (old / shard["name"]).symlink_to(two_sources / "both" / shard["name"])
    manifest.pop("sources")
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert len(TokenBlocks(str(old))) == manifest["totalBlocks"]
    with pytest.raises(DataError, match="tokenize again"):
        TokenBlocks(str(old), mixture=MIX)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (
            [{"uri": "/a", "weight": 1.0}, {"uri": "/b"}],
            r"set weight on every data source or on none \(sources\[1\]",
        ),
        (
            [{"uri": "/a", "weight": 0}, {"uri": "/b", "weight": 0}],
            "at least one data source weight must be positive",
        ),
        (
            [{"uri": "/a", "role": "x"}, {"uri": "/b", "role": "x"}],
            r"roles must be unique \(x repeated\)",
        ),
    ],
)
def test_the_spec_rejects_unusable_weights_and_roles_naming_the_fix(
    sources: list[dict[str, object]], message: str
) -> None:
    from pydantic import ValidationError

    from cpt_operator.api.models import DataSpec

    with pytest.raises(ValidationError, match=message):
        DataSpec.model_validate({"sources": sources})
    with pytest.raises(ValidationError, match=message):
        TokenizeStage.model_validate({"sources": sources, "tokenizerUri": "/t", "outputUri": "/o"})


def test_training_gets_the_weights_by_role_or_index_and_none_without_weights() -> None:
    from cpt_training.config import DataSource, mixture_of

    weighted = [
        DataSource(uri="/a", weight=9, role="domain"),
        DataSource(uri="/b", weight=1),
    ]
    assert mixture_of(weighted) == [
        MixtureSource(name="domain", weight=9.0),
        MixtureSource(name="source-1", weight=1.0),
    ]
    assert mixture_of([DataSource(uri="/a"), DataSource(uri="/b", role="r")]) is None


def test_every_prefix_of_the_stream_holds_each_source_within_two_blocks_of_its_share() -> None:
    """The stratified window order: a short run (a few steps) already sees its weights."""
    weights = [0.9, 0.1]
    mix = Mixture([1000, 100], weights, seed=5)
    src, _ = mix.assign(np.arange(2 * WINDOW))
    replay = np.cumsum(src == 1)
    expected = 0.1 * np.arange(1, 2 * WINDOW + 1)
    assert np.abs(replay - expected).max() <= 2.0
