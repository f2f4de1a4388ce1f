"""Commit, discover, restore and prune checkpoint tags under a root URI (S3 or local).

Layout: ``<root>/<tag>/<files…>`` with ``cpt-manifest.json`` and, written last,
``cpt-commit.json``. Only tags with a commit marker exist as far as restore is concerned;
``pretrained_weight`` (the nxd base weights) is skipped unless asked for.

Deletion order is the commit order reversed: the marker goes first, so a tag whose deletion
was interrupted is never restorable, and a later prune removes the rest as a stale tag.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_training.checkpoint.manifest import (
    COMMIT_NAME,
    CORRUPT_NAME,
    FORMAT,
    HASH_ALGORITHM,
    MANIFEST_NAME,
    PRETRAINED_TAG,
    FileEntry,
    Manifest,
    file_digest,
    hash_local_files,
    local_files,
    new_hasher,
    sha256_bytes,
    step_of_tag,
    utc_now,
    verify_local,
)
from cpt_training.checkpoint.select import FileSelector, TagFiles, choose
from cpt_training.storage import (
    S3Storage,
    Storage,
    TransferSettings,
    open_storage,
    parent_and_name,
    run_parallel,
)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be committed or restored."""


class CheckpointRefused(CheckpointError):
    """The newest committed checkpoint cannot be used by this attempt (e.g. other parallel
    degrees): decided from its manifest, before anything is downloaded. Not corruption: no
    older tag is tried, since it would silently lose the newer progress."""


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint does not match its manifest (missing, truncated or altered
    files). The message names the tag and the first problems."""


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A tag with a commit marker. ``local_path`` is set by :func:`restore`."""

    tag: str
    step: int
    uri: str
    time: str
    manifest_sha256: str = ""
    local_path: Path | None = None
    seconds: float | None = None
    """From submitting the tag to its commit (set by the syncer): what a stop on SIGTERM
    needs after its last step, which the operator sizes the pods' grace period by."""


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def upload_node_files(
    local_tag_dir: str | os.PathLike[str],
    tag_uri: str,
    node_rank: int = 0,
    *,
    concurrency: int | None = None,
    settings: TransferSettings | None = None,
    algorithm: str = HASH_ALGORITHM,
) -> list[FileEntry]:
    """Upload one node's files of a tag and return their manifest entries (checksums with
    ``algorithm``; sha256 only for comparisons and tools that need it).

    Checksumming (CRC64NVME in threads, GIL released) overlaps with the managed upload of the
    same files, which are hot in the page cache; it costs about as much CPU as reading them.
    cpt's own marker names are never uploaded from here."""
    st = open_storage(tag_uri, settings)
    rels = local_files(local_tag_dir)
    with contextlib.ExitStack() as stack:
        from concurrent.futures import ThreadPoolExecutor

        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="cpt-hash"))
        hashed = pool.submit(
            hash_local_files,
            local_tag_dir,
            rels,
            node=node_rank,
            workers=st.settings.hash_workers,
            algorithm=algorithm,
        )
        st.upload_dir(local_tag_dir, "", files=rels, concurrency=concurrency)
        entries: list[FileEntry] = hashed.result()
    return entries


def merge_entries(per_node: Iterable[Sequence[FileEntry]]) -> list[FileEntry]:
    """Merge per-node entries. The same path from two nodes is fine when identical (NxD's
    ``checkpoint``/``done`` markers); different content under one path is an error."""
    merged: dict[str, FileEntry] = {}
    for entries in per_node:
        for e in entries:
            prev = merged.get(e.path)
            if prev is None:
                merged[e.path] = e
            elif (prev.size, prev.algorithm, prev.digest) != (e.size, e.algorithm, e.digest):
                raise CheckpointError(
                    f"nodes {prev.node} and {e.node} wrote different content to {e.path!r}; "
                    "each file of a tag must be written by one node (or be identical)"
                )
    return [merged[k] for k in sorted(merged)]


