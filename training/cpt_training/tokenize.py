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

Output (``output_uri``): ``shard-XXXXX-of-YYYYY/`` (the HF ``save_to_disk`` layout, written
with pyarrow; read with ``load_from_disk``), optional ``heldout-…/``, then
``shard-….done.json`` (counts and the config hash), and finally ``manifest.json`` written by
whichever shard completes the set.
Data is staged in a local temp dir and uploaded before the done file, so a partial shard is
never visible as complete. A rerun with the same config hash skips finished shards and
re-checks the manifest; any different config hash in the output fails with a clear error.

Tokenizer (``tokenizer_uri``): a local dir, an ``s3://`` dir (downloaded to a temp dir) or
``hf://org/name[@rev]`` (tokenizer files via ``huggingface_hub.snapshot_download``,
``HF_TOKEN`` from the env). ``tokenizer.json`` is loaded with the ``tokenizers`` library and EOS
read from ``tokenizer_config.json``/``special_tokens_map.json`` (no transformers/torch import);
slow-only tokenizers are converted with ``AutoTokenizer``. Byte-level BPE tokenizers encode
through :class:`PieceCache` (the same ids, a fraction of the cost), others through the Rust
``encode_batch_fast``. The shard's work is a list of tasks (jsonl files in ``TASK_BYTES``
line-aligned slices) that read, split off held-out documents and encode by themselves;
with ``workers > 1`` a pool of ``workers`` processes (one Rayon thread each) runs them, and the
main process only packs the returned ids in task order and writes the blocks. A local output
is staged in a hidden dir inside it and renamed into place; others are uploaded.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cpt_training.config import (
    PARQUET_CONVERSION,
    ConfigError,
    DataSource,
    TokenizeStage,
    source_name,
)
from cpt_training.piece_cache import PieceCache, flat_ids
from cpt_training.storage import TMP_MARKER, Storage, open_storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "cpt-tokens/v2"
"""v2: a block never spans two sources (each source's remainder in a shard is dropped), and
the manifest records the blocks of every source (``sources``, ``shards[].runs``)."""
DOC_BATCH = 1024
"""Documents per encode_batch call (and per worker task)."""
FLUSH_BLOCKS = 2048
"""Blocks per Arrow record batch written."""
FILE_BYTES = 512 << 20
"""Bytes per Arrow file of a shard's dataset dir at most (as ``save_to_disk`` would cut)."""
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
    loaded: Any = field(default=None, compare=False, repr=False)
    """The Rust tokenizer :func:`load_tokenizer` already parsed (a 32k vocabulary's JSON
    takes about 50 ms to parse, once per process is enough)."""

    def rust(self) -> Any:
        if self.loaded is not None:
            return self.loaded
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
        loaded=rust,
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
    for src in relevant["sources"]:
        if src.get("data_files") is None:  # added later: unset keeps earlier hashes valid
            src.pop("data_files", None)
        # Training's sampling, not the tokens: a new weight or name needs no new tokenization.
        src.pop("weight", None)
        src.pop("role", None)
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
    path = _local_copy(unit.uri, tmp)
    try:
        yield from _read_local(unit, path, field)
    finally:
        if open_storage(unit.uri).local_path() is None:
            path.unlink(missing_ok=True)


def _read_local(
    unit: Unit, path: Path, field: str, span: tuple[int, int] | None = None, threads: bool = True
) -> Iterator[list[str]]:
    """Batches of document texts of ``unit`` read from its local copy ``path``; ``span``: only
    the jsonl lines in that byte range (cut at line starts by :func:`_jsonl_spans`)."""
    import pyarrow as pa

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

        source: Any = path
        if span is not None:
            with open(path, "rb") as f:
                f.seek(span[0])
                source = pa.BufferReader(f.read(span[1] - span[0]))
        try:
            table = pj.read_json(
                source, read_options=pj.ReadOptions(block_size=16 << 20, use_threads=threads)
            )
        except pa.ArrowInvalid as exc:
            raise TokenizeError(f"{unit.uri}: not valid JSON lines: {exc}") from exc
        if unit.pieces > 1:
            table = table.take(np.arange(unit.piece, table.num_rows, unit.pieces))
        if span is not None and span[0] > 0 and field not in table.column_names:
            return  # no row of this slice has the field (the file's first slice would say so)
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


TASK_BYTES = 2 << 20
"""Bytes of jsonl per task: a worker reads and encodes its own slice of a file."""


def _jsonl_spans(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of about ``TASK_BYTES`` covering the file, each starting at a line start."""
    size = TASK_BYTES
    total = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + size < total:
            f.seek(cuts[-1] + size)
            f.readline()
            if f.tell() >= total:
                break
            cuts.append(f.tell())
    return list(zip(cuts, [*cuts[1:], total], strict=True))


SCRIPT_ERROR = re.compile(r"Dataset scripts are no longer supported, but found (\S+)")


def script_source_error(idx: int, src: DataSource, script: str) -> ConfigError:
    """The error for a source that only a loading script could read (``datasets`` >= 4 runs
    none): names the field and the two fixes."""
    return ConfigError(
        f"spec.data.sources[{idx}].hfDataset {src.hf_dataset!r} is a loading-script dataset "
        f"({script}), and datasets 4+ cannot run loading scripts. Read the Hub's Parquet "
        f"conversion instead: set revision: {PARQUET_CONVERSION} with hfConfig (e.g. raw_en), "
        "or list the files to read in dataFiles"
    )


def _load_hf(idx: int, src: DataSource) -> Any:
    """``datasets.load_dataset`` (streaming) for one source: data files of the Parquet
    conversion or ``dataFiles`` when given (then no config name: the files are the split)."""
    import datasets

    files = src.hf_data_files()
    try:
        return datasets.load_dataset(
            src.hf_dataset,
            None if files is not None else src.hf_config,
            data_files=files,
            split=src.split,
            revision=src.revision,
            streaming=True,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except RuntimeError as exc:
        m = SCRIPT_ERROR.search(str(exc))
        if m is None:
            raise
        raise script_source_error(idx, src, m.group(1)) from None


def _read_hf(idx: int, src: DataSource, field: str, shard: int, shards: int) -> Iterator[list[str]]:
    from datasets.distributed import split_dataset_by_node

    assert src.hf_dataset is not None
    ds = split_dataset_by_node(_load_hf(idx, src), rank=shard, world_size=shards)
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
        for i, src in enumerate(cfg.sources):
            if src.hf_dataset is not None:
                yield from _read_hf(i, src, cfg.text_field, shard, cfg.num_shards)
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
_WORKER_OPTS: Any = None


def _encode(tok: Any, eos: int, texts: list[str]) -> np.ndarray:
    """Token ids of documents, each followed by EOS, as one flat int32 array."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    if isinstance(tok, PieceCache):
        return tok.encode_flat(texts, eos)
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    encs = encode(texts, add_special_tokens=False)
    # per document; the per-token work happens in C
    return flat_ids([np.asarray(e.ids, dtype=np.int32) for e in encs], eos)


@dataclass(frozen=True)
class _Task:
    """One piece of a shard's work, done by any process: a local file unit (``span``: a byte
    range of a jsonl file) or documents already read (HF sources)."""

    unit: Unit | None = None
    source: int = 0
    path: str = ""
    span: tuple[int, int] | None = None
    texts: list[str] | None = None
    cleanup: str = ""
    """A downloaded copy to delete once this task (the unit's last) is consumed."""


@dataclass(frozen=True)
class _Opts:
    field: str
    held_out_fraction: float
    seed: int
    threads: bool


def _worker_init(spec: str | None, eos: int, opts: _Opts) -> None:
    """``spec`` None: forked, the encoder the parent set up before the fork is used."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOK, _WORKER_EOS, _WORKER_OPTS
    if spec is not None:
        from tokenizers import Tokenizer

        _WORKER_TOK = PieceCache.wrap(Tokenizer.from_str(spec), spec)
    _WORKER_EOS = eos
    _WORKER_OPTS = opts


def _worker_run(task: _Task) -> tuple[np.ndarray, int, np.ndarray, int]:
    return _run_task(_WORKER_TOK, _WORKER_EOS, _WORKER_OPTS, task)


def _run_task(
    tok: Any, eos: int, opts: _Opts, task: _Task
) -> tuple[np.ndarray, int, np.ndarray, int]:
    """Read the task's documents, split off the held-out ones, encode: (train ids, train
    docs, held-out ids, held-out docs), each document's ids followed by EOS."""
    if task.texts is not None:
        batches: Iterable[list[str]] = [task.texts]
    else:
        assert task.unit is not None
        batches = _read_local(task.unit, Path(task.path), opts.field, task.span, opts.threads)
    train: list[np.ndarray] = []
    held: list[np.ndarray] = []
    ntrain = nheld = 0
    for texts in batches:
        if opts.held_out_fraction > 0:
            mask = is_held_out(texts, opts.held_out_fraction, opts.seed)
            if mask.any():
                out = [t for t, m in zip(texts, mask, strict=True) if m]
                held.append(_encode(tok, eos, out))
                nheld += len(out)
            texts = [t for t, m in zip(texts, mask, strict=True) if not m]
        train.append(_encode(tok, eos, texts))
        ntrain += len(texts)
    empty = np.zeros(0, dtype=np.int32)
    return (
        np.concatenate(train) if train else empty,
        ntrain,
        np.concatenate(held) if held else empty,
        nheld,
    )


