"""One storage interface behind string URIs: local folders and S3.

Every stage reads and writes the same layout either in S3 (on the cluster) or in local folders
(local mode, tests). Code above this module never branches on "is it S3?": it opens a
:class:`Storage` rooted at a URI and uses relative, ``/``-separated keys.

URIs: ``s3://bucket/prefix`` (trailing slash optional), ``/abs/path``, ``rel/path`` or
``file:///abs/path``.

Stable API (the checkpoint, tokenize, data and trainer modules depend on these names)::

    open_storage(uri, settings=None) -> Storage            # LocalStorage | S3Storage
    Storage.uri                                            # normalised root URI
    Storage.join(*parts) -> str                            # URI of a key below the root
    Storage.child(*parts) -> Storage                       # a storage rooted below this one
    Storage.exists(key="") / is_file(key) / size(key)
    Storage.read_bytes(key) / write_bytes(key, data)       # local writes are atomic
    Storage.read_text / write_text / read_json / write_json
    Storage.list(prefix="") -> list[str]                   # recursive, files only, sorted,
                                                           # keys relative to `prefix`
    Storage.list_sizes(prefix="") -> dict[str, int]        # same keys, with byte sizes
    Storage.list_dirs(prefix="") -> list[str]              # immediate sub-"directories"
    Storage.delete(key) / delete_prefix(prefix="") -> int
    Storage.upload_file(local_path, key) / download_file(key, local_path)
    Storage.upload_dir(local_dir, key="", *, files=None, concurrency=None) -> list[str]
    Storage.download_dir(key, local_dir, *, keys=None, concurrency=None) -> list[str]
    Storage.local_path(key="") -> Path | None              # the real path for local storage

    # URI-level shortcuts (open the parent and call the method above)
    exists(uri), read_bytes(uri), write_bytes(uri, data), read_json(uri), write_json(uri, obj),
    upload_dir(local_dir, uri, *, concurrency=None),
    download_dir(uri, local_dir, *, concurrency=None),
    copy_tree(src_uri, dst_uri, *, concurrency=None), join_uri(uri, *parts), is_s3_uri(uri)

Missing keys raise :class:`FileNotFoundError` on both backends. Tree transfers (upload_dir,
download_dir, copy_tree) move completion markers (``cpt-commit.json``, ``manifest.json``,
``*.done.json``, ``_SUCCESS``) only after every other file arrived.

S3 transfers are managed transfers, so large files go up and down as concurrent
multipart/ranged requests, and a directory is one manager with all its files in flight at once.
Two clients (``CPT_S3_TRANSFER_CLIENT``, see :func:`use_crt`): the AWS CRT S3 client (``awscrt``,
the C data path the AWS CLI v2 uses: no GIL, hardware CRC32C part checksums, its own connection
pool) wherever ``awscrt`` is installed, and boto3's s3transfer (Python threads) otherwise or when
asked. Requests other than file transfers (list, head, small puts) always go through one shared
boto3 client. Retries and backoff: botocore's for that client (``adaptive`` retry mode by
default: exponential backoff with jitter plus client-side rate limiting when S3 answers
SlowDown) and s3transfer's transfers; the CRT client retries with its own exponential backoff.
The endpoint and credentials come only from the standard AWS configuration
(``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, web identity, ``~/.aws/config`` ...,
``AWS_CA_BUNDLE``). Knobs are in :class:`TransferSettings` (env ``CPT_S3_*``).
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

TMP_MARKER = ".cpt-tmp."
"""Infix of in-flight local temp files; listings skip them."""

MiB = 1024 * 1024
TRANSFER_CLIENTS = ("auto", "classic", "crt")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


@dataclass(frozen=True)
class TransferSettings:
    """Transfer and retry knobs. Defaults suit a trn1/p5 node; tests shrink them.

    ``max_attempts``/``retry_mode`` default to the standard ``AWS_MAX_ATTEMPTS`` /
    ``AWS_RETRY_MODE`` variables when set, so operators tune retries the AWS way.
    """

    max_concurrency: int = 32
    multipart_threshold: int = 16 * MiB
    multipart_chunksize: int = 16 * MiB
    max_attempts: int = 10  # total attempts, like AWS_MAX_ATTEMPTS
    retry_mode: str = "adaptive"
    transfer_client: str = "auto"  # auto (CRT where installed) | classic | crt
    max_bandwidth: int | None = None  # bytes/s, classic client only (tests, noisy neighbours)
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    hash_workers: int = 8
    # The CRT client's throughput target: it sizes the connection pool (about 2.5 connections
    # per Gbps, at least 10) and the memory budget. None: the CRT's own figure for known EC2
    # instance types, else 10 Gbps (25 connections).
    crt_target_gbps: float | None = None

    @classmethod
    def from_env(cls) -> TransferSettings:
        """Read ``CPT_S3_*`` (and the standard ``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE``)."""
        d = cls()
        bw = _env_int("CPT_S3_MAX_BANDWIDTH", 0)
        mode = os.environ.get("AWS_RETRY_MODE") or os.environ.get("CPT_S3_RETRY_MODE")
        client = os.environ.get("CPT_S3_TRANSFER_CLIENT", d.transfer_client)
        if mode is not None and mode not in ("legacy", "standard", "adaptive"):
            raise ValueError(f"retry mode must be one of legacy, standard, adaptive, got {mode!r}")
        if client not in TRANSFER_CLIENTS:
            raise ValueError(
                f"CPT_S3_TRANSFER_CLIENT must be one of auto, classic, crt, got {client!r}"
            )
        raw_gbps = os.environ.get("CPT_S3_TARGET_GBPS") or None
        try:
            gbps = None if raw_gbps is None else float(raw_gbps)
        except ValueError:
            gbps = -1.0
        if gbps is not None and not 0 < gbps < float("inf"):
            raise ValueError(f"CPT_S3_TARGET_GBPS must be a positive number, got {raw_gbps!r}")
        return cls(
            max_concurrency=max(1, _env_int("CPT_S3_MAX_CONCURRENCY", d.max_concurrency)),
            multipart_threshold=_env_int("CPT_S3_MULTIPART_THRESHOLD_MB", 16) * MiB,
            multipart_chunksize=_env_int("CPT_S3_MULTIPART_CHUNKSIZE_MB", 16) * MiB,
            max_attempts=_env_int(
                "AWS_MAX_ATTEMPTS", _env_int("CPT_S3_MAX_ATTEMPTS", d.max_attempts)
            ),
            retry_mode=mode or d.retry_mode,
            transfer_client=client,
            max_bandwidth=bw or None,
            hash_workers=max(1, _env_int("CPT_HASH_WORKERS", d.hash_workers)),
            crt_target_gbps=gbps,
        )

    def __post_init__(self) -> None:
        if self.transfer_client not in TRANSFER_CLIENTS:
            raise ValueError(
                f"transfer_client must be one of {', '.join(TRANSFER_CLIENTS)}, "
                f"got {self.transfer_client!r}"
            )
        if self.crt_target_gbps is not None and not 0 < self.crt_target_gbps < float("inf"):
            raise ValueError(
                f"crt_target_gbps (CPT_S3_TARGET_GBPS) must be a positive number, "
                f"got {self.crt_target_gbps!r}"
            )
        if self.transfer_client == "crt" and self.max_bandwidth is not None:
            raise ValueError(
                "max_bandwidth (CPT_S3_MAX_BANDWIDTH) needs the classic transfer client; "
                "set transfer_client (CPT_S3_TRANSFER_CLIENT) to auto or classic"
            )

    def with_concurrency(self, concurrency: int | None) -> TransferSettings:
        if concurrency is None:
            return self
        return replace(self, max_concurrency=max(1, int(concurrency)))


# ---------------------------------------------------------------------------------------------
# URI helpers
# ---------------------------------------------------------------------------------------------


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")`` (no leading/trailing slash)."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, prefix.strip("/")


def local_path_of(uri: str) -> Path:
    """A plain path or ``file://`` URI as an absolute :class:`Path`."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI with a host is not supported: {uri!r}")
        return Path(unquote(parsed.path)).absolute()
    if "://" in uri:
        raise ValueError(f"unsupported storage URI scheme: {uri!r} (use s3://, file:// or a path)")
    return Path(uri).expanduser().absolute()