def _remote_entries(st: Storage) -> list[FileEntry]:
    sizes = {k: v for k, v in st.list_sizes().items() if k not in _RESERVED}

    def one(rel: str) -> FileEntry:
        local = st.local_path(rel)
        if local is not None:
            return FileEntry(rel, sizes[rel], file_digest(local))
        assert isinstance(st, S3Storage)
        h = new_hasher(HASH_ALGORITHM)
        body = st.client.get_object(Bucket=st.bucket, Key=st._k(rel))["Body"]
        try:
            for chunk in iter(lambda: body.read(8 * 1024 * 1024), b""):
                h.update(chunk)
        finally:
            body.close()
        return FileEntry(rel, sizes[rel], h.hexdigest())

    return run_parallel(one, sorted(sizes), st.settings.hash_workers)


_RESERVED = frozenset({MANIFEST_NAME, COMMIT_NAME, CORRUPT_NAME})


def commit(
    tag_uri: str,
    *,
    step: int | None = None,
    entries: Sequence[FileEntry] | None = None,
    world: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    settings: TransferSettings | None = None,
) -> Manifest:
    """Write ``cpt-manifest.json`` then ``cpt-commit.json`` for an uploaded tag.

    ``entries`` come from :func:`upload_node_files` (all nodes, merged); when None the tag is
    checksummed where it lies (for files written straight to the root, e.g. by NxD's S3 storage).
    Before writing anything the remote listing is checked against the entries, so a tag with a
    missing or short upload is never committed."""
    st = open_storage(tag_uri, settings)
    _parent, tag = parent_and_name(st.uri)
    if step is None:
        parsed = step_of_tag(tag)
        if parsed is None and tag != PRETRAINED_TAG:
            raise CheckpointError(f"cannot infer the step of tag {tag!r}; pass step=")
        step = parsed if parsed is not None else 0
    files = list(entries) if entries is not None else _remote_entries(st)
    if not files:
        raise CheckpointError(f"refusing to commit {st.uri}: the tag has no files")
    remote = st.list_sizes()
    bad = [
        f"{e.path} ({'missing' if e.path not in remote else f'{remote[e.path]} bytes'}, "
        f"expected {e.size})"
        for e in files
        if remote.get(e.path) != e.size
    ]
    if bad:
        raise CheckpointError(
            f"refusing to commit {st.uri}: {len(bad)} file(s) not uploaded intact: "
            + ", ".join(bad[:5])
        )
    manifest = Manifest(tag=tag, step=int(step), files=files, world=world or {}, extra=extra or {})
    body = manifest.to_bytes()
    st.delete(CORRUPT_NAME)
    st.write_bytes(MANIFEST_NAME, body)
    marker = {
        "format": FORMAT,
        "tag": tag,
        "step": manifest.step,
        "created": utc_now(),
        "manifestSha256": sha256_bytes(body),
        "files": len(files),
        "totalBytes": manifest.total_bytes,
    }
    st.write_bytes(COMMIT_NAME, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
    log.info(
        "committed %s (step %d, %d files, %d bytes)", st.uri, step, len(files), marker["totalBytes"]
    )
    return manifest


def upload_and_commit(
    local_tag_dir: str | os.PathLike[str],
    tag_uri: str,
    *,
    step: int | None = None,
    world: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    concurrency: int | None = None,
    settings: TransferSettings | None = None,
    algorithm: str = HASH_ALGORITHM,
) -> Manifest:
    """Single-process convenience (convert-to-nxd, export, tests): clear whatever an earlier
    attempt left under the tag, upload, commit."""
    st = open_storage(tag_uri, settings)
    local = st.local_path()
    if local is None or local.resolve() != Path(local_tag_dir).resolve():
        uncommit(tag_uri, settings=settings)
        st.delete_prefix()
    entries = upload_node_files(
        local_tag_dir, tag_uri, 0, concurrency=concurrency, settings=settings, algorithm=algorithm
    )
    return commit(tag_uri, step=step, entries=entries, world=world, extra=extra, settings=settings)


def uncommit(tag_uri: str, *, settings: TransferSettings | None = None) -> None:
    """Remove the commit marker (the tag is no longer restorable); files stay."""
    open_storage(tag_uri, settings).delete(COMMIT_NAME)


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def _read_marker(st: Storage, tag: str) -> CommittedCheckpoint | None:
    try:
        raw = st.read_bytes(f"{tag}/{COMMIT_NAME}")
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw)
        step = int(d["step"])
        created = str(d.get("created", ""))
        msha = str(d.get("manifestSha256", ""))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring %s: unreadable commit marker", st.join(tag, COMMIT_NAME))
        return None
    return CommittedCheckpoint(tag, step, st.join(tag), created, msha)


