"""Multi-node checkpoint sync inside the trainer: background uploads, a collective commit.

Protocol for one tag T (every rank runs a :class:`CheckpointSyncer`):

1. The trainer saves T to node-local scratch (``<local>/<T>/``: a DCP dir or an NxD tag dir)
   and calls ``syncer.submit(local_tag_dir, step=...)`` on **every rank at the same step**.
   ``ready=`` tells when this rank's files are on disk (an async-save future, a callable);
   default: already on disk. Rank 0 starts clearing leftovers of an earlier attempt under
   ``<root>/<T>/`` in the background.
2. The trainer calls ``syncer.poll()`` on **every rank at the same steps** (e.g. every step).
   While something is pending, ``poll`` does one small ``all_gather_object`` of per-rank
   status. When every rank of a node is ready (and rank 0 has cleared the tag), the node's
   uploader (its lowest rank) uploads the node's whole local tag dir in a background thread
   (:func:`~cpt_training.checkpoint.store.upload_node_files`: managed multipart transfers,
   a CRC64NVME checksum per file). The training loop never waits for the network.
3. At the first ``poll`` where every uploader reports done, the per-node file entries are
   gathered, rank 0 merges them, checks the remote listing and writes ``cpt-manifest.json``
   then ``cpt-commit.json``, and every rank learns the outcome (a third tiny gather). Rank 0
   then prunes the root in the background; uploaders prune their node-local scratch.

Why ranks never deadlock: each collective is entered by all ranks or by none. Whether
``poll`` gathers depends only on the pending queue, which changes only in ``submit`` (called
by all ranks at the same step) and in ``poll`` from gathered data that all ranks see alike;
every branch after a gather is a function of the gathered data. ``finalize()`` (all ranks,
at the end of training) repeats ``poll`` until the queue is empty; its timeout is agreed
through the same gather (any rank past its deadline fails the tag on every rank).

Only the oldest pending tag is uploaded at a time (bandwidth goes to one tag, commits stay
in order). If saves outpace uploads, a queued-but-not-started tag is superseded by the newer
one (``max_pending``). A failed save or upload fails that tag on all ranks (logged, kept in
``failures``); training goes on and the next save is tried. A killed process never commits:
the marker is written only after every node's upload finished.

Collectives go through :class:`Collective`; :func:`collective_for` wraps a
``torch.distributed`` group (creating a gloo group with a long timeout when the default
backend is NCCL/XLA, since object gathers need a CPU backend). torch is imported lazily: this
module imports without torch and works single-process without ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from cpt_training import podenv
from cpt_training.checkpoint.manifest import FileEntry, Manifest
from cpt_training.checkpoint.select import FileSelector, Selection, TagFiles, choose, union
from cpt_training.checkpoint.store import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointRefused,
    CommittedCheckpoint,
    _quarantine,
    _restore_one,
    commit,
    list_committed,
    merge_entries,
    prune,
    prune_local,
    read_manifest,
    uncommit,
    upload_node_files,
)
from cpt_training.storage import TransferSettings, open_storage

log = logging.getLogger(__name__)

GLOO_TIMEOUT = timedelta(hours=2)
"""Timeout of the gloo group we create: restore downloads run between two gathers."""


class Collective(Protocol):
    """The one collective the protocol needs, over any process group."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...


class SingleProcess:
    """The trivial collective (one process, no torch.distributed)."""

    rank = 0
    world_size = 1

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


