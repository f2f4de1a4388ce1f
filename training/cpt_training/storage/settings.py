"""Transfer and retry knobs for the storage backends."""

from __future__ import annotations

from dataclasses import dataclass, replace

MiB = 1024 * 1024
TRANSFER_CLIENTS = ("auto", "classic", "crt")


@dataclass(frozen=True)
class TransferSettings:
    """Transfer and retry knobs. Defaults suit a trn1/p5 node; tests shrink them.

    A stage builds them from its typed config (``cpt_training.config.StorageTuning``) and
    installs them with :func:`configure`; nothing here reads the environment.
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

    def __post_init__(self) -> None:
        if self.transfer_client not in TRANSFER_CLIENTS:
            raise ValueError(
                f"transfer_client must be one of {', '.join(TRANSFER_CLIENTS)}, "
                f"got {self.transfer_client!r}"
            )
        if self.crt_target_gbps is not None and not 0 < self.crt_target_gbps < float("inf"):
            raise ValueError(
                f"crt_target_gbps (storage.targetGbps) must be a positive number, "
                f"got {self.crt_target_gbps!r}"
            )
        if self.transfer_client == "crt" and self.max_bandwidth is not None:
            raise ValueError(
                "max_bandwidth (storage.maxBandwidth) needs the classic transfer client; "
                "set transfer_client (storage.transferClient) to auto or classic"
            )

    def with_concurrency(self, concurrency: int | None) -> TransferSettings:
        if concurrency is None:
            return self
        return replace(self, max_concurrency=max(1, int(concurrency)))


_DEFAULT: list[TransferSettings] = [TransferSettings()]


def configure(settings: TransferSettings) -> None:
    """Install the settings a storage opened without explicit ones uses in this process: a
    stage calls it once with its config's ``storage`` tuning before any I/O."""
    _DEFAULT[0] = settings


def default_settings() -> TransferSettings:
    """The settings :func:`configure` installed (the defaults until then)."""
    return _DEFAULT[0]
