"""Transfer and retry knobs for the storage backends."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

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
