"""The tokenize stage on local files with a real (locally trained) tokenizer."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest

from cpt_training import piece_cache as pc
from cpt_training import tokenize as tk
from cpt_training.config import TokenizeStage
from cpt_training.tokenize import packing as tk_packing
from cpt_training.tokenize import reading as tk_reading
from cpt_training.tokenize import shard as tk_shard
from fixtures.textgen import make_corpus, make_texts, train_tokenizer

pytestmark = pytest.mark.unit

BLOCK = 32


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(make_texts(300, seed=99), vocab_size=400, out_dir=out)
    return out


@pytest.fixture(scope="module")
def rust(tok_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def cfg_for(src: Path | str, tok_dir: Path, out: Path, **kw: Any) -> TokenizeStage:
    base: dict[str, Any] = {
        "sources": [{"uri": str(src)}],
        "tokenizer_uri": str(tok_dir),
        "output_uri": str(out),
        "block_size": BLOCK,
        "num_shards": 1,
    }
    base.update(kw)
    return TokenizeStage.model_validate(base)


def run_all(cfg: TokenizeStage) -> list[tk.ShardResult]:
    return [
        tk.run_tokenize(cfg.model_copy(update={"shard_index": i})) for i in range(cfg.num_shards)
    ]


def shard_docs(cfg: TokenizeStage, i: int) -> list[str]:
    return [d for batch in tk.shard_documents(cfg, i) for d in batch]


def load_ids(out: Path, name: str) -> np.ndarray:
    ds = datasets.load_from_disk(str(out / name)).with_format("numpy")
    if len(ds) == 0:
        return np.zeros((0, BLOCK), dtype=np.int64)
    return np.asarray(ds["input_ids"])


def test_packing_joins_documents_with_eos_and_cuts_full_blocks(
    tmp_path: Path, tok_dir: Path, rust: Any
) -> None:
    docs = make_corpus(tmp_path / "c", 60, seed=1)
    cfg = cfg_for(tmp_path / "c", tok_dir, tmp_path / "out", num_shards=2)
    results = run_all(cfg)
    eos = rust.token_to_id("</s>")
    for r in results:
        name = tk.shard_name(r.shard, 2)
        ds = datasets.load_from_disk(str(tmp_path / "out" / name)).with_format("numpy")
        ids = np.asarray(ds["input_ids"])
        assert ids.shape == (r.blocks, BLOCK)
        assert (np.asarray(ds["labels"]) == ids).all(), "labels = input_ids; the model shifts"
        assert (np.asarray(ds["attention_mask"]) == 1).all()
        # Independent reference: encode each document alone, append EOS, concatenate.
        stream = []
        for d in shard_docs(cfg, r.shard):
            stream += [*rust.encode(d, add_special_tokens=False).ids, eos]
        assert r.tokens + r.dropped_tokens == len(stream)
        assert 0 <= r.dropped_tokens < BLOCK, "only the final partial block is dropped"
        assert ids.reshape(-1).tolist() == stream[: r.blocks * BLOCK]
        assert int((ids == eos).sum()) == stream[: r.blocks * BLOCK].count(eos)
    assert sum(r.docs for r in results) == len(docs)


@pytest.mark.parametrize(
    ("fmt", "files", "shards"),
    [("jsonl", 2, 3), ("jsonl", 5, 2), ("parquet", 2, 5), ("txt", 0, 4)],
)
def test_shards_are_disjoint_and_together_cover_every_document(
    tmp_path: Path, tok_dir: Path, fmt: Any, files: int, shards: int
) -> None:
    docs = make_corpus(tmp_path / "c", 41, seed=2, files=max(files, 1), fmt=fmt)
    cfg = cfg_for(tmp_path / "c", tok_dir, tmp_path / "out", num_shards=shards)
    per_shard = [shard_docs(cfg, i) for i in range(shards)]
    union = collections.Counter(d.strip() for s in per_shard for d in s)
    assert union == collections.Counter(d.strip() for d in docs), "each doc exactly once"
    assert all(per_shard), "every shard gets work"


def test_shard_plan_is_size_balanced_and_deterministic(tmp_path: Path, tok_dir: Path) -> None:
    src = tmp_path / "c"
    src.mkdir()
    for i, size in enumerate([900, 100, 500, 480, 20, 410]):
        (src / f"f{i}.jsonl").write_text(json.dumps({"text": "x" * size}) + "\n")
    cfg = cfg_for(src, tok_dir, tmp_path / "o", num_shards=3)
    plan = tk.plan_shards(cfg)
    assert plan == tk.plan_shards(cfg)
    loads = sorted(sum(u.size for u in p) for p in plan)
    sizes = [u.size for p in plan for u in p]
    lower_bound = max(max(sizes), sum(sizes) / 3)
    assert loads[-1] <= lower_bound * 4 / 3, f"greedy LPT stays within 4/3 of optimal: {loads}"
    assert loads[0] > 0
    assert sorted(Path(u.uri).name for p in plan for u in p) == [f"f{i}.jsonl" for i in range(6)]


def test_held_out_documents_depend_on_the_text_not_on_sharding(
    tmp_path: Path, tok_dir: Path, rust: Any
) -> None:
    docs = make_corpus(tmp_path / "c", 200, seed=3)
    mask = tk.is_held_out(docs, 0.2, seed=7)
    assert 20 <= mask.sum() <= 60
    assert (tk.is_held_out(docs[::-1], 0.2, seed=7) == mask[::-1]).all()
    assert not (tk.is_held_out(docs, 0.2, seed=8) == mask).all(), "the seed matters"
    held_docs = {d for d, m in zip(docs, mask, strict=True) if m}
    cfg = cfg_for(
        tmp_path / "c", tok_dir, tmp_path / "out", num_shards=3, held_out_fraction=0.2, seed=7
    )
    results = run_all(cfg)
    assert sum(r.heldout_docs for r in results) == len(held_docs)
    assert sum(r.docs for r in results) == len(docs) - len(held_docs)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["heldoutShards"]] == [
        tk.heldout_name(i, 3) for i in range(3)
    ]
    # Every complete document inside a shard's held-out blocks is a held-out document.
    pieces: list[str] = []
    for i in range(3):
        ids = load_ids(tmp_path / "out", tk.heldout_name(i, 3)).reshape(-1).tolist()
        text = rust.decode(ids, skip_special_tokens=False)
        pieces += [p.strip() for p in text.split("</s>")[1:-1]]  # drop the cut ends
    assert pieces and all(p in {d.strip() for d in held_docs} for p in pieces)


def test_manifest_appears_only_when_every_shard_is_done(tmp_path: Path, tok_dir: Path) -> None:
    make_corpus(tmp_path / "c", 50, seed=4)
    cfg = cfg_for(tmp_path / "c", tok_dir, tmp_path / "out", num_shards=3)
    out = tmp_path / "out"
    r0 = tk.run_tokenize(cfg.model_copy(update={"shard_index": 0}))
    r2 = tk.run_tokenize(cfg.model_copy(update={"shard_index": 2}))
    assert (out / tk.done_name(0, 3)).exists() and (out / tk.done_name(2, 3)).exists()
    assert not (out / "manifest.json").exists()
    r1 = tk.run_tokenize(cfg.model_copy(update={"shard_index": 1}))
    m = json.loads((out / "manifest.json").read_text())
    assert m["totalBlocks"] == r0.blocks + r1.blocks + r2.blocks
    assert m["totalTokens"] == m["totalBlocks"] * BLOCK
    assert m["configHash"] == r0.config_hash
    assert [s["name"] for s in m["shards"]] == [tk.shard_name(i, 3) for i in range(3)]
    done = json.loads((out / tk.done_name(1, 3)).read_text())
    assert done["blocks"] == r1.blocks and done["configHash"] == m["configHash"]


def test_shard_index_comes_from_the_indexed_job_env(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_corpus(tmp_path / "c", 20, seed=5)
    cfg = cfg_for(tmp_path / "c", tok_dir, tmp_path / "out", num_shards=2)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert tk.run_tokenize(cfg).shard == 1
    assert (tmp_path / "out" / tk.done_name(1, 2)).exists()
    assert not (tmp_path / "out" / tk.done_name(0, 2)).exists()


def test_rerun_skips_finished_shards_and_rechecks_the_manifest(
    tmp_path: Path, tok_dir: Path
) -> None:
    make_corpus(tmp_path / "c", 40, seed=6)
    cfg = cfg_for(tmp_path / "c", tok_dir, tmp_path / "out", num_shards=2)
    first = run_all(cfg)
    out = tmp_path / "out"
    arrow = next((out / tk.shard_name(0, 2)).glob("*.arrow"))
    mtime = arrow.stat().st_mtime_ns
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "totalBlocks": 1}))
    again = tk.run_tokenize(cfg.model_copy(update={"shard_index": 0}))
    assert again.skipped and again.blocks == first[0].blocks
    assert arrow.stat().st_mtime_ns == mtime, "finished data is not rewritten"
    assert json.loads((out / "manifest.json").read_text()) == m, "manifest re-checked, repaired"


def test_a_different_config_in_an_existing_output_fails_and_changes_nothing(
    tmp_path: Path, tok_dir: Path
) -> None:
    make_corpus(tmp_path / "c", 30, seed=7)
    cfg = cfg_for(tmp_path / "c", tok_dir, tmp_path / "out", num_shards=2)
    run_all(cfg)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    changed = cfg.model_copy(update={"block_size": BLOCK * 2, "shard_index": 1})
    with pytest.raises(tk.TokenizeError, match=r"different config.*configHash.*new outputUri"):
        tk.run_tokenize(changed)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before
    # Only shard 0 finished under the old config: still refused.
    os.remove(tmp_path / "out" / "manifest.json")
    os.remove(tmp_path / "out" / tk.done_name(1, 2))
    with pytest.raises(tk.TokenizeError, match=tk.done_name(0, 2)):
        tk.run_tokenize(changed)


def test_a_shard_that_died_before_its_done_file_is_redone_from_scratch(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_corpus(tmp_path / "c", 30, seed=8)
    cfg = cfg_for(tmp_path / "c", tok_dir, tmp_path / "out", num_shards=1, shard_index=0)
    out = tmp_path / "out"
    (out / tk.shard_name(0, 1)).mkdir(parents=True)
    (out / tk.shard_name(0, 1) / "junk.arrow").write_bytes(b"partial")
    real = tk.ShardResult.to_json

    def boom(self: tk.ShardResult) -> dict[str, Any]:
        raise OSError("killed before the done file")

    monkeypatch.setattr(tk.ShardResult, "to_json", boom)
    with pytest.raises(OSError, match="killed"):
        tk.run_tokenize(cfg)
    assert not (out / tk.done_name(0, 1)).exists() and not (out / "manifest.json").exists()
    monkeypatch.setattr(tk.ShardResult, "to_json", real)
    r = tk.run_tokenize(cfg)
    assert not r.skipped
    assert not (out / tk.shard_name(0, 1) / "junk.arrow").exists()
    assert (out / "manifest.json").exists()


def test_worker_processes_produce_identical_output(tmp_path: Path, tok_dir: Path) -> None:
    make_corpus(tmp_path / "c", 120, seed=9)
    one = cfg_for(tmp_path / "c", tok_dir, tmp_path / "o1", shard_index=0)
    two = cfg_for(tmp_path / "c", tok_dir, tmp_path / "o2", shard_index=0, workers=2)
    r1, r2 = tk.run_tokenize(one), tk.run_tokenize(two)
    assert r1.config_hash == r2.config_hash, "workers do not change the output"
    name = tk.shard_name(0, 1)
    assert (load_ids(tmp_path / "o1", name) == load_ids(tmp_path / "o2", name)).all()


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_file_slices_worker_processes_and_file_cuts_do_not_change_the_blocks(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch, start: str
) -> None:
    import multiprocessing as mp

    monkeypatch.setattr(tk_shard, "_pool_context", lambda: mp.get_context(start))
    make_corpus(tmp_path / "c", 150, seed=4, files=2)
    with (tmp_path / "c" / "part-002.jsonl").open("w") as f:  # rows without text, mid-file
        for i, t in enumerate(make_texts(40, seed=5)):
            f.write(json.dumps({"text": t} if i % 7 else {"other": i}) + "\n")
    kw: dict[str, Any] = {"shard_index": 0, "held_out_fraction": 0.2}
    whole = tk.run_tokenize(cfg_for(tmp_path / "c", tok_dir, tmp_path / "o1", **kw))
    monkeypatch.setattr(tk_reading, "TASK_BYTES", 700)  # many slices per file
    monkeypatch.setattr(tk_packing, "FILE_BYTES", 9 * BLOCK * 5)  # 5 blocks per Arrow file
    spans = tk_reading._jsonl_spans(tmp_path / "c" / "part-000.jsonl")
    data = (tmp_path / "c" / "part-000.jsonl").read_bytes()
    assert len(spans) > 5 and spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(
        a[1] == b[0] and data[b[0] - 1 : b[0]] == b"\n" for a, b in itertools.pairwise(spans)
    )
    sliced = tk.run_tokenize(cfg_for(tmp_path / "c", tok_dir, tmp_path / "o2", workers=2, **kw))
    assert sliced.to_json() | {"seconds": 0} == whole.to_json() | {"seconds": 0}
    for name in (tk.shard_name(0, 1), tk.heldout_name(0, 1)):
        assert (load_ids(tmp_path / "o1", name) == load_ids(tmp_path / "o2", name)).all()
    files = sorted(p.name for p in (tmp_path / "o2" / tk.shard_name(0, 1)).glob("*.arrow"))
    n = len(files)
    assert n == -(-whole.blocks // 5) and files[-1] == f"data-{n - 1:05d}-of-{n:05d}.arrow"


def test_a_local_hf_dataset_is_read_by_id_and_split_by_node(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = make_corpus(tmp_path / "hf", 45, seed=10, files=3)
    cfg = TokenizeStage.model_validate(
        {
            "sources": [{"hfDataset": str(tmp_path / "hf"), "split": "train"}],
            "tokenizerUri": str(tok_dir),
            "outputUri": str(tmp_path / "out"),
            "blockSize": BLOCK,
            "numShards": 2,
        }
    )
    per_shard = [shard_docs(cfg, i) for i in range(2)]
    assert sorted(per_shard[0] + per_shard[1]) == sorted(docs)
    assert not set(per_shard[0]) & set(per_shard[1])
    assert sum(r.docs for r in run_all(cfg)) == len(docs)


def test_txt_paragraph_mode_splits_on_blank_lines_in_the_reader_and_in_the_stage(
    tmp_path: Path, tok_dir: Path
) -> None:
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_text("First para.\nStill first.\n\nSecond para.\n\n\n  Third.  \n")
    cfg = cfg_for(src, tok_dir, tmp_path / "o")
    assert cfg.txt_split == "file"
    assert shard_docs(cfg, 0) == ["First para.\nStill first.\n\nSecond para.\n\n\n  Third."]
    para = cfg_for(src, tok_dir, tmp_path / "p", txt_split="paragraph")
    assert shard_docs(para, 0) == ["First para.\nStill first.", "Second para.", "Third."]
    assert tk.run_tokenize(cfg).docs == 1
    assert tk.run_tokenize(para).docs == 3, "the stage's tasks read with the same mode"
    with pytest.raises(ValueError, match=r"txtSplit\s+Input should be 'file' or 'paragraph'"):
        cfg_for(src, tok_dir, tmp_path / "o", txtSplit="sentence")


def test_txt_split_and_storage_tuning_keep_the_config_hash_of_earlier_datasets(
    tmp_path: Path, tok_dir: Path
) -> None:
    base = cfg_for(tmp_path / "c", tok_dir, tmp_path / "o")
    tuned = cfg_for(tmp_path / "c", tok_dir, tmp_path / "o", storage={"max_concurrency": 3})
    para = cfg_for(tmp_path / "c", tok_dir, tmp_path / "o", txt_split="paragraph")
    assert tk.config_hash(tuned, "d") == tk.config_hash(base, "d")
    assert tk.config_hash(para, "d") != tk.config_hash(base, "d"), "other bytes, other hash"


def test_bad_inputs_fail_with_messages_naming_the_field(tmp_path: Path, tok_dir: Path) -> None:
    make_corpus(tmp_path / "c", 10, seed=11, text_field="body")
    cfg = cfg_for(tmp_path / "c", tok_dir, tmp_path / "o", shard_index=0)
    with pytest.raises(tk.TokenizeError, match=r"no field 'text' \(textField\).*'body'"):
        tk.run_tokenize(cfg)
    with pytest.raises(tk.TokenizeError, match="shardIndex 3 is out of range for numShards 2"):
        tk.run_tokenize(cfg.model_copy(update={"shard_index": 3, "num_shards": 2}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no data")
    with pytest.raises(tk.TokenizeError, match=r"sources\[0\].uri .* has no .jsonl"):
        tk.plan_shards(cfg_for(tmp_path / "empty", tok_dir, tmp_path / "o"))
    with pytest.raises(tk.TokenizeError, match="tokenizerUri"):
        tk.load_tokenizer(str(tmp_path / "nowhere"))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_piece_cache_gives_the_tokenizers_exact_ids_on_mixed_text(rust: Any) -> None:
    cache = tk.PieceCache.wrap(rust)
    assert isinstance(cache, tk.PieceCache)
    texts = [
        *make_texts(50, seed=7),
        "Numbers 12345 and 3.14, unicode: café naïve 東京 — dashes…  double  spaces\n\n\tend",
        "a document that quotes </s> and <pad> literally, then goes on",
        "",
    ]
    expected = [list(e.ids) for e in rust.encode_batch(texts, add_special_tokens=False)]
    assert cache.encode(texts) == expected
    assert cache.encode(texts[::-1]) == expected[::-1]  # served from the cache now
    assert cache.enabled and cache.ids


def test_the_piece_cache_is_not_used_where_it_would_not_be_exact() -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    whitespace = Tokenizer(models.BPE())
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tk.PieceCache.wrap(whitespace) is whitespace
    lowercase = Tokenizer(models.BPE())
    lowercase.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lowercase.normalizer = normalizers.Lowercase()
    assert tk.PieceCache.wrap(lowercase) is lowercase


def test_the_piece_cache_switches_itself_off_when_its_first_batch_differs(rust: Any) -> None:
    from dataclasses import replace

    tables = pc.split_tables(rust.pre_tokenizer)
    assert tables is not None
    # cuts inside pieces: not exact
    wrong = tk.PieceCache(rust, replace(tables, cut=re.compile(r"(?<=e)")))
    texts = make_texts(5, seed=3)
    expected = [list(e.ids) for e in rust.encode_batch(texts, add_special_tokens=False)]
    assert wrong.encode(texts) == expected
    assert not wrong.enabled


_WS = [
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    " \n",
    "\t",
    " \t ",
    "\r\n",
    "\u3000",
    "\xa0",
    "\u2009",
    "\x1c",
    "\x85",
    "\u200b",
    "\ufeff",
    "\u2028",
    "\x0b",
    "\x0c",
    " \u00a0 ",
]
_WORDS = [
    "it's",
    "we'll",
    "they've",
    "I'm",
    "'d",
    "Don't",
    "12345",
    "3.14",
    "1,000,000",
    "x²",
    "½",
    "Ⅻ",
    "٣٤",
    "café",
    "naïve",
    "東京",
    "Ελλάδα",
    "Привет",
    "e\u0301",
    "🙂",
    "👩‍💻",
    "(parens)",
    "--flag",
    "a_b",
    "[x]",
    "...",
    "!!",
    "#",
    "$5",
    "C++",
    "mid-word",
    "ﬁ",
    "İstanbul",
    "\x00",
    "\x7f",
    "\ud7ff",
    "\U0001d518\U0001d52b\U0001d526",
    "</s>",
    "<pad>x",
    "x<s>",
]


def _varied_docs(n: int, seed: int) -> list[str]:
    """Documents mixing English words, digits, unicode letters and marks, emoji, every kind
    of whitespace run (leading, trailing, doubled, unicode spaces and controls) and added
    tokens' text: everything where the chunk split could disagree with GPT-2's."""
    import random

    rng = random.Random(seed)
    english = " ".join(make_texts(20, seed=seed)).split(" ")
    docs = ["", " ", "  leading", "trailing  ", "\n", "a", " a", "a ", "'s", " 's"]
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 60)):
            r = rng.random()
            parts.append(rng.choice(_WORDS) if r < 0.3 else rng.choice(english))
            parts.append(rng.choice(_WS) if r < 0.5 or rng.random() < 0.2 else " ")
        docs.append(("" if rng.random() < 0.7 else rng.choice(_WS)) + "".join(parts))
    return docs


@pytest.fixture(scope="module")
def varied_rust() -> Any:
    """A tokenizer trained on the varied text itself, so whitespace runs, digits and unicode
    have merges of their own (where a wrong cut would change the ids)."""
    return train_tokenizer(_varied_docs(300, seed=1) + make_texts(100, seed=2), vocab_size=1200)


@pytest.mark.parametrize("which", ["english", "varied"])
def test_the_fast_encoder_equals_the_tokenizers_encode_on_varied_text(
    rust: Any, varied_rust: Any, which: str
) -> None:
    rust = rust if which == "english" else varied_rust
    docs = _varied_docs(400, seed=11)
    expected = [rust.encode(d, add_special_tokens=False).ids for d in docs]
    cache = tk.PieceCache.wrap(rust)
    assert isinstance(cache, tk.PieceCache)
    cache.SELF_CHECK_DOCS = 0  # the self-check must not be what makes it right
    eos = 7
    flat = [i for ids in expected for i in [*ids, eos]]
    for _ in range(2):  # cold, then served from the caches
        assert cache.encode(docs) == expected
        assert tk_shard._encode(cache, eos, docs).tolist() == flat
        assert cache.enabled
    assert cache.ids and cache.heads and cache.pieces
    # Batch by batch as the stage calls it, in another order: the same ids per document.
    fresh = tk.PieceCache.wrap(rust)
    order = list(range(len(docs)))[::-1]
    got = [
        d
        for i in range(0, len(order), 37)
        for d in fresh.encode([docs[j] for j in order[i : i + 37]])
    ]
    assert got == [expected[j] for j in order]
    assert fresh.enabled


def test_the_chunk_split_only_cuts_where_gpt2s_split_starts_a_piece(rust: Any) -> None:
    import regex  # type: ignore[import-untyped]

    pieces = regex.compile(pc.PIECE_SPLIT)
    tables = pc.split_tables(rust.pre_tokenizer)
    assert tables is not None
    for doc in _varied_docs(300, seed=5):
        starts = {0}
        pos = 0
        for p in pieces.findall(doc):
            pos += len(p)
            starts.add(pos)
        assert "".join(pieces.findall(doc)) == doc
        cuts = [m.start() for m in tables.cut.finditer(doc)]
        assert set(cuts) <= starts, doc
        assert len(tables.cut.split(doc)) == len(cuts) + 1


def test_no_character_the_tokenizer_counts_as_whitespace_is_cut_before(rust: Any) -> None:
    """The cut needs the character after the space to be non-whitespace to the tokenizer's
    regex. Every candidate (Python whitespace, separators, controls, format characters) is
    asked of the Rust pre-tokenizer itself, independently of the probes the tables came
    from."""
    import sys
    import unicodedata

    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tables = pc.split_tables(rust.pre_tokenizer)
    assert tables is not None
    candidates = [
        chr(c)
        for c in range(sys.maxunicode + 1)
        if not 0xD800 <= c < 0xE000
        and (chr(c).isspace() or unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp", "Cc", "Cf"))
    ]
    assert len(candidates) > 200
    for c in candidates:
        whitespace = pre.pre_tokenize_str(" " + c + "x")[0][0] == "Ġ"  # the space stood alone
        if whitespace:
            assert not tables.cut.match(" " + c), hex(ord(c))
    assert not any(tables.cut.match(" " + c) for c in " \u3000\xa0\x85\t\n")


def test_a_full_cache_starts_over_and_stays_exact(
    rust: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pc, "PIECE_CACHE_ENTRIES", 30)
    docs = _varied_docs(200, seed=8)
    expected = [rust.encode(d, add_special_tokens=False).ids for d in docs]
    cache = tk.PieceCache.wrap(rust)
    got = [d for i in range(0, len(docs), 16) for d in cache.encode(docs[i : i + 16])]
    assert got == expected and cache.enabled
    assert len(cache.ids) + len(cache.heads) < 30 + 16 * 60


def _batch_rows(path: Path) -> list[int]:
    import pyarrow as pa

    with pa.OSFile(str(path)) as f:
        return [b.num_rows for b in pa.ipc.open_stream(f)]


def test_the_block_writer_packs_any_sequence_of_adds_into_the_same_blocks_and_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tk_packing, "FLUSH_BLOCKS", 3)
    monkeypatch.setattr(tk_packing, "FILE_BYTES", 9 * BLOCK * 4)  # 4 blocks per Arrow file
    rng = np.random.default_rng(3)
    stream = rng.integers(0, 1000, size=40 * BLOCK + 7, dtype=np.int32)
    sizes = [0, 5, BLOCK - 5, 1, 7 * BLOCK + 3, 0, 2 * BLOCK, 11, 13 * BLOCK]
    cuts = np.cumsum(sizes)
    pieces = [*np.split(stream, cuts), np.zeros(0, dtype=np.int32)]
    writer = tk.BlockWriter(tmp_path / "d", BLOCK, "fp")
    # The rule, computed on its own: after each add, once FLUSH_BLOCKS full blocks are
    # buffered, all of them are written (as one record batch, cut at file ends).
    expected_batches: list[int] = []
    buffered = 0
    for piece in pieces:
        writer.add(piece, 1)
        buffered += len(piece)
        if buffered // BLOCK >= 3:
            expected_batches.append(buffered // BLOCK)
            buffered %= BLOCK
    dropped = writer.close()
    blocks = len(stream) // BLOCK
    assert dropped == len(stream) - blocks * BLOCK == buffered and writer.blocks == blocks
    assert writer.tokens_in == len(stream) and writer.docs == len(pieces)
    ids = load_ids(tmp_path, "d")
    assert (ids.reshape(-1) == stream[: blocks * BLOCK]).all()
    files = sorted((tmp_path / "d").glob("*.arrow"))
    assert len(files) == -(-blocks // 4)
    rows = [n for f in files for n in _batch_rows(f)]
    assert sum(rows) == blocks and all(n <= 4 for n in rows)
    # Batches are the flushes, split only where a file is full.
    start = 0
    for size in expected_batches:
        part, got = [], 0
        while got < size:
            part.append(rows[start])
            got += rows[start]
            start += 1
        assert got == size, (rows, expected_batches)


def test_a_local_output_is_staged_inside_it_and_renamed_into_place(
    tmp_path: Path, tok_dir: Path
) -> None:
    make_corpus(tmp_path / "c", 40, seed=12)
    out = tmp_path / "out"
    stale = out / f".{tk.shard_name(0, 1)}.cpt-tmp.killed"
    (stale / tk.shard_name(0, 1)).mkdir(parents=True)
    (stale / tk.shard_name(0, 1) / "data-00000-of-00001.arrow").write_bytes(b"partial")
    r = tk.run_tokenize(cfg_for(tmp_path / "c", tok_dir, out, held_out_fraction=0.2))
    assert not stale.exists(), "a killed run's staging dir is removed"
    assert sorted(p.name for p in out.iterdir()) == [
        tk.heldout_name(0, 1),
        "manifest.json",
        tk.shard_name(0, 1),
        tk.done_name(0, 1),
    ]
    assert load_ids(out, tk.shard_name(0, 1)).shape == (r.blocks, BLOCK)
    assert load_ids(out, tk.heldout_name(0, 1)).shape == (r.heldout_blocks, BLOCK)


def test_with_a_pool_every_task_is_encoded_in_a_worker_and_the_main_process_packs(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_corpus(tmp_path / "c", 90, seed=13, files=3)
    monkeypatch.setattr(tk_reading, "TASK_BYTES", 2000)
    log = tmp_path / "pids"
    real = tk_shard._run_task

    def run(tok: Any, eos: int, opts: Any, task: Any) -> Any:
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return real(tok, eos, opts, task)

    import multiprocessing as mp

    monkeypatch.setattr(tk_shard, "_run_task", run)  # forked workers inherit it
    monkeypatch.setattr(tk_shard, "_pool_context", lambda: mp.get_context("fork"))
    one = tk.run_tokenize(cfg_for(tmp_path / "c", tok_dir, tmp_path / "o1"))
    assert set(log.read_text().split()) == {str(os.getpid())}, "one worker: in process"
    log.unlink()
    two = tk.run_tokenize(cfg_for(tmp_path / "c", tok_dir, tmp_path / "o2", workers=2))
    pids = log.read_text().split()
    assert len(pids) > 6 and str(os.getpid()) not in pids
    assert len(set(pids)) == 2, "both workers took tasks"
    assert two.to_json() | {"seconds": 0} == one.to_json() | {"seconds": 0}
    name = tk.shard_name(0, 1)
    assert (load_ids(tmp_path / "o1", name) == load_ids(tmp_path / "o2", name)).all()


def test_the_loaded_tokenizer_is_parsed_once_and_reused(tok_dir: Path) -> None:
    tok = tk.load_tokenizer(str(tok_dir))
    assert tok.rust() is tok.rust() is tok.loaded
    assert tok == tk.LoadedTokenizer(tok.spec, tok.eos_id, tok.vocab_size, tok.digest)
    fresh = tk.LoadedTokenizer(tok.spec, tok.eos_id, tok.vocab_size, tok.digest).rust()
    assert fresh.to_str() == tok.spec
    cache = tk.PieceCache.wrap(tok.rust(), tok.spec)
    assert isinstance(cache, tk.PieceCache) and cache.rust is tok.loaded