class TorchCollective:
    """``torch.distributed.all_gather_object`` on ``group`` (None: the default group)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self._rank = dist.get_rank(group)
        self._world = dist.get_world_size(group)

    @property
    def rank(self) -> int:
        return int(self._rank)

    @property
    def world_size(self) -> int:
        return int(self._world)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self._world
        self._dist.all_gather_object(out, obj, group=self.group)
        return out


def collective_for(group: Any = None, *, want_gloo: bool = True) -> Collective:
    """The collective for this process: :class:`SingleProcess` without an initialised
    ``torch.distributed``; else ``group``, or a new gloo group over all ranks when the default
    backend is not gloo (``new_group`` is itself collective: call this on all ranks at the
    same point, typically when constructing the syncer)."""
    if "torch.distributed" not in sys.modules:  # nobody initialised it: no need to import
        return SingleProcess()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SingleProcess()
    if group is None and want_gloo and str(dist.get_backend()) != "gloo":
        group = dist.new_group(backend="gloo", timeout=GLOO_TIMEOUT)
    return TorchCollective(group)


def default_node_id() -> str:
    """Which node this process is on: ``CPT_NODE_ID`` if set, else the hostname (pod name)."""
    return podenv.node_id()


def _ready_state(ready: Any) -> tuple[bool, str | None]:
    """(ready, error) of a ``ready=`` object: None, a bool callable, a future (concurrent or
    torch), or DCP's ``AsyncSaveResponse`` (its ``upload_completion`` future counts)."""
    if ready is None:
        return True, None
    ready = getattr(ready, "upload_completion", ready)
    try:
        done = getattr(ready, "done", None)
        if callable(done):
            if not done():
                return False, None
            if hasattr(ready, "result"):
                ready.result()
            elif hasattr(ready, "wait"):
                ready.wait()
            return True, None
        return bool(ready()), None
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


@dataclass
class _Pending:
    tag: str
    step: int
    local_dir: Path
    tag_uri: str
    ready: Any
    extra: dict[str, Any]
    cleared: Future[None] | None = None
    upload: Future[list[FileEntry]] | None = None
    submitted: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SyncFailure:
    tag: str
    step: int
    reason: str


def _future_state(fut: Future[Any] | None) -> tuple[str, str | None]:
    if fut is None:
        return "idle", None
    if not fut.done():
        return "running", None
    exc = fut.exception()
    if exc is not None:
        return "failed", f"{type(exc).__name__}: {exc}"
    return "done", None


def _node_layout(reports: list[dict[str, Any]]) -> tuple[dict[str, list[int]], list[str]]:
    """node id -> its ranks, and node ids ordered by their lowest rank (= node index)."""
    nodes: dict[str, list[int]] = {}
    for r in reports:
        nodes.setdefault(r["node"], []).append(r["rank"])
    order = sorted(nodes, key=lambda n: min(nodes[n]))
    return nodes, order


