"""The :class:`Storage` interface and the tree helpers both backends share."""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cpt_training.storage.settings import TransferSettings

TMP_MARKER = ".cpt-tmp."
"""Infix of in-flight local temp files; listings skip them."""


class Storage(abc.ABC):
    """A tree of byte blobs rooted at :attr:`uri`, addressed by relative ``/`` keys."""

    uri: str
    settings: TransferSettings

    @abc.abstractmethod
    def join(self, *parts: str) -> str: ...

    @abc.abstractmethod
    def child(self, *parts: str) -> Storage: ...

    @abc.abstractmethod
    def exists(self, key: str = "") -> bool:
        """True for an existing file, or a "directory" with at least one file (S3) /
        an existing directory (local)."""

    @abc.abstractmethod
    def is_file(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int: ...

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def list_sizes(self, prefix: str = "") -> dict[str, int]: ...

    @abc.abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one file; missing files are fine."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str = "") -> int:
        """Delete every file below ``prefix`` (the whole root when empty); returns the count."""

    @abc.abstractmethod
    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None: ...

    @abc.abstractmethod
    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None: ...

    @abc.abstractmethod
    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        key: str = "",
        *,
        files: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> list[str]:
        """Upload ``local_dir`` (or just the relative ``files`` in it) below ``key``;
        returns the relative paths uploaded."""

    @abc.abstractmethod
    def download_dir(
        self,
        key: str,
        local_dir: str | os.PathLike[str],
        *,
        keys: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> list[str]:
        """Download everything below ``key`` (or only ``keys``, relative to it) into
        ``local_dir``; returns the relative paths downloaded."""

    def local_path(self, key: str = "") -> Path | None:
        """The filesystem path behind ``key`` for local storage, else None."""
        return None

    # -- shared conveniences -------------------------------------------------------------------

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.list_sizes(prefix))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        try:
            return json.loads(self.read_bytes(key))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.join(key)} is not valid JSON: {exc}") from exc

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


MARKER_NAMES = frozenset({"cpt-commit.json", "manifest.json", "_SUCCESS"})
"""Files that declare a tree complete. Tree transfers move them after everything else, so a
copy interrupted half-way never looks complete."""


def _markers_last(rels: Sequence[str]) -> list[list[str]]:
    """Split relative keys into [data, markers] (markers: MARKER_NAMES and ``*.done.json``)."""
    data: list[str] = []
    marks: list[str] = []
    for r in sorted(rels):
        name = r.rsplit("/", 1)[-1]
        (marks if name in MARKER_NAMES or name.endswith(".done.json") else data).append(r)
    return [g for g in (data, marks) if g]


def _is_tmp(name: str) -> bool:
    return TMP_MARKER in name


def _walk_files(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    if not root.is_dir():
        return out
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if _is_tmp(name):
                continue
            p = Path(dirpath, name)
            try:
                out[p.relative_to(root).as_posix()] = p.stat().st_size
            except FileNotFoundError:  # deleted while walking
                continue
    return out
