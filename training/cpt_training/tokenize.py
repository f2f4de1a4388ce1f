"""The tokenize stage: shard ``i`` of ``N`` reads its slice of the corpus, tokenizes, packs
and writes Arrow blocks that both trainers load.

Input: Hugging Face datasets by id (``load_dataset(..., streaming=True)``; a local dataset dir
works too) and/or ``s3://``/local prefixes of ``.jsonl`` (``.json``), ``.parquet`` and ``.txt``
files. A ``.txt`` file is one document; with ``CPT_TXT_SPLIT=paragraph`` every
blank-line-separated paragraph is one document.

Shard assignment (disjoint and complete, deterministic from the file listing):

* Files of all ``uri`` sources are listed and sorted. With at least as many files as shards,
  each file is one unit; otherwise each file is cut into ``k = ceil(N / files)`` units by row
  index modulo ``k`` (unit ``j`` holds rows ``r`` with ``r % k == j``), so small corpora
  still spread over all shards. Units go to shards greedily by estimated size (largest
  first, to the least loaded shard; ties by unit order), so shards get similar work.
* HF datasets use ``datasets.distributed.split_dataset_by_node(rank=i, world_size=N)``:
  whole data files per shard when their count divides ``N``, rows modulo ``N`` otherwise.

Packing (``concat``): each document becomes ``ids(text)`` (no special tokens) followed by
EOS; a shard's documents, in order, are concatenated and cut into ``block_size`` blocks.
``labels = input_ids`` (the model shifts), ``attention_mask`` is all ones. The remainder
carries over from document to document within the shard; the final partial block of each
shard is dropped (counted as ``droppedTokens`` in the shard's done file), so at most
``block_size - 1`` tokens are lost per shard and no block is padded.

Held-out: a document is held out when ``blake2b(seed, text)`` mapped to [0, 1) is below
``held_out_fraction``: deterministic, independent of sharding and order. Held-out documents
are packed the same way into ``heldout-XXXXX-of-YYYYY/``.

Output (``output_uri``): ``shard-XXXXX-of-YYYYY/`` (HF ``save_to_disk``, read with
``load_from_disk``), optional ``heldout-…/``, then ``shard-….done.json`` (counts and the
config hash), and finally ``manifest.json`` written by whichever shard completes the set.
Data is staged in a local temp dir and uploaded before the done file, so a partial shard is
never visible as complete. A rerun with the same config hash skips finished shards and
re-checks the manifest; any different config hash in the output fails with a clear error.

Tokenizer (``tokenizer_uri``): a local dir, an ``s3://`` dir (downloaded to a temp dir) or
``hf://org/name[@rev]`` (tokenizer files via ``huggingface_hub.snapshot_download``,
``HF_TOKEN`` from the env). ``tokenizer.json`` is loaded with the ``tokenizers`` library and EOS
read from ``tokenizer_config.json``/``special_tokens_map.json`` (no transformers/torch import);
slow-only tokenizers are converted with ``AutoTokenizer``. The Rust tokenizer encodes batches
(``encode_batch_fast``); ``workers > 1`` runs that many spawned processes with one tokenizer
each (one Rayon thread per process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt_training.config import DataSource, TokenizeStage
from cpt_training.storage import Storage, open_storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "cpt-tokens/v1"
DOC_BATCH = 1024
"""Documents per encode_batch call (and per worker task)."""
FLUSH_BLOCKS = 2048
"""Blocks per Arrow record batch written."""
_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}


class TokenizeError(RuntimeError):
    """The tokenize stage cannot proceed; the message says why and what to change."""


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}"


def heldout_name(i: int, n: int) -> str:
    return f"heldout-{i:05d}-of-{n:05d}"


def done_name(i: int, n: int) -> str:
    return f"{shard_name(i, n)}.done.json"


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedTokenizer:
    """The Rust tokenizer as JSON (cheap to ship to workers), its EOS id and a digest."""

    spec: str
    eos_id: int
    vocab_size: int
    digest: str

    def rust(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.spec)


_HF_RE = re.compile(r"^hf://(?P<repo>[^@]+?)(?:@(?P<rev>.+))?$")
_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
]


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _eos_from_files(local: Path, rust: Any) -> int | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = local / name
        if not p.is_file():
            continue
        content = _token_content(json.loads(p.read_text()).get("eos_token"))
        if content is not None:
            tid = rust.token_to_id(content)
            if tid is not None:
                return int(tid)
    return None


def _from_local_dir(local: Path, where: str) -> tuple[Any, int | None]:
    """(Rust tokenizer, eos id) of a tokenizer dir. ``tokenizer.json`` is read with the
    ``tokenizers`` library directly (no transformers/torch import); a slow-only tokenizer
    (e.g. sentencepiece ``tokenizer.model``) is converted by transformers."""
    if (local / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        rust = Tokenizer.from_file(str(local / "tokenizer.json"))
        return rust, _eos_from_files(local, rust)
    if not any((local / n).is_file() for n in _TOKENIZER_FILES):
        raise TokenizeError(f"tokenizerUri {where!r} is not a directory with tokenizer files")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(local))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizeError(f"tokenizerUri {where!r} has no fast (Rust) tokenizer")
    return backend, tok.eos_token_id


def load_tokenizer(tokenizer_uri: str) -> LoadedTokenizer:
    """Resolve ``tokenizer_uri`` (local dir, ``s3://`` dir, ``hf://org/name[@rev]``) to a
    fast tokenizer with an EOS token."""
    with tempfile.TemporaryDirectory(prefix="cpt-tok-") as tmp:
        m = _HF_RE.match(tokenizer_uri)
        if m:
            from huggingface_hub import snapshot_download

            local = Path(
                snapshot_download(
                    m["repo"],
                    revision=m["rev"],
                    allow_patterns=_TOKENIZER_FILES,
                    token=os.environ.get("HF_TOKEN") or None,
                    local_dir=tmp,
                )
            )
        else:
            st = open_storage(tokenizer_uri)
            found = st.local_path()
            if found is None:
                st.download_dir("", tmp)
                found = Path(tmp)
            local = found
        if not local.is_dir():
            raise TokenizeError(
                f"tokenizerUri {tokenizer_uri!r} is not a directory with tokenizer files"
            )
        rust, eos = _from_local_dir(local, tokenizer_uri)
    if eos is None:
        raise TokenizeError(f"tokenizerUri {tokenizer_uri!r} defines no eos_token")
    spec = rust.to_str()
    return LoadedTokenizer(
        spec=spec,
        eos_id=int(eos),
        vocab_size=int(rust.get_vocab_size(with_added_tokens=True)),
        digest=hashlib.sha256(spec.encode()).hexdigest(),
    )


# ---------------------------------------------------------------------------------------------
# Config hash, shard plan
# ---------------------------------------------------------------------------------------------


def config_hash(cfg: TokenizeStage, tokenizer_digest: str) -> str:
    """Hash of everything that changes the output bytes: not the shard index, workers or
    output; the tokenizer by the digest of its content, not by where it was loaded from."""
    relevant = cfg.model_dump(
        mode="json",
        exclude={"shard_index", "workers", "output_uri", "stage", "tokenizer_uri"},
    )
    relevant["tokenizer"] = tokenizer_digest
    relevant["format"] = FORMAT
    relevant["txtSplit"] = _txt_split()
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _txt_split() -> str:
    mode = os.environ.get("CPT_TXT_SPLIT", "file")
    if mode not in ("file", "paragraph"):
        raise TokenizeError(f"CPT_TXT_SPLIT must be one of file, paragraph, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Unit:
    """A slice of one input file: rows ``r`` with ``r % pieces == piece``."""

    source: int
    uri: str
    format: str
    size: int
    piece: int = 0
    pieces: int = 1


def _source_files(idx: int, src: DataSource) -> list[Unit]:
    assert src.uri is not None
    st = open_storage(src.uri)
    sizes = {"": st.size("")} if st.is_file("") else st.list_sizes()
    units: list[Unit] = []
    for rel in sorted(sizes):
        name = Path(rel or st.uri).name
        suffix = Path(name).suffix.lower()
        if src.format == "auto":
            if suffix not in _EXT_FORMAT:
                continue  # READMEs, _SUCCESS, ...
            fmt = _EXT_FORMAT[suffix]
        else:
            if name.startswith((".", "_")):
                continue
            fmt = src.format
        units.append(Unit(idx, st.join(rel) if rel else st.uri, fmt, sizes[rel]))
    if not units:
        raise TokenizeError(
            f"sources[{idx}].uri {src.uri!r} has no .jsonl, .json, .parquet or .txt files"
        )
    return units


def plan_shards(cfg: TokenizeStage) -> list[list[Unit]]:
    """The units of every shard (uri sources only; HF sources are split by datasets)."""
    files: list[Unit] = []
    for i, src in enumerate(cfg.sources):
        if src.uri is not None:
            files.extend(_source_files(i, src))
    n = cfg.num_shards
    pieces = 1 if len(files) >= n or not files else math.ceil(n / len(files))
    units = [
        Unit(f.source, f.uri, f.format, f.size, j, pieces) for f in files for j in range(pieces)
    ]
    loads = [0.0] * n
    plan: list[list[Unit]] = [[] for _ in range(n)]
    order = sorted(range(len(units)), key=lambda u: (-units[u].size / units[u].pieces, u))
    for u in order:
        target = min(range(n), key=lambda s: (loads[s], s))
        plan[target].append(units[u])
        loads[target] += units[u].size / units[u].pieces + 1
    for p in plan:
        p.sort(key=lambda u: (u.source, u.uri, u.piece))
    return plan


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def _local_copy(uri: str, tmp: Path) -> Path:
    st = open_storage(uri)
    local = st.local_path()
    if local is not None:
        return local
    dst = tmp / hashlib.sha1(uri.encode()).hexdigest()
    parent = open_storage(uri.rsplit("/", 1)[0])
    parent.download_file(uri.rsplit("/", 1)[1], dst)
    return dst


def _column_texts(table: Any, field: str, where: str) -> list[str]:
    if field not in table.column_names:
        raise TokenizeError(
            f"{where} has no field {field!r} (textField); fields: {sorted(table.column_names)}"
        )
    return [t for t in table.column(field).to_pylist() if isinstance(t, str) and t]


def _read_unit(unit: Unit, field: str, tmp: Path) -> Iterator[list[str]]:
    """Batches of document texts of one unit, in file order."""
    import pyarrow as pa

    path = _local_copy(unit.uri, tmp)
    try:
        if unit.format == "txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            if _txt_split() == "paragraph":
                docs = [p.strip() for p in re.split(r"\n\s*\n", text)]
            else:
                docs = [text.strip()]
            docs = [d for d in docs if d]
            yield docs[unit.piece :: unit.pieces]
            return
        if unit.format == "jsonl":
            import pyarrow.json as pj

            try:
                table = pj.read_json(
                    path, read_options=pj.ReadOptions(block_size=16 << 20, use_threads=True)
                )
            except pa.ArrowInvalid as exc:
                raise TokenizeError(f"{unit.uri}: not valid JSON lines: {exc}") from exc
            if unit.pieces > 1:
                table = table.take(np.arange(unit.piece, table.num_rows, unit.pieces))
            texts = _column_texts(table, field, unit.uri)
            for i in range(0, len(texts), DOC_BATCH):
                yield texts[i : i + DOC_BATCH]
            return
        if unit.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if field not in pf.schema_arrow.names:
                raise TokenizeError(
                    f"{unit.uri} has no field {field!r} (textField); "
                    f"fields: {sorted(pf.schema_arrow.names)}"
                )
            row0 = 0
            for rb in pf.iter_batches(batch_size=DOC_BATCH, columns=[field]):
                if unit.pieces > 1:
                    first = (unit.piece - row0) % unit.pieces
                    idx = np.arange(first, rb.num_rows, unit.pieces)
                    row0 += rb.num_rows
                    rb = rb.take(pa.array(idx))
                yield _column_texts(pa.Table.from_batches([rb]), field, unit.uri)
            return
        raise TokenizeError(f"unsupported format {unit.format!r} for {unit.uri}")
    finally:
        if open_storage(unit.uri).local_path() is None:
            path.unlink(missing_ok=True)


def _read_hf(src: DataSource, field: str, shard: int, shards: int) -> Iterator[list[str]]:
    import datasets
    from datasets.distributed import split_dataset_by_node

    assert src.hf_dataset is not None
    ds = datasets.load_dataset(
        src.hf_dataset,
        src.hf_config,
        split=src.split,
        revision=src.revision,
        streaming=True,
        token=os.environ.get("HF_TOKEN") or None,
    )
    ds = split_dataset_by_node(ds, rank=shard, world_size=shards)
    for batch in ds.iter(batch_size=DOC_BATCH):
        if field not in batch:
            raise TokenizeError(
                f"dataset {src.hf_dataset!r} has no field {field!r} (textField); "
                f"fields: {sorted(batch)}"
            )
        yield [t for t in batch[field] if isinstance(t, str) and t]


def shard_documents(cfg: TokenizeStage, shard: int, tmp: Path | None = None) -> Iterator[list[str]]:
    """Batches of this shard's documents in their packing order: HF sources first (in source
    order), then the planned file units."""
    own_tmp = tmp is None
    tmp_dir = Path(tempfile.mkdtemp(prefix="cpt-read-")) if tmp is None else tmp
    try:
        for src in cfg.sources:
            if src.hf_dataset is not None:
                yield from _read_hf(src, cfg.text_field, shard, cfg.num_shards)
        for unit in plan_shards(cfg)[shard]:
            yield from _read_unit(unit, cfg.text_field, tmp_dir)
    finally:
        if own_tmp:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def is_held_out(texts: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: which documents go to the held-out split (hash of seed + text)."""
    if fraction <= 0:
        return np.zeros(len(texts), dtype=bool)
    key = str(seed).encode()
    h = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8, key=key).digest(), "big")
            for t in texts
        ),
        dtype=np.uint64,
        count=len(texts),
    )
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


