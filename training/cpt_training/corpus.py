"""Offline English text and tokenizer training for the demo, tests and benchmarks.

No dataset may be downloaded at run time here, yet the demo and the tokenization benchmark
want real English prose, not random words. Every CPython install ships the reference manual's
topics (``pydoc_data.topics``) and thousands of docstrings: a few MB of real technical English
that is identical on every machine with the same Python version.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_WS = re.compile(r"[ \t]+")


def _clean(text: str) -> str:
    lines = [_WS.sub(" ", line).strip() for line in text.splitlines()]
    return "\n".join(lines).strip()


def python_docs(min_chars: int = 200) -> Iterator[str]:
    """Yield documents: reference-manual topics, then module/class/function docstrings of the
    standard library, in a deterministic order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = _clean(topics[key])
        if len(text) >= min_chars:
            yield text
    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "test", "lib2to3"}
    top = sorted(
        (
            m
            for m in pkgutil.iter_modules()
            if m.name in sys.stdlib_module_names
            and m.name not in skip
            and not m.name.startswith("_")
        ),
        key=lambda m: m.name,
    )
    names: list[str] = []
    for m in top:
        names.append(m.name)
        if m.ispkg:  # email.mime, http.client, concurrent.futures, ...
            path = [str(Path(m.module_finder.path) / m.name)]  # type: ignore[union-attr]
            names += sorted(
                f"{m.name}.{sub.name}"
                for sub in pkgutil.iter_modules(path)
                if not sub.name.startswith("_") and "test" not in sub.name
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                mod = importlib.import_module(name)
            except Exception:  # optional stdlib modules (tkinter, curses) may be missing
                continue
            docs = [mod.__doc__ or ""]
            for attr in sorted(vars(mod)):
                obj = getattr(mod, attr, None)
                if getattr(obj, "__module__", None) == name:  # defined here, not imported
                    docs.append(getattr(obj, "__doc__", None) or "")
            for doc in docs:
                if not isinstance(doc, str):  # __doc__ can be a descriptor on some types
                    continue
                text = _clean(doc)
                if len(text) >= min_chars:
                    yield text


def write_corpus(out_dir: str | Path, *, max_bytes: int = 4_000_000, files: int = 4) -> Path:
    """Write the corpus as ``files`` jsonl files (``{"text": ...}`` per line) and return the
    directory. Documents are dealt round-robin so every file has similar content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = [[] for _ in range(files)]
    total = 0
    for i, doc in enumerate(python_docs()):
        parts[i % files].append(json.dumps({"text": doc}))
        total += len(doc.encode())
        if total >= max_bytes:
            break
    for i, lines in enumerate(parts):
        (out / f"part-{i:03d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def build_bpe(texts: Iterable[str], *, vocab_size: int = 4096) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with ``<pad>``, ``<s>``, ``</s>``
    (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 4096
) -> Path:
    """Train a byte-level BPE tokenizer (:func:`build_bpe`) and save it as a Hugging Face
    tokenizer directory (``PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=build_bpe(texts, vocab_size=vocab_size),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama 3's pre-tokenizer split (its tokenizer.json, ``Split`` with behaviour isolated)."""


def build_llama3_style_bpe(texts: Iterable[str], *, vocab_size: int = 4096) -> Any:
    """Train a BPE ``tokenizers.Tokenizer`` laid out as Llama 3's: :data:`LLAMA3_SPLIT`, then
    byte-level without GPT-2's regex, ``ignore_merges``; ``<|begin_of_text|>`` and
    ``<|end_of_text|>`` (ids 0, 1). For tests and benchmarks of that tokenizer family (the
    real one is gated on the Hub)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
