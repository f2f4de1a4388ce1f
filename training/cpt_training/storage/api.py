"""Entry points: open a storage for a URI, and URI-level shortcuts over it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from cpt_training.storage.base import Storage
from cpt_training.storage.local import LocalStorage
from cpt_training.storage.s3 import S3Storage
from cpt_training.storage.settings import TransferSettings, default_settings
from cpt_training.storage.uri import is_s3_uri, local_path_of, parent_and_name, split_s3_uri


def open_storage(uri: str, settings: TransferSettings | None = None) -> Storage:
    """Open a storage rooted at ``uri`` (``s3://``, ``file://`` or a path)."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"storage URI must be a non-empty string, got {uri!r}")
    if is_s3_uri(uri):
        bucket, prefix = split_s3_uri(uri)
        return S3Storage(bucket, prefix, settings or default_settings())
    return LocalStorage(local_path_of(uri), settings)


def join_uri(uri: str, *parts: str) -> str:
    """Append key parts to a URI (S3 or local)."""
    return open_storage(uri).join(*parts)


def _parent(uri: str) -> tuple[Storage, str]:
    parent, name = parent_and_name(uri)
    return open_storage(parent), name


def exists(uri: str) -> bool:
    st, name = _parent(uri)
    return st.exists(name)


def read_bytes(uri: str) -> bytes:
    st, name = _parent(uri)
    return st.read_bytes(name)


def write_bytes(uri: str, data: bytes) -> None:
    st, name = _parent(uri)
    st.write_bytes(name, data)


def read_json(uri: str) -> Any:
    st, name = _parent(uri)
    return st.read_json(name)


def write_json(uri: str, obj: Any) -> None:
    st, name = _parent(uri)
    st.write_json(name, obj)


def upload_dir(
    local_dir: str | os.PathLike[str], uri: str, *, concurrency: int | None = None
) -> list[str]:
    return open_storage(uri).upload_dir(local_dir, "", concurrency=concurrency)


def download_dir(
    uri: str, local_dir: str | os.PathLike[str], *, concurrency: int | None = None
) -> list[str]:
    return open_storage(uri).download_dir("", local_dir, concurrency=concurrency)


def copy_tree(src_uri: str, dst_uri: str, *, concurrency: int | None = None) -> list[str]:
    """Copy every file below ``src_uri`` to ``dst_uri`` by the fastest route: server-side copy
    for S3 -> S3, a managed upload/download when one side is local, a file copy otherwise."""
    src, dst = open_storage(src_uri), open_storage(dst_uri)
    if isinstance(src, S3Storage) and isinstance(dst, S3Storage):
        return dst.copy_from(src, concurrency=concurrency)
    src_local = src.local_path()
    if src_local is not None:
        return dst.upload_dir(src_local, "", concurrency=concurrency)
    dst_local = dst.local_path()
    assert dst_local is not None
    return src.download_dir("", dst_local, concurrency=concurrency)


def run_parallel(fn: Any, items: Sequence[Any], workers: int) -> list[Any]:
    """Map ``fn`` over ``items`` in a thread pool, preserving order, re-raising the first error.

    For I/O and GIL-releasing work (hashlib, file copies)."""
    if not items:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(items))), thread_name_prefix="cpt-io") as pool:
        futs: list[Future[Any]] = [pool.submit(fn, it) for it in items]
        return [f.result() for f in futs]
