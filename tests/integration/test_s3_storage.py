"""Storage against the loopback S3 server (moto server mode), with local parity and faults."""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cpt_training import storage
from cpt_training.storage import Storage, TransferSettings, open_storage

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """The same tests on a local folder and on an S3 prefix."""
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("bucket")
    return open_storage(f"s3://{bucket}/some/prefix/")


def test_both_backends_store_list_and_delete_alike(root: Storage) -> None:
    assert not root.exists()
    root.write_bytes("step_1/a.bin", b"a" * 10)
    root.write_json("step_1/meta.json", {"x": 1})
    root.write_bytes("step_10/b.bin", b"b")
    root.write_text("progress.json", "{}")
    assert root.exists() and root.exists("step_1") and root.exists("step_1/a.bin")
    assert not root.exists("step_2") and not root.is_file("step_1")
    assert root.list() == ["progress.json", "step_1/a.bin", "step_1/meta.json", "step_10/b.bin"]
    # A prefix is a directory: "step_1" does not match "step_10".
    assert root.list_sizes("step_1") == {"a.bin": 10, "meta.json": 13}
    assert root.list_dirs() == ["step_1", "step_10"]
    assert root.read_json("step_1/meta.json") == {"x": 1}
    assert root.size("step_1/a.bin") == 10
    with pytest.raises(FileNotFoundError):
        root.read_bytes("step_1/nope")
    with pytest.raises(FileNotFoundError):
        root.size("nope")
    assert root.child("step_10").list() == ["b.bin"]
    assert root.delete_prefix("step_1") == 2
    assert root.list() == ["progress.json", "step_10/b.bin"]
    assert storage.read_json(root.join("progress.json")) == {}
    assert root.delete_prefix() == 2
    assert root.list() == []


def test_both_backends_move_directory_trees(root: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel, size in {"model/w0.pt": 3000, "model/w1.pt": 10, "optim/o.pt": 0, "done": 1}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(os.urandom(size))
    assert root.upload_dir(src, "step_5", concurrency=3) == [
        "done",
        "model/w0.pt",
        "model/w1.pt",
        "optim/o.pt",
    ]
    assert root.list_sizes("step_5")["model/w0.pt"] == 3000
    out = tmp_path / "out"
    assert root.download_dir("step_5", out, keys=["model/w1.pt"]) == ["model/w1.pt"]
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["w1.pt"]
    root.download_dir("step_5", out)
    for rel in ("model/w0.pt", "optim/o.pt", "done"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    with pytest.raises(FileNotFoundError):
        root.download_dir("step_5", out, keys=["missing.pt"])


def test_large_files_go_up_as_multipart_and_come_back_intact(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    settings = TransferSettings(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4
    )
    st = open_storage(f"s3://{bucket}/ckpt", settings)
    src = tmp_path / "src"
    src.mkdir()
    payloads = {f"shard_{i}.pt": os.urandom(11 * MiB + i) for i in range(3)}
    for name, data in payloads.items():
        (src / name).write_bytes(data)
    st.upload_dir(src, "step_1")
    client = storage.s3_client(settings)
    for name in payloads:
        head = client.head_object(Bucket=bucket, Key=f"ckpt/step_1/{name}")
        assert head["ETag"].strip('"').endswith("-3"), "11 MiB in 5 MiB parts = 3 parts"
    st.download_dir("step_1", tmp_path / "dst")
    for name, data in payloads.items():
        assert (tmp_path / "dst" / name).read_bytes() == data


def test_copy_tree_takes_every_route_between_local_and_s3(
    s3_env: Any, bucket: str, tmp_path: Path
) -> None:
    local = open_storage(str(tmp_path / "a"))
    local.write_bytes("x/1.bin", os.urandom(6 * MiB))
    local.write_bytes("cpt-commit.json", b"{}")
    s3_a, s3_b = f"s3://{bucket}/a", f"s3://{bucket}/b"
    expected = ["cpt-commit.json", "x/1.bin"]
    assert sorted(storage.copy_tree(local.uri, s3_a)) == expected
    assert sorted(storage.copy_tree(s3_a, s3_b, concurrency=2)) == expected  # server-side
    assert sorted(storage.copy_tree(s3_b, str(tmp_path / "c"))) == expected
    assert (tmp_path / "c" / "x" / "1.bin").read_bytes() == local.read_bytes("x/1.bin")


def test_uri_level_helpers_work_on_s3(s3_env: Any, bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/runs/r1/progress.json"
    assert not storage.exists(uri)
    storage.write_json(uri, {"step": 3})
    assert storage.exists(uri) and storage.read_json(uri) == {"step": 3}
    storage.write_bytes(f"s3://{bucket}/runs/r1/blob", b"\x00\x01")
    assert storage.read_bytes(f"s3://{bucket}/runs/r1/blob") == b"\x00\x01"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("z")
    storage.upload_dir(tmp_path / "d", f"s3://{bucket}/runs/r2", concurrency=1)
    storage.download_dir(f"s3://{bucket}/runs/r2", tmp_path / "e")
    assert (tmp_path / "e" / "f").read_text() == "z"


# ---------------------------------------------------------------------------------------------
# A faulty S3 in front of the real one: a tiny HTTP proxy that throttles every Nth request.
# ---------------------------------------------------------------------------------------------

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>x</RequestId></Error>"
)


class FaultProxy:
    """Forwards S3 requests to ``upstream``, answering every ``every``-th with 503 SlowDown
    (or 500 InternalError) after reading the request body, as a throttled S3 would."""

    def __init__(self, upstream: str, every: int) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.every = every
        self.count = 0
        self.faults = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.count += 1
                    fault = proxy.count % proxy.every == 0
                    if fault:
                        proxy.faults += 1
                if fault:
                    code = 503 if proxy.faults % 2 else 500
                    payload = (
                        _SLOWDOWN
                        if code == 503
                        else _SLOWDOWN.replace(b"SlowDown", b"InternalError")
                    )
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"
                }
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # A HEAD answer has no body but the object's length (clients such as the CRT
                # size their ranged GETs by it).
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_s3(s3_env: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    upstream = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL"]
    proxy = FaultProxy(upstream, every=4)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    yield proxy
    proxy.close()


def test_transfers_survive_an_s3_that_throttles_and_fails_every_fourth_request(
    bucket: str, faulty_s3: FaultProxy, tmp_path: Path
) -> None:
    settings = TransferSettings(
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
        max_concurrency=4,
        max_attempts=8,
        retry_mode="standard",
    )
    st = open_storage(f"s3://{bucket}/flaky", settings)
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}.bin": os.urandom(size) for i, size in enumerate([12 * MiB, 100, 7 * MiB])}
    for name, data in files.items():
        (src / name).write_bytes(data)
    st.upload_dir(src)
    st.write_json("meta.json", {"ok": True})
    assert st.list() == ["f0.bin", "f1.bin", "f2.bin", "meta.json"]
    st.download_dir("", tmp_path / "dst")
    for name, data in files.items():
        assert (tmp_path / "dst" / name).read_bytes() == data
    assert st.read_json("meta.json") == {"ok": True}
    assert faulty_s3.faults >= 5, "the proxy really injected faults"