def list_committed(
    root_uri: str,
    *,
    include_pretrained: bool = False,
    settings: TransferSettings | None = None,
) -> list[CommittedCheckpoint]:
    """Committed tags under ``root_uri``, oldest first (by step, then commit time)."""
    st = open_storage(root_uri, settings)
    tags = [
        t
        for t in st.list_dirs()
        if step_of_tag(t) is not None or (include_pretrained and t == PRETRAINED_TAG)
    ]
    found = run_parallel(lambda t: _read_marker(st, t), tags, 16)
    out = [c for c in found if c is not None]
    out.sort(key=lambda c: (c.tag != PRETRAINED_TAG, c.step, c.time))
    return out


def latest_committed(
    root_uri: str,
    *,
    include_pretrained: bool = False,
    settings: TransferSettings | None = None,
) -> CommittedCheckpoint | None:
    """The newest committed tag, or None. With ``include_pretrained`` a training tag still
    wins over ``pretrained_weight``; the latter is returned only when it is the only one."""
    found = list_committed(root_uri, include_pretrained=include_pretrained, settings=settings)
    return found[-1] if found else None


def read_manifest(tag_uri: str, *, settings: TransferSettings | None = None) -> Manifest:
    """The manifest of a committed tag, checked against the commit marker's digest."""
    st = open_storage(tag_uri, settings)
    try:
        marker = json.loads(st.read_bytes(COMMIT_NAME))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{st.uri} is not committed (no {COMMIT_NAME})") from exc
    try:
        body = st.read_bytes(MANIFEST_NAME)
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(f"{st.uri}: committed but {MANIFEST_NAME} is missing") from exc
    want = str(marker.get("manifestSha256", ""))
    if want and sha256_bytes(body) != want:
        raise CheckpointCorruptError(
            f"{st.uri}: {MANIFEST_NAME} does not match the digest in {COMMIT_NAME}"
        )
    return Manifest.from_json(json.loads(body))


# ---------------------------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------------------------


def _quarantine(tag_uri: str, reason: str, settings: TransferSettings | None) -> None:
    """Make a corrupt tag unrestorable but keep its files for inspection: the reason goes to
    ``cpt-corrupt.json``, the commit marker is deleted. A later prune removes it."""
    st = open_storage(tag_uri, settings)
    try:
        st.write_json(CORRUPT_NAME, {"reason": reason, "detected": utc_now()})
        st.delete(COMMIT_NAME)
    except Exception as exc:  # restore must go on even if the root is read-only for us
        log.warning("could not quarantine %s: %s", tag_uri, exc)


