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
Two clients (``transfer_client``, see :func:`use_crt`): the AWS CRT S3 client (``awscrt``,
the C data path the AWS CLI v2 uses: no GIL, hardware CRC32C part checksums, its own connection
pool) wherever ``awscrt`` is installed, and boto3's s3transfer (Python threads) otherwise or when
asked. Requests other than file transfers (list, head, small puts) always go through one shared
boto3 client. Retries and backoff: botocore's for that client (``adaptive`` retry mode by
default: exponential backoff with jitter plus client-side rate limiting when S3 answers
SlowDown) and s3transfer's transfers; the CRT client retries with its own exponential backoff.
The endpoint and credentials come only from the standard AWS configuration
(``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, web identity, ``~/.aws/config`` ...,
``AWS_CA_BUNDLE``). Knobs are in :class:`TransferSettings`, built from a stage's typed
``storage`` config (:class:`cpt_training.config.StorageTuning`) and installed by
:func:`configure`.
"""

from __future__ import annotations

from cpt_training.storage.api import (
    copy_tree,
    download_dir,
    exists,
    join_uri,
    open_storage,
    read_bytes,
    read_json,
    run_parallel,
    upload_dir,
    write_bytes,
    write_json,
)
from cpt_training.storage.base import MARKER_NAMES, TMP_MARKER, Storage
from cpt_training.storage.local import LocalStorage
from cpt_training.storage.s3 import S3Storage
from cpt_training.storage.settings import (
    TRANSFER_CLIENTS,
    MiB,
    TransferSettings,
    configure,
    default_settings,
)
from cpt_training.storage.transfer import crt_available, s3_client, use_crt
from cpt_training.storage.uri import is_s3_uri, local_path_of, parent_and_name, split_s3_uri

__all__ = [
    "MARKER_NAMES",
    "TMP_MARKER",
    "TRANSFER_CLIENTS",
    "LocalStorage",
    "MiB",
    "S3Storage",
    "Storage",
    "TransferSettings",
    "configure",
    "copy_tree",
    "crt_available",
    "default_settings",
    "download_dir",
    "exists",
    "is_s3_uri",
    "join_uri",
    "local_path_of",
    "open_storage",
    "parent_and_name",
    "read_bytes",
    "read_json",
    "run_parallel",
    "s3_client",
    "split_s3_uri",
    "upload_dir",
    "use_crt",
    "write_bytes",
    "write_json",
]
