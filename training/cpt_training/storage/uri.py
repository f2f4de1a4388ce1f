"""String URIs: ``s3://bucket/prefix``, plain paths and ``file://`` URIs, and relative keys."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse


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


def parent_and_name(uri: str) -> tuple[str, str]:
    """Split a URI into its parent URI and last component."""
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        head, _, name = key.rpartition("/")
        return (f"s3://{bucket}/{head}" if head else f"s3://{bucket}"), name
    p = local_path_of(uri)
    return str(p.parent), p.name
