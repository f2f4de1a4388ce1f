"""Checkpoints in durable storage: manifest + commit marker, restore, prune, multi-node sync.

Stable API (trainers, convert and export jobs use these names)::

    tag_for_step(step) -> "step_<N>";  step_of_tag(tag) -> int | None
    upload_node_files(local_tag_dir, tag_uri, node_rank) -> list[FileEntry]
    commit(tag_uri, *, step=None, entries=None, world=None, extra=None) -> Manifest
    upload_and_commit(local_tag_dir, tag_uri, *, step=None, ...) -> Manifest   # one process
    latest_committed(root_uri, *, include_pretrained=False) -> CommittedCheckpoint | None
    list_committed(root_uri, *, include_pretrained=False) -> list[CommittedCheckpoint]
    read_manifest(tag_uri) -> Manifest
    restore(root_uri, local_dir, *, tag=None, include_pretrained=False, select=None)
        -> CommittedCheckpoint | None       # .local_path = <local_dir>/<tag>
    restore_distributed(root_uri, local_dir, *, collective=None, select=None, refuse=None)
        -> ...  # all ranks; refuse(tag, manifest) -> reason: CheckpointRefused, no download
    Selection, TagFiles, FileSelector: per-rank file selection for restore (``select``)
    prune(root_uri, keep) -> deleted tags;  prune_local(local_dir, keep_tags=[...])
    CheckpointSyncer(root_uri, keep=2, ...).submit(local_tag_dir, step=N, ready=...)
        .poll() / .finalize() / .close(), .last_committed, .failures
    CheckpointError, CheckpointCorruptError, CheckpointRefused
    MANIFEST_NAME = "cpt-manifest.json", COMMIT_NAME = "cpt-commit.json",
    PRETRAINED_TAG = "pretrained_weight"

See ``store`` (single-process operations), ``sync`` (the multi-node protocol) and
docs/data.md. Nothing here imports torch at import time.
"""

from cpt_training.checkpoint.manifest import (
    COMMIT_NAME,
    CORRUPT_NAME,
    HASH_ALGORITHM,
    MANIFEST_NAME,
    PRETRAINED_TAG,
    FileEntry,
    Manifest,
    file_digest,
    sha256_file,
    step_of_tag,
    tag_for_step,
    verify_local,
)
from cpt_training.checkpoint.select import (
    FileSelector,
    Selection,
    TagFiles,
)
from cpt_training.checkpoint.store import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointRefused,
    CommittedCheckpoint,
    commit,
    latest_committed,
    list_committed,
    merge_entries,
    prune,
    prune_local,
    read_manifest,
    restore,
    uncommit,
    upload_and_commit,
    upload_node_files,
)
from cpt_training.checkpoint.sync import (
    CheckpointSyncer,
    Collective,
    SingleProcess,
    SyncFailure,
    TorchCollective,
    collective_for,
    default_node_id,
    restore_distributed,
)

__all__ = [
    "COMMIT_NAME",
    "CORRUPT_NAME",
    "HASH_ALGORITHM",
    "MANIFEST_NAME",
    "PRETRAINED_TAG",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointRefused",
    "CheckpointSyncer",
    "Collective",
    "CommittedCheckpoint",
    "FileEntry",
    "FileSelector",
    "Manifest",
    "Selection",
    "SingleProcess",
    "SyncFailure",
    "TagFiles",
    "TorchCollective",
    "collective_for",
    "commit",
    "default_node_id",
    "file_digest",
    "latest_committed",
    "list_committed",
    "merge_entries",
    "prune",
    "prune_local",
    "read_manifest",
    "restore",
    "restore_distributed",
    "sha256_file",
    "step_of_tag",
    "tag_for_step",
    "uncommit",
    "upload_and_commit",
    "upload_node_files",
    "verify_local",
]
