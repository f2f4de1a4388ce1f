"""Packing token ids into fixed-size blocks written as a ``save_to_disk`` dataset dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FLUSH_BLOCKS = 2048
"""Blocks per Arrow record batch written."""
FILE_BYTES = 512 << 20
"""Bytes per Arrow file of a shard's dataset dir at most (as ``save_to_disk`` would cut)."""


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
