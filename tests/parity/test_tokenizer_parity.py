"""The tokenize stage writes exactly the ids of a plain ``tokenizers`` encode, for every
tokenizer family it supports, over a stress corpus (tests/fixtures/unicode_stress.py): a
cpt-trained byte-level BPE (the family the piece cache serves), one whose merges cross the
Rust pre-tokenizer's pieces (a vocabulary trained with another split, where a split on other
Unicode tables changes the ids), Llama-2's SentencePiece-style BPE (normalizer, byte
fallback) and Llama-3's split + byte-level BPE. All built here with ``tokenizers``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpt_training import piece_cache as pc
from cpt_training import tokenize as tk
from cpt_training.config import TokenizeStage
from fixtures.textgen import make_texts
from fixtures.unicode_stress import stress_docs

pytestmark = pytest.mark.parity

BLOCK = 64


@pytest.fixture(scope="module")
def stress() -> list[str]:
    return stress_docs(300, seed=3)


@pytest.fixture(scope="module")
def training_text(stress: list[str]) -> list[str]:
    """What the tokenizers learn from: the stress material itself (so it has merges of its
    own), from other documents than the ones encoded, plus English."""
    return stress_docs(300, seed=4) + make_texts(200, seed=5)


def _bpe_trainer(vocab: int, special: list[str], **kw: Any) -> Any:
    from tokenizers import trainers

    return trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, show_progress=False, **kw)


def _byte_level(texts: list[str], *, cross_pieces: bool) -> Any:
    """cpt's own byte-level BPE; ``cross_pieces``: trained without GPT-2's split, so merges
    join letters, numbers and marks that the split keeps apart, then served with the split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from cpt_training.corpus import build_bpe

    if not cross_pieces:
        return build_bpe(texts, vocab_size=1500)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    trainer = _bpe_trainer(
        1500, ["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _llama2(texts: list[str]) -> Any:
    """Llama-2's tokenizer.json layout: ``▁`` for spaces by a normalizer, no pre-tokenizer,
    BPE with byte fallback over ``<0xXX>`` tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    special = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tok.train_from_iterator(texts, trainer=_bpe_trainer(1200, special))
    return tok


def _llama3(texts: list[str]) -> Any:
    """Llama-3's layout: its split regex (isolated), then byte-level without GPT-2's regex;
    BPE with ignore_merges."""
    from cpt_training.corpus import build_llama3_style_bpe

    return build_llama3_style_bpe(texts, vocab_size=1500)


FAMILIES = ["byte-level", "byte-level-cross-pieces", "llama2", "llama3"]
EOS = {"llama3": "<|end_of_text|>"}


@pytest.fixture(scope="module")
def tokenizers_(training_text: list[str]) -> dict[str, Any]:
    return {
        "byte-level": _byte_level(training_text, cross_pieces=False),
        "byte-level-cross-pieces": _byte_level(training_text, cross_pieces=True),
        "llama2": _llama2(training_text),
        "llama3": _llama3(training_text),
    }


def _save(tok: Any, family: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    eos = EOS.get(family, "</s>")
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return out


def _expected(tok: Any, docs: list[str], eos: int) -> list[int]:
    """Each document's ids then EOS; the stage skips empty documents (nothing to learn)."""
    return [i for d in docs if d for i in [*tok.encode(d, add_special_tokens=False).ids, eos]]


def test_the_stress_corpus_covers_every_general_category_and_the_newer_code_points(
    stress: list[str],
) -> None:
    import unicodedata

    from fixtures.unicode_stress import newer_than_python

    text = "".join(stress)
    categories = {unicodedata.category(c) for c in text}
    every = {unicodedata.category(chr(c)) for c in range(0x110000)} - {"Cs"}
    assert categories >= every, sorted(every - categories)
    assert len(set(text) & set(newer_than_python())) > 100
    for needle in ("\u200d", "\r\n", "\u202e", "\u0301", "東京", "def f(", "9" * 400):
        assert needle in text, repr(needle)


def test_the_stress_corpus_has_text_where_python_and_rust_tables_split_differently(
    stress: list[str],
) -> None:
    """Else the tests below could not fail on a split taken from Python's tables."""
    import regex  # type: ignore[import-untyped]
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = regex.compile(pc.PIECE_SPLIT)
    differ = 0
    for doc in stress:
        ends = [m.end() for m in split.finditer(doc)]
        if ends != [end for _, (_s, end) in pre.pre_tokenize_str(doc)]:
            differ += 1
    assert differ > 20


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stage_writes_the_ids_of_a_plain_tokenizers_encode(
    family: str, tokenizers_: dict[str, Any], stress: list[str], tmp_path: Path
) -> None:
    """English documents first, as a corpus starts: the cache's sampled self-check sees
    only them, so the stress documents' ids are the cache's own."""
    import datasets

    tok = tokenizers_[family]
    docs = make_texts(64, seed=6) + stress
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8"
    )
    tok_dir = _save(tok, family, tmp_path / "tok")
    cfg = TokenizeStage.model_validate(
        {
            "sources": [{"uri": str(corpus)}],
            "tokenizer_uri": str(tok_dir),
            "output_uri": str(tmp_path / "out"),
            "block_size": BLOCK,
            "held_out_fraction": 0.0,
            "shard_index": 0,
        }
    )
    tk.run_tokenize(cfg)
    eos = tok.token_to_id(EOS.get(family, "</s>"))
    expected = _expected(tok, docs, eos)
    parts = sorted(p for p in (tmp_path / "out").iterdir() if p.is_dir())
    got = np.concatenate(
        [
            np.asarray(datasets.load_from_disk(str(p)).with_format("numpy")["input_ids"])
            for p in parts
        ]
    ).ravel()
    assert len(expected) // BLOCK == len(got) // BLOCK > 50
    assert got.tolist() == expected[: len(got)]
    is_cached = isinstance(tk.PieceCache.wrap(tok), tk.PieceCache)
    assert is_cached == family.startswith("byte-level")


@pytest.mark.parametrize("family", ["byte-level", "byte-level-cross-pieces"])
def test_the_piece_cache_equals_the_rust_tokenizer_on_every_document_without_its_self_check(
    family: str, tokenizers_: dict[str, Any], stress: list[str]
) -> None:
    tok = tokenizers_[family]
    cache = tk.PieceCache.wrap(tok)
    assert isinstance(cache, tk.PieceCache)
    cache.SELF_CHECK_DOCS = 0  # the guard must not be what makes it right
    expected = [tok.encode(d, add_special_tokens=False).ids for d in stress]
    for _ in range(2):  # cold, then from the caches
        got = [d for i in range(0, len(stress), 50) for d in cache.encode(stress[i : i + 50])]
        assert got == expected
    assert cache.enabled and cache.pieces and cache.ids


def test_every_probed_character_is_classified_as_an_independent_rust_probe_says() -> None:
    """The tables' classes, checked against the Rust pre-tokenizer in another context
    (the character between two copies of a letter, digit, mark and space)."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tables = pc.split_tables(pre)
    assert tables is not None
    probed = [c for lo, hi in pc.PROBED_RANGES for c in range(lo, hi) if not 0xD800 <= c < 0xE000]
    classes = pc.rust_classes(pre, probed)
    rng = np.random.default_rng(0)
    for c in rng.choice(probed, size=3000, replace=False).tolist():
        ch = chr(c)
        cls = classes[c]
        assert cls != "?", hex(c)
        assert (len(pre.pre_tokenize_str("b" + ch + "b")) == 1) == (cls == "L"), hex(c)
        assert (len(pre.pre_tokenize_str("7" + ch + "7")) == 1) == (cls == "N"), hex(c)
        assert (len(pre.pre_tokenize_str("\n" + ch + "\n")) == 1) == (cls == "S"), hex(c)
        assert bool(tables.cut.match(" " + ch)) == (cls != "S"), hex(c)
