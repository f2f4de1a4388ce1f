"""A cache in front of a byte-level BPE tokenizer that gives the Rust tokenizer's ids exactly.

Why a cache: a corpus repeats its words, and the Rust encoder's per-document work
(pre-tokenizer, encodings, offsets, Python objects) costs more than looking the words' ids up
(2-4x per core on English text: docs/PERFORMANCE.md, tokenization).

Why it is exact by construction, not by sampling: everything the cache does with Python's own
regular expressions depends on how characters are classified (letter, number, whitespace,
other), and Python's tables (``re``, the ``regex`` package) and the Rust pre-tokenizer's
(Oniguruma) differ for thousands of recently assigned code points and move whenever either
library updates. So the classification is *asked of the tokenizer's own pre-tokenizer* once
per process (:func:`split_tables`), over a range of code points, and Python's split is used
only where it was shown to agree:

* a document is cut into chunks at a space followed by a character that the Rust
  pre-tokenizer has shown not to be whitespace (GPT-2's split starts a piece there, whatever
  comes before or after; :data:`PIECE_SPLIT`); anything else stays inside a chunk;
* a new chunk is split into GPT-2 pieces with the ``regex`` package only if every character
  in it was classified the same by both; other new chunks, and each document's first chunk,
  are encoded by the Rust tokenizer whole.

The self-check against the Rust tokenizer on sampled documents stays, as a guard only.
"""

from __future__ import annotations

import json
import logging
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PIECE_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's split, as in ``pre_tokenizers.ByteLevel(use_regex=True)`` (needs the ``regex``
module for ``\\p{L}``): used only on new chunks whose every character both engines classify
alike."""

PROBED_RANGES = ((0x0000, 0x2C00), (0x3000, 0x3100), (0xFF00, 0xFFF0))
"""Code points whose classification is asked of the Rust pre-tokenizer (Latin to Glagolitic,
general punctuation, symbols, CJK punctuation and kana, full-width forms: the characters
that sit next to spaces in most text). Characters outside are never cut before and send
their chunk to the Rust tokenizer: slower for such text, never wrong."""

PIECE_CACHE_ENTRIES = 1 << 20
"""Chunks (and pieces) cached per process before the cache starts over (bounded memory)."""

_PROBES = (("!a", "", "L"), ("!1", "", "N"), ("!\t", "\t", "S"), ("a!", "", "O"))
"""(before, after, class): the probed character joins the piece of ``before``'s last
character exactly when it is of that class (GPT-2's ``\\p{L}+``, ``\\p{N}+``, a whitespace
run, ``[^\\s\\p{L}\\p{N}]+``); ``before``'s first character ends the previous probe's piece."""

_STRUCTURE_PROBE = (
    "it's we'll they've I'M 'd Don't x 's  a  b\t\tc \n\n d\r\ne  12345 3.14 1,000 (x) --y "
    "a_b [z] ... !! # $5 C++ mid-word  \t end  "
)
"""ASCII text exercising every alternative of GPT-2's split: the Rust pre-tokenizer must
split it exactly as :data:`PIECE_SPLIT` does, or the cache is not used at all."""


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> character table (``pre_tokenizers.ByteLevel.alphabet()``), keyed by
    the code point of the byte read as latin-1, for ``str.translate``."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(moved)})
    return table


_BYTES = _byte_chars()


@dataclass(frozen=True)
class SplitTables:
    """What the Rust pre-tokenizer showed about each probed character."""

    cut: re.Pattern[str]
    """Where a document is cut into chunks: a space before a character shown not whitespace."""
    unverified: re.Pattern[str]
    """Any character whose class the ``regex`` package and the Rust pre-tokenizer do not
    share (or that was not probed): a chunk holding one goes to the Rust tokenizer."""
    pieces: Any
    """:data:`PIECE_SPLIT` compiled with ``regex``; None where ``regex`` is not installed."""


def _char_class(chars: Iterable[int]) -> str:
    """A regex character class body for the code points (merged into ranges)."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(chars):
        if run and c == run[-1] + 1:
            run[-1] = c
            continue
        if run:
            out.append(_range(*run))
        run = [c, c]
    if run:
        out.append(_range(*run))
    return "".join(out)