class CheckpointSyncer:
    """Uploads checkpoints in the background and commits them collectively (see module doc).

    Construct on every rank at the same point (it may create a gloo group). Then per save:
    ``submit(...)`` on all ranks at the same step; ``poll()`` on all ranks at the same steps;
    ``finalize()`` on all ranks before exit. ``last_committed`` and ``failures`` report state.
    """

    def __init__(
        self,
        root_uri: str,
        *,
        keep: int = 2,
        local_keep: int = 1,
        collective: Collective | None = None,
        node_id: str | None = None,
        world_info: dict[str, Any] | None = None,
        concurrency: int | None = None,
        max_pending: int = 2,
        upload_attempts: int = 2,
        settings: TransferSettings | None = None,
        on_commit: Callable[[CommittedCheckpoint], None] | None = None,
    ) -> None:
        if keep < 1 or local_keep < 1 or upload_attempts < 1:
            raise ValueError("keep, local_keep and upload_attempts must be >= 1")
        if max_pending < 2:
            raise ValueError("max_pending must be >= 2 (the tag in flight plus one queued)")
        self.root = open_storage(root_uri, settings)
        self.root_uri = self.root.uri
        self.settings = self.root.settings
        self.keep = keep
        self.local_keep = local_keep
        self.collective: Collective = collective or collective_for()
        self.node_id = node_id or default_node_id()
        self.world_info = dict(world_info or {})
        self.concurrency = concurrency
        self.max_pending = max_pending
        self.upload_attempts = upload_attempts
        self.on_commit = on_commit
        self.last_committed: CommittedCheckpoint | None = None
        self.committed: list[CommittedCheckpoint] = []
        self.failures: list[SyncFailure] = []
        self._pending: list[_Pending] = []
        self._upload_pool = ThreadPoolExecutor(1, thread_name_prefix="cpt-ckpt-upload")
        self._maint_pool = ThreadPoolExecutor(1, thread_name_prefix="cpt-ckpt-maint")
        self._maint: list[Future[Any]] = []
        self._lock = threading.Lock()

    # -- public API ----------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.collective.rank

    @property
    def pending(self) -> list[str]:
        return [p.tag for p in self._pending]

    def submit(
        self,
        local_tag_dir: str | os.PathLike[str],
        *,
        step: int,
        tag: str | None = None,
        ready: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Queue a locally saved tag for upload and commit. All ranks, same step, same tag."""
        local = Path(local_tag_dir)
        tag = tag or local.name
        if any(p.tag == tag for p in self._pending):
            raise CheckpointError(f"checkpoint tag {tag!r} is already pending upload")
        if len(self._pending) >= self.max_pending:
            dropped = self._pending.pop()  # never the head: max_pending >= 2
            log.warning("checkpoint %s superseded by %s before its upload", dropped.tag, tag)
            self.failures.append(SyncFailure(dropped.tag, dropped.step, f"superseded by {tag}"))
        p = _Pending(tag, int(step), local, self.root.join(tag), ready, dict(extra or {}))
        if self.rank == 0:
            p.cleared = self._maint_pool.submit(self._clear_tag, p)
        self._pending.append(p)

    def poll(self) -> list[CommittedCheckpoint]:
        """Advance the protocol; returns tags committed by this call. All ranks, same steps."""
        return self._poll(expired=False)

    def finalize(
        self, timeout: float | None = None, interval: float = 0.2
    ) -> list[CommittedCheckpoint]:
        """Block until every pending tag is committed or failed. All ranks. ``timeout`` (s)
        fails what is left once any rank passes it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[CommittedCheckpoint] = []
        while self._pending:
            expired = deadline is not None and time.monotonic() > deadline
            out.extend(self._poll(expired=expired))
            if self._pending:
                time.sleep(interval)
        self.wait_maintenance()
        return out

    def wait_maintenance(self) -> None:
        """Wait for background clears and prunes (errors were logged)."""
        with self._lock:
            futs, self._maint = self._maint, []
        for f in futs:
            f.exception()

    def close(self) -> None:
        """Stop the background threads (after ``finalize``; in-flight uploads are abandoned)."""
        self._upload_pool.shutdown(wait=False, cancel_futures=True)
        self._maint_pool.shutdown(wait=True, cancel_futures=False)

    def __enter__(self) -> CheckpointSyncer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol --------------------------------------------------------------------------------

    def _clear_tag(self, p: _Pending) -> None:
        """Rank 0: remove what an earlier attempt left under the tag (unless the trainer wrote
        straight into the durable root, then there is nothing to clear)."""
        st = open_storage(p.tag_uri, self.settings)
        local = st.local_path()
        if local is not None and local.resolve() == p.local_dir.resolve():
            return
        uncommit(p.tag_uri, settings=self.settings)
        n = st.delete_prefix()
        if n:
            log.info("cleared %d stale objects under %s", n, p.tag_uri)

    def _upload(self, p: _Pending, node_index: int) -> list[FileEntry]:
        last: Exception | None = None
        for attempt in range(1, self.upload_attempts + 1):
            try:
                t0 = time.monotonic()
                entries = upload_node_files(
                    p.local_dir,
                    p.tag_uri,
                    node_index,
                    concurrency=self.concurrency,
                    settings=self.settings,
                )
                nbytes = sum(e.size for e in entries)
                dt = max(time.monotonic() - t0, 1e-9)
                log.info(
                    "uploaded %s node %d: %d files, %.1f MB in %.1fs (%.0f MB/s)",
                    p.tag,
                    node_index,
                    len(entries),
                    nbytes / 1e6,
                    dt,
                    nbytes / 1e6 / dt,
                )
                return entries
            except Exception as exc:
                last = exc
                log.warning("upload of %s failed (attempt %d): %s", p.tag, attempt, exc)
        assert last is not None
        raise last

    def _fail_head(self, reason: str) -> None:
        p = self._pending.pop(0)
        log.error("checkpoint %s (step %d) not committed: %s", p.tag, p.step, reason)
        self.failures.append(SyncFailure(p.tag, p.step, reason))

    def _poll(self, *, expired: bool) -> list[CommittedCheckpoint]:
        if not self._pending:
            return []
        coll = self.collective
        head = self._pending[0]
        ready, save_error = _ready_state(head.ready)
        cleared, clear_error = _future_state(head.cleared)
        upload, upload_error = _future_state(head.upload)
        report = {
            "rank": coll.rank,
            "node": self.node_id,
            "tag": head.tag,
            "ready": ready,
            "cleared": cleared if coll.rank == 0 else None,
            "upload": upload,
            "error": save_error or upload_error or (clear_error if coll.rank == 0 else None),
            "expired": expired,
        }
        reports = coll.all_gather_object(report)
        tags = {r["tag"] for r in reports}
        if len(tags) != 1:
            raise CheckpointError(
                f"ranks disagree on the pending checkpoint ({sorted(tags)}): submit() must be "
                "called on every rank at the same step"
            )
        nodes, order = _node_layout(reports)
        uploaders = {min(ranks) for ranks in nodes.values()}
        errors = [f"rank {r['rank']}: {r['error']}" for r in reports if r["error"]]
        if errors:
            self._fail_head("; ".join(errors[:4]))
            return []
        if any(r["expired"] for r in reports):
            self._fail_head("finalize timeout")
            return []
        if all(reports[u]["upload"] == "done" for u in uploaders):
            return self._commit_head(head, uploaders, order)
        # Start this node's upload once all of its ranks are ready and rank 0 has cleared.
        my_node_ranks = nodes[self.node_id]
        if (
            coll.rank == min(my_node_ranks)
            and head.upload is None
            and reports[0]["cleared"] == "done"
            and all(reports[r]["ready"] for r in my_node_ranks)
        ):
            head.upload = self._upload_pool.submit(self._upload, head, order.index(self.node_id))
        return []

    def _commit_head(
        self, head: _Pending, uploaders: set[int], order: list[str]
    ) -> list[CommittedCheckpoint]:
        coll = self.collective
        mine = (
            [e.to_json() for e in head.upload.result()]
            if coll.rank in uploaders and head.upload is not None
            else None
        )
        gathered = coll.all_gather_object(mine)
        outcome: dict[str, Any] | None = None
        if coll.rank == 0:
            try:
                per_node = [[FileEntry.from_json(e) for e in g] for g in gathered if g is not None]
                entries = merge_entries(per_node)
                world = {"worldSize": coll.world_size, "nodes": len(order), **self.world_info}
                manifest = commit(
                    head.tag_uri,
                    step=head.step,
                    entries=entries,
                    world=world,
                    extra=head.extra,
                    settings=self.settings,
                )
                outcome = {"ok": True, "created": manifest.created}
            except Exception as exc:
                log.exception("commit of %s failed", head.tag_uri)
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        outcome = coll.all_gather_object(outcome)[0]
        assert outcome is not None
        if not outcome["ok"]:
            self._fail_head(str(outcome["error"]))
            return []
        self._pending.pop(0)
        ckpt = CommittedCheckpoint(
            head.tag,
            head.step,
            head.tag_uri,
            str(outcome["created"]),
            seconds=round(time.monotonic() - head.submitted, 3),
        )
        self.last_committed = ckpt
        self.committed.append(ckpt)
        keep_local = [c.tag for c in self.committed[-self.local_keep :]]
        with self._lock:
            if coll.rank == 0:
                self._maint.append(self._maint_pool.submit(self._prune_remote))
            if coll.rank in uploaders:
                self._maint.append(
                    self._maint_pool.submit(
                        prune_local, head.local_dir.parent, keep_tags=keep_local
                    )
                )
        if self.on_commit is not None:
            self.on_commit(ckpt)
        return [ckpt]

    def _prune_remote(self) -> None:
        try:
            prune(self.root_uri, self.keep, settings=self.settings)
        except Exception:
            log.exception("pruning %s failed (will retry after the next commit)", self.root_uri)


def restore_distributed(
    root_uri: str,
    local_dir: str | os.PathLike[str],
    *,
    collective: Collective | None = None,
    node_id: str | None = None,
    include_pretrained: bool = False,
    concurrency: int | None = None,
    settings: TransferSettings | None = None,
    select: FileSelector | None = None,
    refuse: Callable[[str, Manifest], str | None] | None = None,
) -> CommittedCheckpoint | None:
    """:func:`~cpt_training.checkpoint.store.restore` for a multi-node job. All ranks call it.

    Rank 0 picks the candidates (so every node restores the same tag); each node's lowest rank
    downloads and verifies into its node-local ``local_dir``; if any node finds the tag
    corrupt, rank 0 quarantines it and all ranks move to the previous one together.

    With ``select`` (given on every rank or on none) each rank names the files of a candidate
    it will read, and a node fetches and verifies only the union of its ranks' files; one
    rank that cannot decide makes its node fetch the whole tag (see ``checkpoint.select``).

    With ``refuse`` (given on every rank or on none) each rank checks a candidate's tag and
    manifest before anything is downloaded; a reason from any rank raises
    :class:`CheckpointRefused` on every rank (a 70B tag written with other degrees is
    refused without fetching it). An unreadable manifest is not a refusal: the download
    then finds the tag corrupt and falls back as usual."""
    coll = collective or collective_for()
    nid = node_id or default_node_id()
    cands = (
        list_committed(root_uri, include_pretrained=include_pretrained, settings=settings)
        if coll.rank == 0
        else None
    )
    gathered = coll.all_gather_object({"rank": coll.rank, "node": nid, "cands": cands})
    candidates: list[CommittedCheckpoint] = gathered[0]["cands"]
    nodes, _order = _node_layout(gathered)
    is_loader = coll.rank == min(nodes[nid])
    errors: list[str] = []
    for ckpt in reversed(candidates):
        target = Path(local_dir).absolute() / ckpt.tag
        err: str | None = None
        only: frozenset[str] | None = None
        wants_manifest = refuse is not None or select is not None
        manifest = _manifest_on_rank(ckpt, settings) if wants_manifest else None
        if refuse is not None:
            reasons = coll.all_gather_object(_refusal_on_rank(refuse, ckpt.tag, manifest))
            refused = next((r for r in reasons if r), None)
            if refused:
                raise CheckpointRefused(refused)
        if select is not None:
            mine = _select_on_rank(select, ckpt, manifest, settings)
            sels = coll.all_gather_object(mine.to_wire())
            node_sel = union(Selection.from_wire(sels[r]) for r in sorted(nodes[nid]))
            only = node_sel.paths
            if is_loader and only is None:
                log.warning("node %s restores all of %s: %s", nid, ckpt.tag, node_sel.reason)
        if is_loader:
            try:
                _restore_one(ckpt, target, concurrency=concurrency, settings=settings, only=only)
            except (CheckpointCorruptError, CheckpointError) as exc:
                err = str(exc)
        outcomes = coll.all_gather_object(err)
        bad = [e for e in outcomes if e]
        if not bad:
            if is_loader:
                prune_local(local_dir, keep_tags=[ckpt.tag])
            return CommittedCheckpoint(
                ckpt.tag, ckpt.step, ckpt.uri, ckpt.time, ckpt.manifest_sha256, target
            )
        errors.append(bad[0])
        log.error("%s; falling back to the previous committed checkpoint", bad[0])
        if coll.rank == 0:
            _quarantine(ckpt.uri, bad[0], settings)
    if errors:
        raise CheckpointCorruptError(
            f"no intact committed checkpoint under {root_uri}: " + " | ".join(errors)
        )
    return None


def _manifest_on_rank(
    ckpt: CommittedCheckpoint, settings: TransferSettings | None
) -> Manifest | str:
    """A candidate's manifest, read once for the refusal and the selection, or why it could
    not be read; never raises (the node's download then reports the tag as corrupt)."""
    try:
        return read_manifest(ckpt.uri, settings=settings)
    except Exception as exc:
        return f"manifest unreadable: {exc}"


def _refusal_on_rank(
    refuse: Callable[[str, Manifest], str | None], tag: str, manifest: Manifest | str | None
) -> str | None:
    """This rank's verdict on a candidate from its manifest alone; never raises. An
    unreadable manifest is no refusal: the download reports it (the previous tag is tried)."""
    if not isinstance(manifest, Manifest):
        return None
    try:
        return refuse(tag, manifest)
    except Exception as exc:
        return f"checking {tag} failed: {exc}"


def _select_on_rank(
    select: FileSelector,
    ckpt: CommittedCheckpoint,
    manifest: Manifest | str | None,
    settings: TransferSettings | None,
) -> Selection:
    """This rank's files of a candidate; never raises (an unreadable manifest means "whole
    tag" here, and the node's download then reports the tag as corrupt)."""
    if not isinstance(manifest, Manifest):
        return Selection.whole(manifest or "manifest not read")
    return choose(select, TagFiles(ckpt.uri, manifest, settings))
