"""The children's watches: Jobs, PyTorchJobs and Pods carrying the run label, selected by the
API server.

Why not kopf's watches: a kopf handler's label filter runs in the operator, so kopf streams
every Pod and every Job of the watched namespaces (on a shared EKS cluster: all of them).
kopf can ask the API server to select labels (``settings.watching.label_selectors``), but
each event still passes through its per-object workers and queues: measured on the
benchmark's burst of 200 new runs (docs/PERFORMANCE.md section 5) that cost the operator
3.3 CPU-s instead of 1.7, a p99 of 5.1 s instead of 1.9, and 217 MiB instead of 148 with
1,000 runs. Here the API server sends only cpt's children (``labelSelector=cpt.dev/run``),
each event line is decoded and handed to the child index at once, and nothing is queued per
object.

One :func:`follow` per kind and watched scope. It resumes from the last resourceVersion it
saw (bookmarks included). When the API server no longer has that version (410 Gone) it starts
over from the current state, whose objects arrive as ADDED events; children deleted in
between would be missed, so ``on_restart`` asks for a verification LIST. Any other failure is
retried with a capped exponential backoff; only cancellation ends the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

import msgspec

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300
"""The server ends each watch request after this long; the next one resumes where it was."""
BACKOFF_S = (0.5, 30.0)


class Gone(Exception):
    """The resourceVersion a watch asked for is no longer available (HTTP 410)."""


class WatchApi(Protocol):
    def watch_labelled(
        self, kind: tuple[str, str], namespace: str | None, resource_version: str | None
    ) -> AsyncIterator[str]:
        """Raw watch event lines of `kind` carrying the run label; raises Gone on 410."""
        ...


Deliver = Callable[[str, dict[str, Any]], None]


def parse(line: str | bytes, kind: tuple[str, str]) -> tuple[str, dict[str, Any]]:
    """(type, object) of one watch line; the object carries its apiVersion and kind."""
    ev = msgspec.json.decode(line)
    if not isinstance(ev, Mapping):
        raise ValueError(f"not a watch event: {str(line)[:200]!r}")
    obj = ev.get("object")
    obj = dict(obj) if isinstance(obj, Mapping) else {}
    type_ = str(ev.get("type") or "")
    if type_ == "ERROR":
        if obj.get("code") == 410:
            raise Gone(str(obj.get("message") or "resourceVersion too old"))
        raise RuntimeError(f"watch error: {obj.get('code')} {obj.get('message')}")
    obj.setdefault("apiVersion", kind[0])
    obj.setdefault("kind", kind[1])
    return type_, obj


def _name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')} {meta.get('namespace')}/{meta.get('name')}"


async def follow(
    api: WatchApi,
    kind: tuple[str, str],
    namespace: str | None,
    deliver: Deliver,
    *,
    on_restart: Callable[[], Awaitable[None]] | None = None,
    backoff: tuple[float, float] = BACKOFF_S,
) -> None:
    """Deliver every change of `kind`'s labelled objects in `namespace` (None: all), forever."""
    loop = asyncio.get_running_loop()
    version: str | None = None
    delay = backoff[0]
    started = False
    while True:
        try:
            if started and version is None and on_restart is not None:
                await on_restart()
            started = True
            t0, lines = loop.time(), 0
            async for line in api.watch_labelled(kind, namespace, version):
                type_, obj = parse(line, kind)
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                lines += 1
                delay = backoff[0]
                if type_ == "BOOKMARK":
                    continue
                try:
                    deliver(type_, obj)
                except Exception:  # a bad event must not replay forever: logged, skipped
                    log.exception("%s event for %s not applied", type_, _name(obj))
            if not lines and loop.time() - t0 < 1.0:
                raise RuntimeError("the watch ended at once without an event")
        except asyncio.CancelledError:
            raise
        except Gone as err:
            log.info("%s watch in %s restarts from now: %s", kind[1], namespace or "*", err)
            version = None
        except Exception as err:  # the API server restarted, a connection broke, ...
            log.warning(
                "%s watch in %s failed (retry in %.1fs): %s",
                kind[1],
                namespace or "*",
                delay,
                err,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff[1])