def _clean_key(key: str) -> str:
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"storage keys may not contain '..': {key!r}")
    return "/".join(parts)


def _join_keys(*parts: str) -> str:
    return _clean_key("/".join(p for p in parts if p))


def join_uri(uri: str, *parts: str) -> str:
    """Append key parts to a URI (S3 or local)."""
    return open_storage(uri).join(*parts)


def parent_and_name(uri: str) -> tuple[str, str]:
    """Split a URI into its parent URI and last component."""
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        head, _, name = key.rpartition("/")
        return (f"s3://{bucket}/{head}" if head else f"s3://{bucket}"), name
    p = local_path_of(uri)
    return str(p.parent), p.name


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------


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


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}{TMP_MARKER}{uuid.uuid4().hex}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


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


class LocalStorage(Storage):
    """A local folder. Writes go to a temp file in the same folder and are renamed into
    place, so a reader (or a crash) never sees half a file."""

    def __init__(self, root: str | os.PathLike[str], settings: TransferSettings | None = None):
        self.root = local_path_of(os.fspath(root))
        self.uri = str(self.root)
        self.settings = settings or TransferSettings.from_env()

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


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------

_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def s3_client(settings: TransferSettings | None = None) -> Any:
    """A shared, thread-safe boto3 S3 client per process and settings.

    The connection pool is sized to the transfer concurrency (botocore's default of 10 would
    serialise a 32-way transfer). Endpoint/credentials/region: standard AWS config only.
    """
    s = settings or TransferSettings.from_env()
    key = (
        *_env_key(),
        s.max_concurrency,
        s.max_attempts,
        s.retry_mode,
        s.connect_timeout,
        s.read_timeout,
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            from botocore.config import Config

            cfg = Config(
                retries={"mode": s.retry_mode, "total_max_attempts": s.max_attempts},
                max_pool_connections=max(10, s.max_concurrency + 8),
                connect_timeout=s.connect_timeout,
                read_timeout=s.read_timeout,
                tcp_keepalive=True,
                # Integrity of request bodies comes from the CRC32 checksum botocore sends
                # with every upload (and the manifest's per-file CRC64NVME): no second SHA-256
                # pass over each part for the signature, as botocore already does over HTTPS.
                s3={"payload_signing_enabled": False},
            )
            client = _sessions()[0].client("s3", config=cfg)
            _CLIENTS[key] = client
        return client


_SESSIONS: dict[tuple[Any, ...], Any] = {}


def _env_key() -> tuple[Any, ...]:
    """What a client or session depends on: the process and the standard AWS environment."""
    return (
        os.getpid(),
        _endpoint_url(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        os.environ.get("AWS_CA_BUNDLE"),
    )


def _sessions() -> tuple[Any, Any]:
    """(boto3 session, its botocore session), one per process and AWS environment (call
    with _CLIENTS_LOCK held): the loader parses the S3 service model once for every client
    built from it, the CRT request serializer's included."""
    key = _env_key()
    pair = _SESSIONS.get(key)
    if pair is None:
        import boto3
        import botocore.session

        core = botocore.session.Session()
        pair = _SESSIONS[key] = (boto3.session.Session(botocore_session=core), core)
    return pair


def _transfer_config(s: TransferSettings) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=s.multipart_threshold,
        multipart_chunksize=s.multipart_chunksize,
        max_concurrency=s.max_concurrency,
        max_bandwidth=s.max_bandwidth,
        use_threads=True,
        preferred_transfer_client=s.transfer_client,
    )


def crt_available() -> bool:
    """Whether the AWS CRT S3 client can be used here (``awscrt`` and s3transfer's CRT glue)."""
    import importlib

    try:
        importlib.import_module("awscrt.s3")
        importlib.import_module("s3transfer.crt")
    except ImportError:
        return False
    return True


def use_crt(s: TransferSettings) -> bool:
    """Whether file transfers with settings ``s`` go through the AWS CRT S3 client.

    ``auto``: yes where ``awscrt`` is installed, unless ``max_bandwidth`` asks for throttling
    (s3transfer only). ``classic``: never. ``crt``: always (an error without ``awscrt``).
    Unlike boto3's own ``auto`` (CRT only on a few EC2 instance types, one process per host,
    AWS endpoints only), ours honours ``AWS_ENDPOINT_URL`` and plain-HTTP endpoints."""
    if s.transfer_client == "classic" or (
        s.transfer_client == "auto" and s.max_bandwidth is not None
    ):
        return False
    if crt_available():
        return True
    if s.transfer_client == "crt":
        raise RuntimeError(
            "CPT_S3_TRANSFER_CLIENT=crt needs the awscrt package (boto3[crt]); "
            "install it or use auto/classic"
        )
    return False


_CRT: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def _endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _crt_client(client: Any, target_gbps: float | None = None) -> tuple[Any, Any]:
    """(awscrt S3Client, request serializer), one per process, endpoint, identity and
    throughput target.

    The CRT client owns an event loop per core and a connection pool sized by its throughput
    target; part size and the number of connections are per request, so one client serves
    every TransferSettings with the same target."""
    endpoint = _endpoint_url()
    region = client.meta.region_name
    key = (*_env_key(), region, target_gbps)
    with _CLIENTS_LOCK:
        hit = _CRT.get(key)
        if hit is not None:
            return hit
        from botocore.exceptions import NoCredentialsError
        from s3transfer.crt import (
            BotocoreCRTCredentialsWrapper,
            BotocoreCRTRequestSerializer,
            create_s3_crt_client,
        )

        session = _sessions()[1]
        creds = session.get_credentials()
        if creds is None:
            raise NoCredentialsError()
        crt = create_s3_crt_client(
            region,
            BotocoreCRTCredentialsWrapper(creds).to_crt_credentials_provider(),
            use_ssl=endpoint is None or endpoint.startswith("https://"),
            verify=os.environ.get("AWS_CA_BUNDLE") or None,
            target_throughput=None if target_gbps is None else int(target_gbps * 1e9 / 8),
        )
        serializer = BotocoreCRTRequestSerializer(
            session, {"region_name": region, "endpoint_url": endpoint}
        )
        _CRT[key] = (crt, serializer)
        return crt, serializer


class _CrtTransfers:
    """s3transfer's CRT transfer manager with our per-request settings: part size, number of
    connections, and CRC32C (hardware) part checksums on upload."""

    CHECKSUM = "CRC32C"

    def __init__(self, client: Any, s: TransferSettings) -> None:
        from s3transfer.crt import CRTTransferManager
        from s3transfer.manager import TransferConfig

        crt, serializer = _crt_client(client, s.crt_target_gbps)
        cfg = TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_request_concurrency=s.max_concurrency,
        )
        self._tm = CRTTransferManager(crt, serializer, config=cfg)

    def upload(self, filename: str, bucket: str, key: str) -> Any:
        return self._tm.upload(filename, bucket, key, {"ChecksumAlgorithm": self.CHECKSUM})

    def download(self, bucket: str, key: str, filename: str) -> Any:
        return self._tm.download(bucket, key, filename)

    def __enter__(self) -> _CrtTransfers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tm.__exit__(*exc)


