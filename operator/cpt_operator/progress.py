"""The operator's S3 reads: the trainer's progress.json and the newest committed checkpoint.

Credentials and endpoint come from the operator's own environment (IRSA / Pod Identity, or
AWS_* variables): training pods need no Kubernetes permissions to report progress. The reads
are blocking boto3 calls, so they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any

from cpt_operator.reconcile.observe import Checkpoint
from cpt_training import storage
from cpt_training.checkpoint import latest_committed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageView:
    """What S3 says about a run. `error` is set (and the rest empty) when it could not be
    read; a missing progress.json or no checkpoint yet is not an error."""

    progress: dict[str, Any] | None = None
    checkpoint: Checkpoint | None = None
    error: str = ""


def read_settings() -> storage.TransferSettings:
    """A small retry budget: the next resync tries again anyway, and a read that backs off for
    a minute (the workload's default budget) would hold this run's reconcile and the resync
    loop of every other run."""
    return replace(
        storage.TransferSettings(),
        max_attempts=3,
        retry_mode="standard",
        connect_timeout=5.0,
        read_timeout=20.0,
    )


def read_storage(checkpoint_uri: str, progress_uri: str) -> StorageView:
    settings = read_settings()
    try:
        try:
            parent, name = storage.parent_and_name(progress_uri)
            raw = storage.open_storage(parent, settings).read_json(name)
            progress = raw if isinstance(raw, dict) else None
        except FileNotFoundError:
            progress = None
        newest = latest_committed(checkpoint_uri, settings=settings)
    except Exception as err:  # any storage failure: report, never crash the reconcile
        log.warning("cannot read %s: %s", checkpoint_uri, err)
        return StorageView(error=f"{type(err).__name__}: {err}")
    ckpt = None if newest is None else Checkpoint(step=newest.step, uri=newest.uri)
    return StorageView(progress=progress, checkpoint=ckpt)


def read_json(uri: str) -> dict[str, Any] | None:
    """One small JSON object the workload wrote (the preflight's result.json); None when it
    is absent, unreadable or not an object (a later reconcile reads it again)."""
    try:
        parent, name = storage.parent_and_name(uri)
        raw = storage.open_storage(parent, read_settings()).read_json(name)
    except Exception as err:  # FileNotFoundError included: never crash the reconcile
        if not isinstance(err, FileNotFoundError):
            log.warning("cannot read %s: %s", uri, err)
        return None
    return raw if isinstance(raw, dict) else None


async def read_storage_async(checkpoint_uri: str, progress_uri: str) -> StorageView:
    return await asyncio.to_thread(read_storage, checkpoint_uri, progress_uri)