def _restore_one(
    ckpt: CommittedCheckpoint,
    target: Path,
    *,
    concurrency: int | None,
    settings: TransferSettings | None,
    only: Collection[str] | None = None,
    manifest: Manifest | None = None,
) -> Manifest:
    """Download and verify one tag into ``target``; with ``only`` just those files of it
    (a node's selection, see ``checkpoint.select``). Returns the tag's whole manifest."""
    if manifest is None:
        manifest = read_manifest(ckpt.uri, settings=settings)
    st = open_storage(ckpt.uri, settings)
    workers = st.settings.hash_workers
    wanted = manifest.by_path()
    if only is not None:
        unknown = sorted(set(only) - wanted.keys())
        if unknown:
            raise CheckpointError(
                f"{ckpt.uri}: asked to restore {len(unknown)} file(s) its manifest does not "
                f"list: {', '.join(unknown[:5])}"
            )
        wanted = {p: wanted[p] for p in sorted(only)}
        log.info(
            "restore %s: this node needs %d of %d files, %.3f of %.3f GB",
            ckpt.tag,
            len(wanted),
            len(manifest.files),
            sum(e.size for e in wanted.values()) / 1e9,
            manifest.total_bytes / 1e9,
        )
    mine = Manifest(manifest.tag, manifest.step, list(wanted.values()))
    target.mkdir(parents=True, exist_ok=True)
    # Anything local that is not wanted goes (leftovers of an earlier partial save, or files
    # another node's selection needed): the local copy holds exactly the verified files.
    for rel in local_files(target):
        if rel not in wanted:
            (target / rel).unlink()
    problems = verify_local(target, mine, workers=workers)
    # Two rounds: a mismatch right after a download may be a bad transfer, so fetch those
    # files once more before calling the tag corrupt.
    for _round in range(2):
        if not problems:
            break
        log.info("restore %s: fetching %d of %d files", ckpt.tag, len(problems), len(wanted))
        todo = sorted(problems)
        try:
            st.download_dir("", target, keys=todo, concurrency=concurrency)
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(
                f"checkpoint {ckpt.uri} (step {ckpt.step}) is corrupt: a file listed in "
                f"{MANIFEST_NAME} is gone: {exc}"
            ) from exc
        subset = Manifest(manifest.tag, manifest.step, [wanted[t] for t in todo])
        problems = verify_local(target, subset, workers=workers)
    if problems:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())[:5])
        raise CheckpointCorruptError(
            f"checkpoint {ckpt.uri} (step {ckpt.step}) is corrupt: {len(problems)} file(s) do "
            f"not match {MANIFEST_NAME}: {detail}"
        )
    # Keep the manifest locally: the copy is self-describing and a restart can reuse it. The
    # local marker says which of its files are here when the node restored a selection.
    (target / MANIFEST_NAME).write_bytes(manifest.to_bytes())
    record: dict[str, Any] = {
        "tag": ckpt.tag,
        "step": ckpt.step,
        "uri": ckpt.uri,
        "created": ckpt.time,
    }
    if only is not None:
        record["files"] = sorted(wanted)
    (target / COMMIT_NAME).write_text(json.dumps(record))
    return manifest


def _selection(
    ckpt: CommittedCheckpoint,
    select: FileSelector | None,
    settings: TransferSettings | None,
) -> tuple[Manifest | None, frozenset[str] | None]:
    """(manifest, files to fetch) of one candidate for a single-process restore."""
    if select is None:
        return None, None
    manifest = read_manifest(ckpt.uri, settings=settings)
    sel = choose(select, TagFiles(ckpt.uri, manifest, settings))
    if sel.paths is None:
        log.warning("restoring all of %s: %s", ckpt.tag, sel.reason)
    return manifest, sel.paths


