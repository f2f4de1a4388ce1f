"""Reading documents out of a unit's local file (jsonl in line-aligned byte slices, Parquet,
``.txt`` as one document or split into paragraphs), a shard's documents in packing order,
and the deterministic held-out split."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpt_training.config import (
    TokenizeStage,
)
from cpt_training.storage import open_storage
from cpt_training.tokenize.layout import DOC_BATCH, TokenizeError
from cpt_training.tokenize.sources import Unit, _local_copy, _read_hf, plan_shards


def _column_texts(table: Any, field: str, where: str) -> list[str]:
    if field not in table.column_names:
        raise TokenizeError(
            f"{where} has no field {field!r} (textField); fields: {sorted(table.column_names)}"
        )
    return [t for t in table.column(field).to_pylist() if isinstance(t, str) and t]


def _read_unit(unit: Unit, field: str, tmp: Path, txt_split: str) -> Iterator[list[str]]:
    """Batches of document texts of one unit, in file order."""
    path = _local_copy(unit.uri, tmp)
    try:
        yield from _read_local(unit, path, field, txt_split=txt_split)
    finally:
        if open_storage(unit.uri).local_path() is None:
            path.unlink(missing_ok=True)


def split_txt(text: str, mode: str) -> list[str]:
    """The documents of one ``.txt`` file: the whole file (``file``) or every
    blank-line-separated paragraph (``paragraph``); blank ones are left out."""
    docs = [text] if mode == "file" else re.split(r"\n\s*\n", text)
    docs = [d.strip() for d in docs]
    return [d for d in docs if d]


def _read_local(
    unit: Unit,
    path: Path,
    field: str,
    span: tuple[int, int] | None = None,
    threads: bool = True,
    txt_split: str = "file",
) -> Iterator[list[str]]:
    """Batches of document texts of ``unit`` read from its local copy ``path``; ``span``: only
    the jsonl lines in that byte range (cut at line starts by :func:`_jsonl_spans`);
    ``txt_split``: the stage's ``txtSplit`` (see :func:`split_txt`)."""
    import pyarrow as pa

    if unit.format == "txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = split_txt(text, txt_split)
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
            yield from _read_unit(unit, cfg.text_field, tmp_dir, cfg.txt_split)
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