def _range(lo: int, hi: int) -> str:
    return f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}"


def _starts(pre: Any, text: str) -> set[int]:
    return {start for _, (start, _end) in pre.pre_tokenize_str(text)}


def rust_classes(pre: Any, codepoints: list[int]) -> dict[int, str]:
    """Each code point's class (L, N, S or O; ``?`` if the probes disagree) under the Rust
    pre-tokenizer ``pre``, from where it starts pieces in small probe texts (blocks of 256
    characters: its offsets cost time quadratic in a text's length)."""
    out: dict[int, str] = {}
    for i in range(0, len(codepoints), 256):
        block = codepoints[i : i + 256]
        parts: list[str] = []
        at: list[tuple[int, str]] = []
        pos = 0
        for c in block:
            for before, after, cls in _PROBES:
                pos += len(before)
                at.append((pos, cls))
                parts.append(before + chr(c) + after)
                pos += 1 + len(after)
        starts = _starts(pre, "".join(parts))
        for j, c in enumerate(block):
            joined = [cls for p, cls in at[4 * j : 4 * j + 4] if p not in starts]
            out[c] = joined[0] if len(joined) == 1 else "?"
    return out


def _regex_class(pattern: Any, c: int) -> str:
    m = pattern.match(chr(c))
    return "O" if m is None else str(m.lastgroup)


_TABLES: dict[str, SplitTables | None] = {}


def split_tables(pre: Any) -> SplitTables | None:
    """The chunk cut and the set of characters Python may split, for the Rust pre-tokenizer
    ``pre`` (a tokenizer's own ``pre_tokenizer``; asked once per process and pre-tokenizer
    configuration, about 0.3 s). None when ``pre`` does not split :data:`_STRUCTURE_PROBE`
    as GPT-2's regex does."""
    key = json.dumps(json.loads(pre.__getstate__()), sort_keys=True)
    if key not in _TABLES:
        _TABLES[key] = _probe(pre)
    return _TABLES[key]


def _probe(pre: Any) -> SplitTables | None:
    try:
        import regex  # type: ignore[import-untyped]
    except ImportError:
        regex = None
    probed = [c for lo, hi in PROBED_RANGES for c in range(lo, hi) if not 0xD800 <= c < 0xE000]
    rust = rust_classes(pre, probed)
    cut = re.compile(" (?=[" + _char_class(c for c in probed if rust[c] in "LNO") + "])")
    if regex is None:
        return SplitTables(cut, re.compile("[\\s\\S]"), None)
    pieces = regex.compile(PIECE_SPLIT)
    ours = [m.end() for m in pieces.finditer(_STRUCTURE_PROBE)]
    theirs = sorted(end for _, (_start, end) in pre.pre_tokenize_str(_STRUCTURE_PROBE))
    if ours != theirs:
        log.warning("piece cache not used: the pre-tokenizer does not split as GPT-2's regex")
        return None
    classes = regex.compile(r"(?P<L>\p{L})|(?P<N>\p{N})|(?P<S>\s)")
    agree = (c for c in probed if rust[c] == _regex_class(classes, c))
    return SplitTables(cut, re.compile("[^" + _char_class(agree) + "]"), pieces)


