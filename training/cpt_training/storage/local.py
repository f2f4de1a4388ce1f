"""Local folders behind the :class:`Storage` interface, with atomic writes."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cpt_training.storage.base import TMP_MARKER, Storage, _is_tmp, _markers_last, _walk_files
from cpt_training.storage.settings import TransferSettings, default_settings
from cpt_training.storage.uri import _clean_key, _join_keys, local_path_of


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}{TMP_MARKER}{uuid.uuid4().hex}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


class LocalStorage(Storage):
    """A local folder. Writes go to a temp file in the same folder and are renamed into
    place, so a reader (or a crash) never sees half a file."""

    def __init__(self, root: str | os.PathLike[str], settings: TransferSettings | None = None):
        self.root = local_path_of(os.fspath(root))
        self.uri = str(self.root)
        self.settings = settings or default_settings()

    def _p(self, key: str) -> Path:
        k = _clean_key(key)
        return self.root / k if k else self.root

    def join(self, *parts: str) -> str:
        return str(self._p(_join_keys(*parts)))

    def child(self, *parts: str) -> LocalStorage:
        return LocalStorage(self._p(_join_keys(*parts)), self.settings)

    def local_path(self, key: str = "") -> Path:
        return self._p(key)

    def exists(self, key: str = "") -> bool:
        return self._p(key).exists()

    def is_file(self, key: str) -> bool:
        return self._p(key).is_file()

    def size(self, key: str) -> int:
        p = self._p(key)
        if not p.is_file():
            raise FileNotFoundError(str(p))
        return p.stat().st_size

    def read_bytes(self, key: str) -> bytes:
        p = self._p(key)
        if not p.is_file():
            raise FileNotFoundError(str(p))
        return p.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}{TMP_MARKER}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(p.parent)

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        return _walk_files(self._p(prefix))

    def list_dirs(self, prefix: str = "") -> list[str]:
        p = self._p(prefix)
        if not p.is_dir():
            return []
        return sorted(c.name for c in p.iterdir() if c.is_dir() and not _is_tmp(c.name))

    def delete(self, key: str) -> None:
        p = self._p(key)
        if p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str = "") -> int:
        p = self._p(prefix)
        if p.is_file():
            p.unlink()
            return 1
        if not p.is_dir():
            return 0
        n = len(_walk_files(p))
        shutil.rmtree(p, ignore_errors=True)
        return n

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        src, dst = Path(local_path), self._p(key)
        if dst.exists() and src.resolve() == dst.resolve():
            return
        _atomic_copy(src, dst)

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        src, dst = self._p(key), Path(local_path)
        if not src.is_file():
            raise FileNotFoundError(str(src))
        if dst.exists() and src.resolve() == dst.resolve():
            return
        _atomic_copy(src, dst)

    def _copy_many(self, pairs: list[tuple[Path, Path]], concurrency: int | None) -> None:
        pairs = [(s, d) for s, d in pairs if not (d.exists() and s.resolve() == d.resolve())]
        by_name = {d.as_posix(): (s, d) for s, d in pairs}
        workers = max(1, min(concurrency or self.settings.max_concurrency, 16, len(pairs) or 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="cpt-copy") as pool:
            for group in _markers_last(list(by_name)):
                for fut in [pool.submit(_atomic_copy, *by_name[k]) for k in group]:
                    fut.result()

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        key: str = "",
        *,
        files: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> list[str]:
        src_root = Path(local_dir)
        rels = sorted(files) if files is not None else sorted(_walk_files(src_root))
        dst_root = self._p(key)
        self._copy_many([(src_root / r, dst_root / r) for r in rels], concurrency)
        return rels

    def download_dir(
        self,
        key: str,
        local_dir: str | os.PathLike[str],
        *,
        keys: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> list[str]:
        src_root = self._p(key)
        rels = sorted(keys) if keys is not None else sorted(_walk_files(src_root))
        dst_root = Path(local_dir)
        for r in rels:
            if not (src_root / r).is_file():
                raise FileNotFoundError(str(src_root / r))
        self._copy_many([(src_root / r, dst_root / r) for r in rels], concurrency)
        return rels


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
