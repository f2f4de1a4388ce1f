"""S3 clients and transfer managers: the shared boto3 client, the AWS CRT client and
s3transfer's managers, chosen and tuned by :class:`TransferSettings`."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from cpt_training.storage.settings import TransferSettings, default_settings

_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def s3_client(settings: TransferSettings | None = None) -> Any:
    """A shared, thread-safe boto3 S3 client per process and settings.

    The connection pool is sized to the transfer concurrency (botocore's default of 10 would
    serialise a 32-way transfer). Endpoint/credentials/region: standard AWS config only.
    """
    s = settings or default_settings()
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
            "transfer_client crt (storage.transferClient) needs the awscrt package "
            "(boto3[crt]); install it or use auto/classic"
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
