"""Tokenize from S3 to S3 and load the blocks back through the node-local cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpt_training import storage
from cpt_training import tokenize as tk
from cpt_training.config import TokenizeStage
from cpt_training.data import TokenBlocks
from fixtures.textgen import make_corpus, make_texts, train_tokenizer

pytestmark = pytest.mark.integration


def test_s3_corpus_and_tokenizer_to_s3_shards_then_cached_blocks(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    train_tokenizer(make_texts(150, seed=1), vocab_size=300, out_dir=tmp_path / "tok")
    docs = make_corpus(tmp_path / "jsonl", 40, seed=2, files=2)
    docs += make_corpus(tmp_path / "pq", 25, seed=3, files=1, fmt="parquet")
    storage.upload_dir(tmp_path / "tok", f"s3://{bucket}/tokenizer")
    storage.upload_dir(tmp_path / "jsonl", f"s3://{bucket}/raw/a")
    storage.upload_dir(tmp_path / "pq", f"s3://{bucket}/raw/b")
    out = f"s3://{bucket}/data/tokenized"
    cfg = TokenizeStage.model_validate(
        {
            "sources": [{"uri": f"s3://{bucket}/raw/a/"}, {"uri": f"s3://{bucket}/raw/b"}],
            "tokenizerUri": f"s3://{bucket}/tokenizer/",
            "outputUri": out,
            "blockSize": 32,
            "numShards": 2,
            "heldOutFraction": 0.1,
        }
    )
    results = [tk.run_tokenize(cfg.model_copy(update={"shard_index": i})) for i in range(2)]
    assert sum(r.docs + r.heldout_docs for r in results) == len(docs)
    st = storage.open_storage(out)
    keys = st.list()
    assert "manifest.json" in keys and f"{tk.shard_name(1, 2)}/state.json" in keys
    manifest = st.read_json("manifest.json")
    assert manifest["totalBlocks"] == sum(r.blocks for r in results)
    # A rerun of a finished shard skips; the stored data is untouched.
    assert tk.run_tokenize(cfg.model_copy(update={"shard_index": 0})).skipped

    cache = tmp_path / "cache"
    tb = TokenBlocks(out, cache, seed=5)
    assert len(tb) == manifest["totalBlocks"] and tb.num_held_out == manifest["heldoutBlocks"]
    first = next(tb.batches(0, 2, 2, 1)).micro_batches[0]
    assert str(tb.root).startswith(str(cache))
    # Once per node: a second loader (another local rank, a restarted pod) uses the cache
    # even if S3 is unreachable for the shard data.
    for name in [s["name"] for s in manifest["shards"]]:
        st.delete_prefix(name)
    again = TokenBlocks(out, cache, seed=5)
    assert np.array_equal(next(again.batches(0, 2, 2, 1)).micro_batches[0], first)
    assert json.loads((again.root / ".complete").read_text()) == manifest