def _transfer_manager(client: Any, s: TransferSettings, *, copy: bool = False) -> Any:
    """A transfer manager (context manager with ``upload``/``download``/``copy``) for ``s``:
    the CRT one where :func:`use_crt` says so (it cannot copy: copies stay classic)."""
    if not copy and use_crt(s):
        return _CrtTransfers(client, s)
    from boto3.s3.transfer import create_transfer_manager

    classic = replace(s, transfer_client="classic") if s.transfer_client != "classic" else s
    return create_transfer_manager(client, _transfer_config(classic))


def _is_not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


def _wait_all(futures: Iterable[Any]) -> None:
    """Wait for transfer futures; on the first failure cancel the rest and re-raise."""
    futs = list(futures)
    try:
        for f in futs:
            f.result()
    except BaseException:
        for f in futs:
            with contextlib.suppress(Exception):
                f.cancel()
        raise


class S3Storage(Storage):
    """``s3://bucket/prefix`` through one shared boto3 client and managed transfers."""

    def __init__(self, bucket: str, prefix: str = "", settings: TransferSettings | None = None):
        self.bucket = bucket
        self.prefix = _clean_key(prefix)
        self.settings = settings or TransferSettings.from_env()
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


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def open_storage(uri: str, settings: TransferSettings | None = None) -> Storage:
    """Open a storage rooted at ``uri`` (``s3://``, ``file://`` or a path)."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"storage URI must be a non-empty string, got {uri!r}")
    if is_s3_uri(uri):
        bucket, prefix = split_s3_uri(uri)
        return S3Storage(bucket, prefix, settings or TransferSettings.from_env())
    return LocalStorage(local_path_of(uri), settings)


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