class PieceCache:
    """Encodes documents through caches in front of the Rust tokenizer (see the module doc).

    A document is cut into chunks at :attr:`SplitTables.cut` (the standard library's ``re``:
    C speed), each chunk's ids are looked up (``ids``; a document's first chunk, which has no
    space before it, in ``heads``) and joined as bytes. New chunks whose characters are all
    verified are split into GPT-2 pieces (one ``regex`` call per batch), and the pieces not
    seen before (``pieces``) are encoded by the BPE model in one call per batch; other new
    chunks and new heads are encoded by the Rust tokenizer.

    Used only where the encoder handles every piece on its own anyway: BPE without dropout
    behind the plain byte-level pre-tokenizer (GPT-2's split, no prefix space) and no
    normalizer, as for the tokenizers cpt trains. :meth:`wrap` returns the Rust tokenizer
    unchanged for any other. A document holding an added token's text (``</s>`` ...) goes to
    the Rust tokenizer whole. Samples (``SELF_CHECK_DOCS``) are compared with the Rust
    tokenizer's ids, as a guard; on any difference the cache switches itself off (logged)."""

    SELF_CHECK_DOCS = 64
    """Documents of the first batch encoded directly too and compared (then 8 documents of
    every 256th batch)."""

    def __init__(self, rust: Any, tables: SplitTables, added: Any = None) -> None:
        self.rust = rust
        self._batch = getattr(rust, "encode_batch_fast", None) or rust.encode_batch
        self._split = tables.cut.split
        self._unverified = tables.unverified.search
        self._pieces = tables.pieces.findall if tables.pieces is not None else None
        self._added = added
        self.ids: dict[str, bytes] = {}
        """Chunk after a cut (the space before it implied) -> int32 ids of space + chunk."""
        self.heads: dict[str, bytes] = {}
        """A document's first chunk (no space before it) -> its int32 ids."""
        self.pieces: dict[str, bytes] = {}
        """GPT-2 piece -> its int32 ids (only to encode new chunks)."""
        self.enabled = True
        self._calls = 0

    @classmethod
    def wrap(cls, rust: Any, spec_json: str | None = None) -> Any:
        """A cache in front of ``rust`` where it is exact, else ``rust`` itself;
        ``spec_json``: ``rust.to_str()`` when the caller has it already."""
        spec = json.loads(spec_json if spec_json is not None else rust.to_str())
        pre = spec.get("pre_tokenizer") or {}
        model = spec.get("model") or {}
        if (
            spec.get("normalizer") is not None
            or pre.get("type") != "ByteLevel"
            or not pre.get("use_regex", True)
            or pre.get("add_prefix_space")
            or model.get("type") != "BPE"
            or model.get("dropout")
        ):
            return rust
        tables = split_tables(rust.pre_tokenizer)
        if tables is None:
            return rust
        added = [str(t["content"]) for t in spec.get("added_tokens") or [] if t.get("content")]
        added_re = re.compile("|".join(map(re.escape, added))) if added else None
        return cls(rust, tables, added_re)

    def _rust_ids(self, texts: list[str]) -> list[bytes]:
        return [array("i", e.ids).tobytes() for e in self._batch(texts, add_special_tokens=False)]

    def _model_ids(self, pieces: list[str]) -> list[bytes]:
        """Ids of single pieces from the BPE model itself, on their byte-level characters
        (what the byte-level pre-tokenizer hands it): half the cost of a full encode."""
        tokenize = self.rust.model.tokenize
        return [
            array(
                "i", [t.id for t in tokenize(p.encode().decode("latin-1").translate(_BYTES))]
            ).tobytes()
            for p in pieces
        ]

    def _direct(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._batch(texts, add_special_tokens=False)]

    def _new_chunks(self, keys: list[str]) -> dict[str, bytes]:
        """Ids of ``" " + key`` for chunks not seen before. Those with a character whose class
        is not verified go to the Rust tokenizer; the others are joined into one text (every
        cut is a piece boundary there too), split into pieces in one call, and the pieces not
        seen before are encoded by the BPE model in one call: the Rust encoder costs
        microseconds per sequence, and a chunk holds a rare word more often than a piece."""
        unverified = self._unverified
        odd = [k for k in keys if unverified(k)] if self._pieces is not None else keys
        out = dict(zip(odd, self._rust_ids([" " + k for k in odd]), strict=True))
        keys = [k for k in keys if k not in out] if odd else keys
        if not keys:
            return out
        assert self._pieces is not None
        pieces: list[str] = self._pieces(" " + " ".join(keys))
        ends = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
        chunk_ends = np.cumsum(np.fromiter((len(k) + 1 for k in keys), dtype=np.int64))
        cut = np.searchsorted(ends, chunk_ends, side="right")
        if cut[-1] != len(pieces) or not np.array_equal(ends[cut - 1], chunk_ends):
            # a piece crosses a cut: not GPT-2's split (the self-check's business)
            out.update(zip(keys, self._rust_ids([" " + k for k in keys]), strict=True))
            return out
        cache = self.pieces
        if len(cache) > PIECE_CACHE_ENTRIES:
            cache.clear()
        new = list(set(pieces).difference(cache))
        cache.update(zip(new, self._model_ids(new), strict=True))
        get = cache.__getitem__
        start = 0
        for key, stop in zip(keys, cut.tolist(), strict=True):
            out[key] = b"".join(map(get, pieces[start:stop]))
            start = stop
        return out

    def _chunked(self, texts: list[str]) -> list[list[bytes]]:
        """Each document's ids as the list of its chunks' int32 ids (bytes). The per-chunk
        work stays in C (``split``, ``map``, set difference): a Python loop over chunks would
        cost as much as the encoder saves."""
        cache, heads = self.ids, self.heads
        if len(cache) + len(heads) > PIECE_CACHE_ENTRIES:
            cache.clear()
            heads.clear()
        get, hget = cache.get, heads.get
        split = self._split
        out: list[list[Any]] = []
        pending: list[tuple[int, list[str]]] = []
        whole: list[int] = []
        miss: set[str] = set()
        miss_heads: set[str] = set()
        for i, text in enumerate(texts):
            if self._added is not None and self._added.search(text):
                out.append([])  # holds an added token's text: the Rust tokenizer, whole
                whole.append(i)
                continue
            parts = split(text)
            found: list[Any] = list(map(get, parts))
            found[0] = hget(parts[0])
            if None in found:
                pending.append((i, parts))
                if found[0] is None:
                    miss_heads.add(parts[0])
                miss.update(set(parts[1:]).difference(cache))
            out.append(found)
        if miss:
            cache.update(self._new_chunks(list(miss)))
        if miss_heads:
            keys = list(miss_heads)
            heads.update(zip(keys, self._rust_ids(keys), strict=True))
        for i, parts in pending:
            found = [heads[parts[0]]]
            found.extend(map(cache.__getitem__, islice(parts, 1, None)))
            out[i] = found
        for i, doc in zip(whole, self._rust_ids([texts[i] for i in whole]), strict=True):
            out[i] = [doc]
        return out

    def _checked(self, texts: list[str]) -> list[list[bytes]] | None:
        """The chunked ids, or None once a sample differs from the Rust tokenizer's."""
        out = self._chunked(texts)
        self._calls += 1
        n = self.SELF_CHECK_DOCS if self._calls == 1 else 8 if self._calls % 256 == 0 else 0
        if n and [ids_of(d) for d in out[:n]] != self._direct(texts[:n]):
            log.warning("piece cache disabled: it differs from the tokenizer on this input")
            self.enabled = False
            self.ids.clear()
            self.heads.clear()
            self.pieces.clear()
            return None
        return out

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each document (no special tokens added)."""
        out = self._checked(texts) if self.enabled else None
        if out is None:
            return self._direct(texts)
        return [ids_of(d) for d in out]

    def encode_flat(self, texts: list[str], eos: int) -> np.ndarray:
        """Ids of the documents, each followed by ``eos``, as one flat int32 array: one
        ``bytes.join`` over the chunks' ids, no Python int per token."""
        out = self._checked(texts) if self.enabled else None
        if out is None:
            return flat_ids([np.asarray(d, dtype=np.int32) for d in self._direct(texts)], eos)
        end = np.array([eos], dtype=np.int32).tobytes()
        seq: list[bytes] = []
        for doc in out:
            seq.extend(doc)
            seq.append(end)
        return np.frombuffer(b"".join(seq), dtype=np.int32)


def ids_of(chunks: list[bytes]) -> list[int]:
    """A document's ids from its chunks' int32 bytes."""
    ids: list[int] = np.frombuffer(b"".join(chunks), dtype=np.int32).tolist()
    return ids


def flat_ids(docs: list[np.ndarray], eos: int) -> np.ndarray:
    """Documents' id arrays, each followed by EOS, as one flat int32 array."""
    if not docs:
        return np.zeros(0, dtype=np.int32)
    eos_arr = np.array([eos], dtype=np.int32)
    parts: list[np.ndarray] = []
    for d in docs:
        parts.append(d)
        parts.append(eos_arr)
    return np.concatenate(parts)