# ---------------------------------------------------------------------------------------------
# Encoding (optionally in worker processes)
# ---------------------------------------------------------------------------------------------

_WORKER_TOK: Any = None
_WORKER_EOS = 0

_BYTE_LEVEL_SPLIT = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
"""The split of ``pre_tokenizers.ByteLevel(use_regex=True)`` (GPT-2's)."""
PIECE_CACHE_ENTRIES = 1 << 20
"""Pieces cached per process before the cache starts over (bounded memory on huge corpora)."""


class PieceCache:
    """Encodes documents through a cache from pre-tokenized pieces to their ids, in front of
    the Rust tokenizer: about twice its speed per core on English text (docs/PERFORMANCE.md,
    tokenization), because a corpus repeats its words and the encoder's per-document work
    (encodings, offsets, Python objects) is skipped.

    Exact only where the encoder handles every piece on its own anyway: BPE without dropout
    behind the plain byte-level pre-tokenizer (GPT-2's split, no prefix space) and no
    normalizer, as for the tokenizers cpt trains. :meth:`wrap` returns the Rust tokenizer
    unchanged for any other. A document holding an added token's text (``</s>`` ...) goes to
    the Rust tokenizer whole. Samples (``SELF_CHECK_DOCS``) are compared with the Rust
    tokenizer's ids; on any difference the cache switches itself off (logged)."""

    SELF_CHECK_DOCS = 64
    """Documents of the first batch encoded directly too and compared (then 8 documents of
    every 256th batch: a rare character the two splits treat differently is caught too)."""

    def __init__(self, rust: Any, split: Any, added: Any) -> None:
        self.rust = rust
        self._batch = getattr(rust, "encode_batch_fast", None) or rust.encode_batch
        self._split = split.findall
        self._added = added
        self.ids: dict[str, list[int]] = {}
        self.enabled = True
        self._calls = 0

    @classmethod
    def wrap(cls, rust: Any) -> Any:
        try:
            import regex  # type: ignore[import-untyped]
        except ImportError:
            return rust
        spec = json.loads(rust.to_str())
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
        added = [str(t["content"]) for t in spec.get("added_tokens") or [] if t.get("content")]
        added_re = regex.compile("|".join(map(regex.escape, added))) if added else None
        return cls(rust, regex.compile(_BYTE_LEVEL_SPLIT), added_re)

    def _direct(self, texts: list[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._batch(texts, add_special_tokens=False)]

    def _cached(self, texts: list[str]) -> list[list[int]]:
        """Split every document and join its pieces' cached ids; the batch's unseen pieces are
        encoded in one Rust call first. The per-piece work stays in C (``map``, set
        difference): a Python loop over pieces would cost as much as the encoder saves."""
        from itertools import chain

        cache = self.ids
        if len(cache) > PIECE_CACHE_ENTRIES:
            cache.clear()
        get = cache.get
        split = self._split
        out: list[list[int] | None] = []
        pending: list[tuple[int, list[str]]] = []
        whole: list[int] = []
        miss: set[str] = set()
        for i, text in enumerate(texts):
            if self._added is not None and self._added.search(text):
                out.append(None)  # holds an added token's text: the Rust tokenizer, whole
                whole.append(i)
                continue
            pieces = split(text)
            found: list[Any] = list(map(get, pieces))
            if None in found:
                out.append(None)
                pending.append((i, pieces))
                miss.update(set(pieces).difference(cache))
            else:
                out.append(list(chain.from_iterable(found)))
        if miss:
            keys = list(miss)
            for piece, enc in zip(keys, self._batch(keys, add_special_tokens=False), strict=True):
                cache[piece] = enc.ids
        ids = cache.__getitem__
        for i, pieces in pending:
            out[i] = list(chain.from_iterable(map(ids, pieces)))
        for i, doc in zip(whole, self._direct([texts[i] for i in whole]), strict=True):
            out[i] = doc
        return [doc if doc is not None else [] for doc in out]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each document (no special tokens added)."""
        if not self.enabled:
            return self._direct(texts)
        out = self._cached(texts)
        self._calls += 1
        n = self.SELF_CHECK_DOCS if self._calls == 1 else 8 if self._calls % 256 == 0 else 0
        if n and out[:n] != self._direct(texts[:n]):
            log.warning("piece cache disabled: it differs from the tokenizer on this input")
            self.enabled = False
            self.ids.clear()
            return self._direct(texts)
        return out


def _encode(tok: Any, eos: int, texts: list[str]) -> np.ndarray:
    """Token ids of documents, each followed by EOS, as one flat uint32 array."""
    if not texts:
        return np.zeros(0, dtype=np.uint32)
    if isinstance(tok, PieceCache):
        flat: list[int] = []
        for doc in tok.encode(texts):
            flat.extend(doc)
            flat.append(eos)
        return np.array(flat, dtype=np.uint32)
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    encs = encode(texts, add_special_tokens=False)
    eos_arr = np.array([eos], dtype=np.uint32)
    parts: list[np.ndarray] = []
    for e in encs:  # per document; the per-token work happens in C
        parts.append(np.asarray(e.ids, dtype=np.uint32))
        parts.append(eos_arr)
    return np.concatenate(parts)


def _worker_init(spec: str, eos: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOK, _WORKER_EOS
    from tokenizers import Tokenizer

    _WORKER_TOK = PieceCache.wrap(Tokenizer.from_str(spec))
    _WORKER_EOS = eos


def _worker_encode(texts: list[str]) -> np.ndarray:
    return _encode(_WORKER_TOK, _WORKER_EOS, texts)


# ---------------------------------------------------------------------------------------------
# Packing + Arrow writing
# ---------------------------------------------------------------------------------------------


class BlockWriter:
    """Packs a token stream into ``block_size`` blocks and streams them to an Arrow file; the
    remainder carries over between ``add`` calls and the final partial block is dropped."""

    def __init__(self, path: Path, block_size: int) -> None:
        import pyarrow as pa

        self.pa = pa
        self.path = path
        self.block = block_size
        self.schema = pa.schema(
            [
                ("input_ids", pa.list_(pa.int32(), block_size)),
                ("labels", pa.list_(pa.int32(), block_size)),
                ("attention_mask", pa.list_(pa.int8(), block_size)),
            ]
        )
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._carry = np.zeros(0, dtype=np.uint32)
        self._pending: list[np.ndarray] = []
        self._pending_blocks = 0
        self.blocks = 0
        self.tokens_in = 0
        self.docs = 0

    def add(self, ids: np.ndarray, docs: int) -> None:
        self.tokens_in += int(ids.shape[0])
        self.docs += docs
        buf = np.concatenate([self._carry, ids]) if self._carry.size else ids
        full = buf.shape[0] // self.block
        if full:
            self._pending.append(buf[: full * self.block].reshape(full, self.block))
            self._pending_blocks += full
        self._carry = buf[full * self.block :].copy()
        if self._pending_blocks >= FLUSH_BLOCKS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pa = self.pa
        arr = np.concatenate(self._pending).astype(np.int32, copy=False)
        flat = pa.array(arr.reshape(-1), type=pa.int32())
        ids = pa.FixedSizeListArray.from_arrays(flat, self.block)
        mask = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ones(arr.size, dtype=np.int8), type=pa.int8()), self.block
        )
        self._writer.write_batch(pa.record_batch([ids, ids, mask], schema=self.schema))
        self.blocks += arr.shape[0]
        self._pending, self._pending_blocks = [], 0

    def close(self) -> int:
        """Flush, close; returns the dropped remainder (tokens)."""
        self._flush()
        self._writer.close()
        self._sink.close()
        return int(self._carry.shape[0])


def _save_dataset(arrow_path: Path, out_dir: Path) -> None:
    import datasets

    datasets.disable_progress_bars()  # one line per shard in our own log is enough
    ds = datasets.Dataset.from_file(str(arrow_path))
    num_shards = max(1, math.ceil(arrow_path.stat().st_size / (512 << 20)))
    ds.save_to_disk(str(out_dir), num_shards=num_shards)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardResult:
    shard: int
    num_shards: int
    config_hash: str
    docs: int
    tokens: int
    blocks: int
    dropped_tokens: int
    heldout_docs: int
    heldout_tokens: int
    heldout_blocks: int
    block_size: int
    seconds: float
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("skipped")
        return {
            "format": FORMAT,
            "shard": d["shard"],
            "numShards": d["num_shards"],
            "configHash": d["config_hash"],
            "docs": d["docs"],
            "tokens": d["tokens"],
            "blocks": d["blocks"],
            "droppedTokens": d["dropped_tokens"],
            "heldoutDocs": d["heldout_docs"],
            "heldoutTokens": d["heldout_tokens"],
            "heldoutBlocks": d["heldout_blocks"],
            "blockSize": d["block_size"],
            "seconds": round(d["seconds"], 3),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardResult:
        return cls(
            shard=int(d["shard"]),
            num_shards=int(d["numShards"]),
            config_hash=str(d["configHash"]),
            docs=int(d["docs"]),
            tokens=int(d["tokens"]),
            blocks=int(d["blocks"]),
            dropped_tokens=int(d["droppedTokens"]),
            heldout_docs=int(d["heldoutDocs"]),
            heldout_tokens=int(d["heldoutTokens"]),
            heldout_blocks=int(d["heldoutBlocks"]),
            block_size=int(d["blockSize"]),
            seconds=float(d.get("seconds", 0.0)),
        )


def _check_existing(out: Storage, chash: str) -> None:
    """Fail before any work if the output holds data from a different config."""
    try:
        manifest = out.read_json(MANIFEST)
    except FileNotFoundError:
        manifest = None
    found: list[tuple[str, str]] = []
    if manifest is not None:
        found.append((MANIFEST, str(manifest.get("configHash"))))
    for key in out.list_sizes():
        if key.endswith(".done.json") and "/" not in key:
            found.append((key, str(out.read_json(key).get("configHash"))))
    bad = [(k, h) for k, h in found if h != chash]
    if bad:
        k, h = bad[0]
        raise TokenizeError(
            f"outputUri {out.uri} already holds data tokenized with a different config "
            f"({k}: configHash {h}, this run: {chash}). Use a new outputUri or delete the old "
            "data; nothing was changed."
        )


def _tokenize_shard(
    cfg: TokenizeStage, tok: LoadedTokenizer, shard: int, chash: str, stage: Path
) -> ShardResult:
    t0 = time.monotonic()
    n = cfg.num_shards
    train = BlockWriter(stage / "train.arrow", cfg.block_size)
    held = BlockWriter(stage / "heldout.arrow", cfg.block_size)
    pool = None
    if cfg.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(
            cfg.workers, initializer=_worker_init, initargs=(tok.spec, tok.eos_id)
        )
    rust = PieceCache.wrap(tok.rust())
    try:
        batches = shard_documents(cfg, shard, stage)
        if cfg.held_out_fraction > 0:
            split = _split_batches(batches, cfg.held_out_fraction, cfg.seed)
        else:
            split = ((b, False) for b in batches)
        jobs: Iterable[tuple[list[str], bool]] = split
        encoded: Iterable[tuple[np.ndarray, int, bool]]
        if pool is not None:
            encoded = _pooled(pool, jobs, cfg.workers)
        else:
            encoded = ((_encode(rust, tok.eos_id, texts), len(texts), h) for texts, h in jobs)
        for ids, ndocs, heldout in encoded:
            (held if heldout else train).add(ids, ndocs)
    finally:
        if pool is not None:
            pool.terminate()
    dropped = train.close()
    held.close()
    _save_dataset(stage / "train.arrow", stage / shard_name(shard, n))
    if cfg.held_out_fraction > 0:
        _save_dataset(stage / "heldout.arrow", stage / heldout_name(shard, n))
    return ShardResult(
        shard=shard,
        num_shards=n,
        config_hash=chash,
        docs=train.docs,
        tokens=train.blocks * cfg.block_size,
        blocks=train.blocks,
        dropped_tokens=dropped,
        heldout_docs=held.docs,
        heldout_tokens=held.blocks * cfg.block_size,
        heldout_blocks=held.blocks,
        block_size=cfg.block_size,
        seconds=time.monotonic() - t0,
    )


def _split_batches(
    batches: Iterable[list[str]], fraction: float, seed: int
) -> Iterator[tuple[list[str], bool]]:
    for texts in batches:
        mask = is_held_out(texts, fraction, seed)
        if mask.any():
            yield [t for t, m in zip(texts, mask, strict=True) if m], True
        if not mask.all():
            yield [t for t, m in zip(texts, mask, strict=True) if not m], False


def _pooled(
    pool: Any, jobs: Iterable[tuple[list[str], bool]], workers: int
) -> Iterator[tuple[np.ndarray, int, bool]]:
    """Encode in the pool, keeping order, with a bounded number of batches in flight."""
    from collections import deque

    inflight: deque[tuple[Any, int, bool]] = deque()
    for texts, heldout in jobs:
        inflight.append((pool.apply_async(_worker_encode, (texts,)), len(texts), heldout))
        if len(inflight) >= 2 * workers:
            res, nd, h = inflight.popleft()
            yield res.get(), nd, h
    while inflight:
        res, nd, h = inflight.popleft()
        yield res.get(), nd, h


def _maybe_write_manifest(out: Storage, cfg: TokenizeStage, chash: str) -> dict[str, Any] | None:
    """Write (or re-check) ``manifest.json`` once every shard's done file exists."""
    n = cfg.num_shards
    results: list[ShardResult] = []
    for i in range(n):
        try:
            results.append(ShardResult.from_json(out.read_json(done_name(i, n))))
        except FileNotFoundError:
            return None
    for r in results:
        if r.config_hash != chash:
            raise TokenizeError(
                f"{out.join(done_name(r.shard, n))} has configHash {r.config_hash}, expected "
                f"{chash}; delete the output or use a new outputUri"
            )
    manifest = {
        "format": FORMAT,
        "configHash": chash,
        "blockSize": cfg.block_size,
        "numShards": n,
        "columns": ["input_ids", "labels", "attention_mask"],
        "totalTokens": sum(r.tokens for r in results),
        "totalBlocks": sum(r.blocks for r in results),
        "totalDocs": sum(r.docs for r in results),
        "droppedTokens": sum(r.dropped_tokens for r in results),
        "heldoutTokens": sum(r.heldout_tokens for r in results),
        "heldoutBlocks": sum(r.heldout_blocks for r in results),
        "heldoutDocs": sum(r.heldout_docs for r in results),
        "shards": [
            {"name": shard_name(r.shard, n), "blocks": r.blocks, "tokens": r.tokens}
            for r in results
        ],
        "heldoutShards": [
            {"name": heldout_name(r.shard, n), "blocks": r.heldout_blocks}
            for r in results
            if cfg.held_out_fraction > 0
        ],
    }
    try:
        existing = out.read_json(MANIFEST)
    except FileNotFoundError:
        existing = None
    if existing != manifest:
        if existing is not None:
            log.warning("rewriting %s: it did not match the shard done files", out.join(MANIFEST))
        out.write_json(MANIFEST, manifest)
        log.info(
            "wrote %s: %d blocks, %d tokens",
            out.join(MANIFEST),
            manifest["totalBlocks"],
            manifest["totalTokens"],
        )
    return manifest


def run_tokenize(cfg: TokenizeStage) -> ShardResult:
    """Run shard ``cfg.resolved_shard_index()`` of the tokenize stage (idempotent)."""
    shard = cfg.resolved_shard_index()
    n = cfg.num_shards
    if not 0 <= shard < n:
        raise TokenizeError(f"shardIndex {shard} is out of range for numShards {n} (0..{n - 1})")
    tok = load_tokenizer(cfg.tokenizer_uri)
    chash = config_hash(cfg, tok.digest)
    out = open_storage(cfg.output_uri)
    _check_existing(out, chash)
    try:
        prev = ShardResult.from_json(out.read_json(done_name(shard, n)))
    except FileNotFoundError:
        prev = None
    if prev is not None:
        log.info("shard %d of %d already done (configHash %s): skipping", shard, n, chash)
        prev.skipped = True
        _maybe_write_manifest(out, cfg, chash)
        return prev
    # Leftovers of a killed earlier run of this shard are not visible (no done file): clear.
    out.delete_prefix(shard_name(shard, n))
    out.delete_prefix(heldout_name(shard, n))
    with tempfile.TemporaryDirectory(prefix=f"cpt-tokenize-{shard}-") as tmp:
        stage = Path(tmp)
        result = _tokenize_shard(cfg, tok, shard, chash, stage)
        for name in (shard_name(shard, n), heldout_name(shard, n)):
            if (stage / name).is_dir():
                out.upload_dir(stage / name, name)
    out.write_json(done_name(shard, n), result.to_json())
    log.info(
        "shard %d of %d: %d docs, %d blocks (%d tokens, %d dropped) in %.1fs",
        shard,
        n,
        result.docs,
        result.blocks,
        result.tokens,
        result.dropped_tokens,
        result.seconds,
    )
    _maybe_write_manifest(out, cfg, chash)
    return result