# ---------------------------------------------------------------------------------------------
# Packing + Arrow writing
# ---------------------------------------------------------------------------------------------


class BlockWriter:
    """Packs a token stream into ``block_size`` blocks and streams them into a dataset dir in
    the layout of HF ``save_to_disk`` (``data-XXXXX-of-YYYYY.arrow`` Arrow IPC streams of at
    most ``FILE_BYTES``, ``state.json``, ``dataset_info.json``), written directly rather than
    re-saved through ``datasets`` (an import of about a second and a copy of every byte).
    The remainder carries over between ``add`` calls and the final partial block is dropped."""

    def __init__(self, out_dir: Path, block_size: int, fingerprint: str) -> None:
        import pyarrow as pa

        self.pa = pa
        self.dir = out_dir
        self.block = block_size
        self.fingerprint = fingerprint
        self.features = {
            name: {"feature": {"dtype": dtype, "_type": "Value"}, "length": block_size}
            | {"_type": "List"}
            for name, dtype in (
                ("input_ids", "int32"),
                ("labels", "int32"),
                ("attention_mask", "int8"),
            )
        }
        self.schema = pa.schema(
            [
                ("input_ids", pa.list_(pa.int32(), block_size)),
                ("labels", pa.list_(pa.int32(), block_size)),
                ("attention_mask", pa.list_(pa.int8(), block_size)),
            ],
            metadata={"huggingface": json.dumps({"info": {"features": self.features}})},
        )
        self.file_blocks = max(1, FILE_BYTES // (9 * block_size))
        out_dir.mkdir(parents=True, exist_ok=True)
        self._files: list[Path] = []
        self._sink: Any = None
        self._writer: Any = None
        self._in_file = 0
        self._buf = np.empty(0, dtype=np.int32)
        """Tokens not yet written: the next record batch's blocks, then a partial block."""
        self._fill = 0
        self._ones = np.ones(0, dtype=np.int8)
        self.blocks = 0
        self.tokens_in = 0
        self.docs = 0
        self.dropped = 0
        self.runs: list[list[int]] = []
        """``[source, blocks]`` in stored order: the shard's blocks of each source."""
        self.source_docs: dict[int, int] = {}

    def start_source(self, source: int) -> None:
        """Blocks from here on are ``source``'s: the previous source's partial block is
        dropped (counted in ``dropped``), so no block mixes two sources."""
        if self.runs and self.runs[-1][0] == source:
            return
        self._flush()
        self._close_run()
        self.dropped += self._fill
        self._fill = 0
        self.runs.append([source, self.blocks])

    def _close_run(self) -> None:
        """Turn the open run's start offset into its block count."""
        if self.runs:
            self.runs[-1][1] = self.blocks - self.runs[-1][1]

    def add(self, ids: np.ndarray, docs: int) -> None:
        """Append ids: copied once, into the buffer the next record batch is written from (no
        concatenation per call, and no new array once the buffer has its size). A batch is
        written once ``FLUSH_BLOCKS`` full blocks are buffered: all of them, so the files are
        byte for byte those of the previous revision, which cut record batches there too."""
        self.tokens_in += int(ids.shape[0])
        self.docs += docs
        if self.runs:
            src = self.runs[-1][0]
            self.source_docs[src] = self.source_docs.get(src, 0) + docs
        end = self._fill + int(ids.shape[0])
        if end > self._buf.size:
            grown = np.empty(max(end, (FLUSH_BLOCKS + 1) * self.block), np.int32)
            grown[: self._fill] = self._buf[: self._fill]
            self._buf = grown
        self._buf[self._fill : end] = ids
        self._fill = end
        if self._fill // self.block >= FLUSH_BLOCKS:
            self._flush()

    def _open(self) -> None:
        path = self.dir / f".data-{len(self._files):05d}.arrow"
        self._files.append(path)
        self._sink = self.pa.OSFile(str(path), "wb")
        self._writer = self.pa.ipc.new_stream(self._sink, self.schema)
        self._in_file = 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def _flush(self) -> None:
        """Write the buffer's full blocks (the writer copies them out before returning) and
        move the partial block after them to the front."""
        pa = self.pa
        full = self._fill // self.block
        if not full:
            return
        arr = self._buf[: full * self.block].reshape(full, self.block)
        while arr.shape[0]:
            if self._writer is None or self._in_file >= self.file_blocks:
                self._close_file()
                self._open()
            room = self.file_blocks - self._in_file
            part, arr = arr[:room], arr[room:]
            if self._ones.size < part.size:
                self._ones = np.ones(part.size, dtype=np.int8)
            ids = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), self.block)
            mask = pa.FixedSizeListArray.from_arrays(pa.array(self._ones[: part.size]), self.block)
            self._writer.write_batch(pa.record_batch([ids, ids, mask], schema=self.schema))
            self._in_file += part.shape[0]
            self.blocks += part.shape[0]
        rest = self._fill - full * self.block
        self._buf[:rest] = self._buf[full * self.block : self._fill]
        self._fill = rest

    def close(self) -> int:
        """Flush, close, name the files and write the dataset's json files; returns the
        dropped remainders (tokens)."""
        self._flush()
        self._close_run()
        self.runs = [r for r in self.runs if r[1]]
        self.dropped += self._fill
        self._fill = 0
        self._buf = np.empty(0, dtype=np.int32)
        if not self._files:
            self._open()  # an empty dataset still has one (empty) file
        self._close_file()
        n = len(self._files)
        names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
        for path, name in zip(self._files, names, strict=True):
            path.rename(self.dir / name)
        state: dict[str, Any] = {
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": self.fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        info = {
            "citation": "",
            "description": "",
            "features": self.features,
            "homepage": "",
            "license": "",
        }
        (self.dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
        (self.dir / "state.json").write_text(json.dumps(state, indent=2))
        return self.dropped


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
    runs: list[tuple[int, int]] = field(default_factory=list)
    """``(source, blocks)`` in stored order (format v2)."""
    heldout_runs: list[tuple[int, int]] = field(default_factory=list)
    source_docs: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("skipped")
        return {
            "runs": [list(r) for r in self.runs],
            "heldoutRuns": [list(r) for r in self.heldout_runs],
            "sourceDocs": {str(k): v for k, v in sorted(self.source_docs.items())},
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
            runs=[(int(a), int(b)) for a, b in d.get("runs", [])],
            heldout_runs=[(int(a), int(b)) for a, b in d.get("heldoutRuns", [])],
            source_docs={int(k): int(v) for k, v in d.get("sourceDocs", {}).items()},
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


def _shard_tasks(cfg: TokenizeStage, shard: int, tmp: Path) -> Iterator[_Task]:
    """The shard's work in packing order (that of :func:`shard_documents`): HF batches, then
    the planned units, jsonl files cut into ``TASK_BYTES`` line-aligned slices. Remote files
    are downloaded as their turn comes; the last task of one carries its deletion."""
    for i, src in enumerate(cfg.sources):
        if src.hf_dataset is not None:
            for texts in _read_hf(i, src, cfg.text_field, shard, cfg.num_shards):
                yield _Task(source=i, texts=texts)
    for unit in plan_shards(cfg)[shard]:
        path = _local_copy(unit.uri, tmp)
        remote = "" if open_storage(unit.uri).local_path() is not None else str(path)
        spans = _jsonl_spans(path) if unit.format == "jsonl" and unit.pieces == 1 else []
        if len(spans) < 2:
            yield _Task(unit, unit.source, str(path), cleanup=remote)
            continue
        for i, span in enumerate(spans):
            last = i == len(spans) - 1
            yield _Task(unit, unit.source, str(path), span, cleanup=remote if last else "")


def _results(
    tasks: Iterable[_Task], pool: Any, workers: int, run: Any
) -> Iterator[tuple[_Task, tuple[np.ndarray, int, np.ndarray, int]]]:
    """Task results in task order. Without a pool the main process runs each task. With
    one, its ``workers`` processes run every task, with up to ``AHEAD`` tasks each handed
    out beyond the one they run (a worker never waits for the main process), while the
    main process only packs and writes: ordered packing is the one serial step (5-10% of
    the CPU), so it overlaps the workers' encoding instead of taking turns with it, and no
    worker waits while the main process packs."""
    from collections import deque

    if pool is None:
        for task in tasks:
            yield task, run(task)
        return
    queued: deque[tuple[_Task, Any]] = deque()
    limit = (AHEAD + 1) * workers
    for task in tasks:
        queued.append((task, pool.apply_async(_worker_run, (task,))))
        while queued and (len(queued) >= limit or queued[0][1].ready()):
            t, h = queued.popleft()
            yield t, h.get()
    while queued:
        t, h = queued.popleft()
        yield t, h.get()


AHEAD = 2
"""Tasks queued per worker beyond the one it runs."""


def _pool_context() -> Any:
    """``fork`` while no other Python thread runs (a forked child cannot take a lock such a
    thread holds), else ``spawn``. A forked worker starts in milliseconds; a spawned one
    spends about half a CPU-second importing numpy, pydantic and this module again, which on
    a shard of a few seconds costs two workers their scaling. The native threads present by
    then (OpenBLAS's pool, jemalloc's background thread in pyarrow) have fork handlers, and
    the tokenizer has not run in parallel yet (datasets.map forks in the same state)."""
    import multiprocessing as mp
    import threading

    single = threading.active_count() == 1
    method = "fork" if single and "fork" in mp.get_all_start_methods() else "spawn"
    log.debug("tokenize workers start by %s", method)
    return mp.get_context(method)


def _tokenize_shard(
    cfg: TokenizeStage, tok: LoadedTokenizer, shard: int, chash: str, stage: Path
) -> ShardResult:
    t0 = time.monotonic()
    n = cfg.num_shards
    train = BlockWriter(stage / shard_name(shard, n), cfg.block_size, f"{chash}-{shard}-train")
    held = BlockWriter(stage / heldout_name(shard, n), cfg.block_size, f"{chash}-{shard}-held")
    opts = _Opts(cfg.text_field, cfg.held_out_fraction, cfg.seed, threads=cfg.workers == 1)
    enc = PieceCache.wrap(tok.rust(), tok.spec)
    pool = None
    if cfg.workers > 1:
        global _WORKER_TOK
        ctx = _pool_context()
        forked = ctx.get_start_method() == "fork"
        if forked:
            _WORKER_TOK = enc  # inherited: no second parse of the tokenizer
        pool = ctx.Pool(
            cfg.workers,
            initializer=_worker_init,
            initargs=(None if forked else tok.spec, tok.eos_id, opts),
        )
    reads = tmp_dir = stage / "_read"
    tmp_dir.mkdir()
    try:
        tasks = _shard_tasks(cfg, shard, reads)
        for task, (ids, ndocs, held_ids, nheld) in _results(
            tasks, pool, cfg.workers, lambda t: _run_task(enc, tok.eos_id, opts, t)
        ):
            train.start_source(task.source)
            held.start_source(task.source)
            train.add(ids, ndocs)
            if nheld:
                held.add(held_ids, nheld)
            if task.cleanup:
                Path(task.cleanup).unlink(missing_ok=True)
    finally:
        if pool is not None:
            pool.terminate()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    dropped = train.close()
    held.close()
    if cfg.held_out_fraction <= 0:
        shutil.rmtree(stage / heldout_name(shard, n))
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
        runs=[(r[0], r[1]) for r in train.runs],
        heldout_runs=[(r[0], r[1]) for r in held.runs],
        source_docs=dict(train.source_docs),
    )


def _source_totals(cfg: TokenizeStage, results: list[ShardResult]) -> list[dict[str, Any]]:
    """Blocks, tokens and documents of every source over all shards (training reads its
    mixture's sizes from here, ``cpt plan`` its epochs per source)."""
    out = []
    for i, src in enumerate(cfg.sources):
        blocks = sum(b for r in results for s, b in r.runs if s == i)
        held = sum(b for r in results for s, b in r.heldout_runs if s == i)
        out.append(
            {
                "index": i,
                "name": source_name(i, src),
                "blocks": blocks,
                "tokens": blocks * cfg.block_size,
                "docs": sum(r.source_docs.get(i, 0) for r in results),
                "heldoutBlocks": held,
                "heldoutTokens": held * cfg.block_size,
            }
        )
    return out


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
            {
                "name": shard_name(r.shard, n),
                "blocks": r.blocks,
                "tokens": r.tokens,
                "runs": [list(x) for x in r.runs],
            }
            for r in results
        ],
        "heldoutShards": [
            {
                "name": heldout_name(r.shard, n),
                "blocks": r.heldout_blocks,
                "runs": [list(x) for x in r.heldout_runs],
            }
            for r in results
            if cfg.held_out_fraction > 0
        ],
        "sources": _source_totals(cfg, results),
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
    # A local output is staged inside itself (a hidden dir with the storage layer's temp
    # marker, removed on failure or by the next run of this shard), so the finished dirs are
    # renamed into place instead of copied: a shard's Arrow files hold about 9 bytes per
    # token, a serial copy of seconds at the end of a large shard. Others are uploaded.
    local_out = out.local_path()
    prefix = f".{shard_name(shard, n)}{TMP_MARKER}"
    if local_out is not None:
        local_out.mkdir(parents=True, exist_ok=True)
        for stale in local_out.glob(prefix + "*"):  # left by a killed earlier run
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=local_out) as tmp:
        stage = Path(tmp)
        result = _tokenize_shard(cfg, tok, shard, chash, stage)
        for name in (shard_name(shard, n), heldout_name(shard, n)):
            if not (stage / name).is_dir():
                continue
            if local_out is not None:
                os.replace(stage / name, local_out / name)
            else:
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