def restore(
    root_uri: str,
    local_dir: str | os.PathLike[str],
    *,
    tag: str | None = None,
    include_pretrained: bool = False,
    quarantine: bool = True,
    prune_local_dir: bool = True,
    concurrency: int | None = None,
    settings: TransferSettings | None = None,
    select: FileSelector | None = None,
) -> CommittedCheckpoint | None:
    """Download the newest committed tag into ``<local_dir>/<tag>/`` and verify it.

    Files already present locally with the right size and checksum are not fetched again (a
    restarted pod on the same node restores from its disk). A tag that does not match its
    manifest raises :class:`CheckpointCorruptError` internally, is logged, quarantined (unless
    ``quarantine=False``) and the previous committed tag is tried. Returns None when there is
    no committed tag; raises :class:`CheckpointCorruptError` when every candidate is corrupt.
    With ``tag`` only that tag is tried. Afterwards other local ``step_*`` dirs are removed.
    With ``select`` (a ``checkpoint.select.FileSelector``) only the files it chooses from each
    candidate are fetched and verified; if it cannot decide, the whole tag is (logged).
    """
    local_root = Path(local_dir).absolute()
    candidates = list_committed(root_uri, include_pretrained=include_pretrained, settings=settings)
    if tag is not None:
        candidates = [c for c in candidates if c.tag == tag]
        if not candidates:
            raise CheckpointError(f"tag {tag!r} is not committed under {root_uri}")
    errors: list[str] = []
    for ckpt in reversed(candidates):
        target = local_root / ckpt.tag
        try:
            manifest, only = _selection(ckpt, select, settings)
            _restore_one(
                ckpt,
                target,
                concurrency=concurrency,
                settings=settings,
                only=only,
                manifest=manifest,
            )
        except CheckpointCorruptError as exc:
            log.error("%s; falling back to the previous committed checkpoint", exc)
            errors.append(str(exc))
            if quarantine:
                _quarantine(ckpt.uri, str(exc), settings)
            shutil.rmtree(target, ignore_errors=True)
            continue
        if prune_local_dir:
            prune_local(local_root, keep_tags=[ckpt.tag])
        log.info("restored %s (step %d) to %s", ckpt.uri, ckpt.step, target)
        return CommittedCheckpoint(
            ckpt.tag, ckpt.step, ckpt.uri, ckpt.time, ckpt.manifest_sha256, target
        )
    if errors:
        raise CheckpointCorruptError(
            f"no intact committed checkpoint under {root_uri}: " + " | ".join(errors)
        )
    return None


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def _abort_multipart(st: Storage, tag: str) -> None:
    """Abort unfinished multipart uploads under a deleted tag (a killed uploader leaves them,
    and S3 bills their parts until a lifecycle rule or this removes them)."""
    if not isinstance(st, S3Storage):
        return
    prefix = st._dir(tag)
    try:
        paginator = st.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=st.bucket, Prefix=prefix):
            for up in page.get("Uploads", []) or []:
                st.client.abort_multipart_upload(
                    Bucket=st.bucket, Key=up["Key"], UploadId=up["UploadId"]
                )
    except Exception as exc:  # best effort: a lifecycle rule is the backstop
        log.warning("could not abort multipart uploads under %s: %s", st.join(tag), exc)


def prune(
    root_uri: str,
    keep: int,
    *,
    settings: TransferSettings | None = None,
) -> list[str]:
    """Keep the newest ``keep`` committed tags; delete older committed tags (marker first),
    and uncommitted ``step_*`` tags older than the newest committed one (killed uploads,
    interrupted deletions, quarantined tags). Newer uncommitted tags may be uploads in flight
    and are left alone; ``pretrained_weight`` is never touched. Returns the deleted tags."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    st = open_storage(root_uri, settings)
    committed = list_committed(root_uri, settings=settings)
    if not committed:
        return []
    newest = committed[-1].step
    committed_tags = {c.tag for c in committed}
    doomed = [c.tag for c in committed[:-keep]]
    for t in st.list_dirs():
        s = step_of_tag(t)
        if s is not None and t not in committed_tags and s < newest:
            doomed.append(t)
    for t in doomed:
        st.delete(f"{t}/{COMMIT_NAME}")
        st.delete_prefix(t)
        _abort_multipart(st, t)
        log.info("pruned %s", st.join(t))
    return doomed


def prune_local(
    local_dir: str | os.PathLike[str],
    *,
    keep_tags: Iterable[str],
) -> list[str]:
    """Delete local ``step_*`` dirs that are older than the newest of ``keep_tags`` and not in
    it. Newer dirs (a save or upload in progress) stay."""
    root = Path(local_dir)
    keep = set(keep_tags)
    steps = [s for s in (step_of_tag(t) for t in keep) if s is not None]
    if not root.is_dir() or not steps:
        return []
    newest = max(steps)
    removed: list[str] = []
    for child in sorted(root.iterdir()):
        s = step_of_tag(child.name)
        if child.is_dir() and s is not None and child.name not in keep and s < newest:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed
