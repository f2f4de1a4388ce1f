"""Storage: URI handling, local folder semantics, and S3 retries/backoff (botocore fakes)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cpt_training import storage
from cpt_training.config import StorageTuning
from cpt_training.storage import LocalStorage, S3Storage, TransferSettings, base, open_storage

pytestmark = pytest.mark.unit


def test_uris_open_the_right_backend_and_normalise_slashes(tmp_path: Path) -> None:
    s3 = open_storage("s3://my-bucket/a/b/")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.uri) == ("my-bucket", "a/b", "s3://my-bucket/a/b")
    assert s3.join("c", "d.json") == "s3://my-bucket/a/b/c/d.json"
    assert open_storage("s3://my-bucket").join("x") == "s3://my-bucket/x"
    local = open_storage(f"file://{tmp_path}/x")
    assert isinstance(local, LocalStorage)
    assert local.uri == str(tmp_path / "x")
    assert local.child("y").join("z") == str(tmp_path / "x" / "y" / "z")
    assert storage.parent_and_name("s3://b-k/p/q/") == ("s3://b-k/p", "q")


@pytest.mark.parametrize("bad", ["", "gs://bucket/x", "s3://", "http://x/y"])
def test_unsupported_uris_fail_with_a_message_naming_the_uri(bad: str) -> None:
    with pytest.raises(ValueError, match="URI"):
        open_storage(bad)


def test_keys_may_not_escape_the_root(tmp_path: Path) -> None:
    st = open_storage(str(tmp_path))
    with pytest.raises(ValueError, match=r"\.\."):
        st.write_bytes("../evil", b"x")


def test_local_storage_round_trips_and_lists_relative_keys(tmp_path: Path) -> None:
    st = open_storage(str(tmp_path / "root"))
    assert not st.exists()
    st.write_bytes("a/b/c.bin", b"123")
    st.write_json("a/m.json", {"k": [1, 2]})
    st.write_text("top.txt", "hi")
    assert st.read_bytes("a/b/c.bin") == b"123"
    assert st.read_json("a/m.json") == {"k": [1, 2]}
    assert st.list() == ["a/b/c.bin", "a/m.json", "top.txt"]
    assert st.list("a") == ["b/c.bin", "m.json"]
    assert st.list_sizes("a/b") == {"c.bin": 3}
    assert st.list_dirs() == ["a"]
    assert st.exists("a") and st.is_file("top.txt") and not st.is_file("a")
    assert st.size("a/b/c.bin") == 3
    with pytest.raises(FileNotFoundError):
        st.read_bytes("missing")
    assert st.delete_prefix("a") == 2
    assert st.list() == ["top.txt"]
    st.delete("top.txt")
    st.delete("top.txt")  # idempotent
    assert st.list() == []


def test_local_writes_are_atomic_and_temp_files_are_invisible(tmp_path: Path) -> None:
    st = open_storage(str(tmp_path))
    st.write_bytes("x.bin", b"old")
    # A writer that died half-way leaves a temp file next to the target; readers never see it.
    (tmp_path / f".x.bin{storage.TMP_MARKER}dead").write_bytes(b"ne")
    assert st.list() == ["x.bin"]
    st.write_bytes("x.bin", b"new")
    assert st.read_bytes("x.bin") == b"new"
    assert sorted(os.listdir(tmp_path)) == [f".x.bin{storage.TMP_MARKER}dead", "x.bin"]


def test_local_upload_and_download_dir_copy_trees_and_skip_identical_paths(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f1").write_bytes(b"1" * 100)
    (src / "f2").write_bytes(b"2")
    dst = open_storage(str(tmp_path / "dst"))
    assert dst.upload_dir(src, "tag", concurrency=2) == ["d/f1", "f2"]
    assert dst.list("tag") == ["d/f1", "f2"]
    assert dst.download_dir("tag", tmp_path / "back") == ["d/f1", "f2"]
    assert (tmp_path / "back" / "d" / "f1").read_bytes() == b"1" * 100
    # Uploading a folder onto itself (trainer wrote straight into the root) is a no-op.
    same = open_storage(str(src))
    assert same.upload_dir(src) == ["d/f1", "f2"]
    assert (src / "f2").read_bytes() == b"2"


def test_tree_transfers_move_completion_markers_last() -> None:
    groups = base._markers_last(
        ["b/x.pt", "shard-00000-of-00001.done.json", "manifest.json", "a/cpt-commit.json", "c"]
    )
    assert groups == [
        ["b/x.pt", "c"],
        ["a/cpt-commit.json", "manifest.json", "shard-00000-of-00001.done.json"],
    ]


def test_copy_tree_between_local_roots(tmp_path: Path) -> None:
    a = open_storage(str(tmp_path / "a"))
    a.write_bytes("x/1", b"1")
    a.write_bytes("2", b"22")
    assert storage.copy_tree(a.uri, str(tmp_path / "b")) == ["2", "x/1"]
    assert open_storage(str(tmp_path / "b")).list_sizes() == {"2": 2, "x/1": 1}


def test_stage_storage_tuning_becomes_the_transfer_settings_and_bad_values_are_rejected() -> None:
    tuning = StorageTuning.model_validate(
        {
            "maxConcurrency": 64,
            "multipartChunksizeMb": 32,
            "maxAttempts": 7,
            "retryMode": "standard",
            "targetGbps": 40,
            "hashWorkers": 3,
        }
    )
    s = tuning.transfer_settings()
    assert (s.max_concurrency, s.multipart_chunksize, s.max_attempts, s.retry_mode) == (
        64,
        32 * storage.MiB,
        7,
        "standard",
    )
    assert (s.crt_target_gbps, s.hash_workers) == (40.0, 3)
    assert StorageTuning().transfer_settings() == TransferSettings()
    assert s.with_concurrency(4).max_concurrency == 4
    with pytest.raises(ValidationError, match=r"transferClient"):
        StorageTuning.model_validate({"transferClient": "turbo"})
    with pytest.raises(ValidationError, match=r"maxConcurrency"):
        StorageTuning.model_validate({"maxConcurrency": "many"})


def test_configure_sets_the_settings_of_every_storage_opened_without_its_own(
    tmp_path: Path,
) -> None:
    tuned = TransferSettings(max_concurrency=5, hash_workers=2)
    try:
        storage.configure(tuned)
        assert storage.default_settings() is tuned
        assert open_storage(str(tmp_path)).settings is tuned
        assert open_storage("s3://unit-bucket/p").settings is tuned
    finally:
        storage.configure(TransferSettings())
    assert open_storage(str(tmp_path)).settings == TransferSettings()


# ---------------------------------------------------------------------------------------------
# Retries with backoff: a botocore event hook plays an S3 endpoint that throttles.
# ---------------------------------------------------------------------------------------------


class _Raw(io.BytesIO):
    def stream(self, amt: int = 65536, decode_content: bool = False) -> Any:
        while chunk := self.read(amt):
            yield chunk


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Any:
    from botocore.awsrequest import AWSResponse

    h = {"Content-Length": str(len(body)), **(headers or {})}
    return AWSResponse("http://fake", status, h, _Raw(body))


_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class _FlakyS3:
    """Answers ``failures`` times with 503 SlowDown, then 200 with ``body``."""

    def __init__(self, failures: int, body: bytes) -> None:
        self.failures = failures
        self.body = body
        self.calls = 0

    def __call__(self, request: Any, **_: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            return _response(503, _SLOWDOWN, {"Content-Type": "application/xml"})
        return _response(200, self.body, {"ETag": '"x"'})


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Credentials for a loopback endpoint that is never contacted, and recorded sleeps."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    sleeps: list[float] = []

    class _Time:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            sleeps.append(seconds)

    import botocore.endpoint

    monkeypatch.setattr(botocore.endpoint, "time", _Time())
    return sleeps


@pytest.mark.parametrize(("mode", "failures"), [("standard", 3), ("adaptive", 2)])
def test_throttled_requests_are_retried_with_backoff_until_they_succeed(
    fake_aws: list[float], mode: str, failures: int
) -> None:
    # (adaptive mode also rate-limits the client for real after SlowDown: keep it short)
    settings = TransferSettings(max_attempts=6, retry_mode=mode)
    st = S3Storage("unit-bucket", "p", settings)
    flaky = _FlakyS3(failures=failures, body=b"payload")
    st.client.meta.events.register_first("before-send.s3.GetObject", flaky)
    try:
        assert st.read_bytes("k") == b"payload"
    finally:
        st.client.meta.events.unregister("before-send.s3.GetObject", flaky)
    assert flaky.calls == failures + 1
    assert len(fake_aws) == failures, "one backoff sleep per retry"
    assert all(0 < s <= 20 for s in fake_aws)


def test_retries_stop_at_max_attempts_and_surface_the_s3_error(fake_aws: list[float]) -> None:
    from botocore.exceptions import ClientError

    st = S3Storage("unit-bucket", "", TransferSettings(max_attempts=3, retry_mode="standard"))
    flaky = _FlakyS3(failures=100, body=b"")
    st.client.meta.events.register_first("before-send.s3.PutObject", flaky)
    try:
        with pytest.raises(ClientError, match="SlowDown"):
            st.write_bytes("k", b"x")
    finally:
        st.client.meta.events.unregister("before-send.s3.PutObject", flaky)
    assert flaky.calls == 3
    assert len(fake_aws) == 2


def test_s3_client_is_shared_and_sized_for_the_transfer_concurrency(fake_aws: list[float]) -> None:
    s = TransferSettings(max_concurrency=48)
    c1, c2 = storage.s3_client(s), storage.s3_client(s)
    assert c1 is c2
    assert c1.meta.config.max_pool_connections >= 48
    assert c1.meta.config.retries["mode"] == "adaptive"
    assert c1.meta.endpoint_url == "http://127.0.0.1:9"


def test_storage_checkpoint_tokenize_data_and_model_dir_import_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cpt_training.storage, cpt_training.checkpoint, cpt_training.tokenize, "
        "cpt_training.data, cpt_training.model_dir; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
