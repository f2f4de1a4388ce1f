"""The inputs: listing ``uri`` sources into units and planning them over shards, fetching a
unit's file, and streaming Hugging Face sources (the Hub's Parquet conversion or ``dataFiles``;
loading-script datasets fail with the fix)."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_training.config import (
    PARQUET_CONVERSION,
    ConfigError,
    DataSource,
    TokenizeStage,
)
from cpt_training.storage import open_storage
from cpt_training.tokenize.layout import DOC_BATCH, TokenizeError

_EXT_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}


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


def _local_copy(uri: str, tmp: Path) -> Path:
    st = open_storage(uri)
    local = st.local_path()
    if local is not None:
        return local
    dst = tmp / hashlib.sha1(uri.encode()).hexdigest()
    parent = open_storage(uri.rsplit("/", 1)[0])
    parent.download_file(uri.rsplit("/", 1)[1], dst)
    return dst


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
