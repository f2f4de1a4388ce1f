"""S3 behind the :class:`Storage` interface."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cpt_training.storage.base import Storage, _markers_last, _walk_files
from cpt_training.storage.settings import TransferSettings, default_settings
from cpt_training.storage.transfer import _is_not_found, _transfer_manager, _wait_all, s3_client
from cpt_training.storage.uri import _clean_key, _join_keys


class S3Storage(Storage):
    """``s3://bucket/prefix`` through one shared boto3 client and managed transfers."""

    def __init__(self, bucket: str, prefix: str = "", settings: TransferSettings | None = None):
        self.bucket = bucket
        self.prefix = _clean_key(prefix)
        self.settings = settings or default_settings()
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        return s3_client(self.settings)

    def _k(self, key: str) -> str:
        return _join_keys(self.prefix, key)

    def _dir(self, key: str) -> str:
        k = self._k(key)
        return k + "/" if k else ""

    def join(self, *parts: str) -> str:
        k = self._k(_join_keys(*parts))
        return f"s3://{self.bucket}/{k}" if k else f"s3://{self.bucket}"

    def child(self, *parts: str) -> S3Storage:
        return S3Storage(self.bucket, self._k(_join_keys(*parts)), self.settings)

    def is_file(self, key: str) -> bool:
        k = self._k(key)
        if not k:
            return False
        try:
            self.client.head_object(Bucket=self.bucket, Key=k)
            return True
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise

    def exists(self, key: str = "") -> bool:
        if self.is_file(key):
            return True
        resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._dir(key), MaxKeys=1)
        return bool(resp.get("KeyCount", 0))

    def size(self, key: str) -> int:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(self.join(key)) from exc
            raise
        return int(resp["ContentLength"])

    def read_bytes(self, key: str) -> bytes:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(self.join(key)) from exc
            raise
        body = resp["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def write_bytes(self, key: str, data: bytes) -> None:
        # One PUT is atomic in S3: readers see the old object or the new one, never a mix.
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        base = self._dir(prefix)
        out: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []) or []:
                rel = obj["Key"][len(base) :]
                if rel and not rel.endswith("/"):
                    out[rel] = int(obj["Size"])
        return out

    def list_dirs(self, prefix: str = "") -> list[str]:
        base = self._dir(prefix)
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []) or []:
                name = cp["Prefix"][len(base) :].strip("/")
                if name:
                    names.add(name)
        return sorted(names)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def _delete_keys(self, full_keys: list[str]) -> None:
        for i in range(0, len(full_keys), 1000):
            batch = full_keys[i : i + 1000]
            resp = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"S3 delete failed for {len(errors)} keys in s3://{self.bucket}, first: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def delete_prefix(self, prefix: str = "") -> int:
        k = self._k(prefix)
        keys = [self._k(_join_keys(prefix, r)) for r in self.list_sizes(prefix)]
        if k and self.is_file(prefix):
            keys.append(k)
        self._delete_keys(keys)
        return len(keys)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        with _transfer_manager(self.client, self.settings) as tm:
            tm.upload(os.fspath(local_path), self.bucket, self._k(key)).result()

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        dst = Path(local_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _transfer_manager(self.client, self.settings) as tm:
                tm.download(self.bucket, self._k(key), os.fspath(dst)).result()
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(self.join(key)) from exc
            raise

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
        s = self.settings.with_concurrency(concurrency)
        with _transfer_manager(s3_client(s), s) as tm:
            for group in _markers_last(rels):
                _wait_all(
                    tm.upload(os.fspath(src_root / r), self.bucket, self._k(_join_keys(key, r)))
                    for r in group
                )
        return rels

    def download_dir(
        self,
        key: str,
        local_dir: str | os.PathLike[str],
        *,
        keys: Sequence[str] | None = None,
        concurrency: int | None = None,
    ) -> list[str]:
        rels = sorted(keys) if keys is not None else self.list(key)
        dst_root = Path(local_dir)
        for r in rels:
            (dst_root / r).parent.mkdir(parents=True, exist_ok=True)
        s = self.settings.with_concurrency(concurrency)
        try:
            with _transfer_manager(s3_client(s), s) as tm:
                for group in _markers_last(rels):
                    _wait_all(
                        tm.download(
                            self.bucket, self._k(_join_keys(key, r)), os.fspath(dst_root / r)
                        )
                        for r in group
                    )
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{self.join(key)}: an object vanished: {exc}") from exc
            raise
        return rels

    def copy_from(
        self, src: S3Storage, *, keys: Sequence[str] | None = None, concurrency: int | None = None
    ) -> list[str]:
        """Server-side (multipart) copy of ``src``'s tree into this root: no bytes through
        this host."""
        rels = sorted(keys) if keys is not None else src.list()
        s = self.settings.with_concurrency(concurrency)
        with _transfer_manager(s3_client(s), s, copy=True) as tm:
            for group in _markers_last(rels):
                _wait_all(
                    tm.copy({"Bucket": src.bucket, "Key": src._k(r)}, self.bucket, self._k(r))
                    for r in group
                )
        return rels
