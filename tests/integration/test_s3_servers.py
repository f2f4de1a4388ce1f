"""The real S3 data path against two S3 implementations on loopback: moto (the default
fixture, Python) and versitygw (compiled, posix backend; hack/s3server), with each transfer
client available here (s3transfer always, the AWS CRT client where awscrt is installed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpt_training import checkpoint as ck
from cpt_training import storage
from cpt_training.checkpoint import COMMIT_NAME, MANIFEST_NAME
from cpt_training.config import StorageTuning
from cpt_training.storage import TransferSettings, open_storage, transfer
from fixtures import s3 as _s3
from fixtures.s3 import S3Server

pytestmark = pytest.mark.integration

MiB = 1024 * 1024

CLIENTS = [
    "classic",
    pytest.param(
        "crt",
        marks=pytest.mark.skipif(not storage.crt_available(), reason="awscrt is not installed"),
    ),
]


@pytest.fixture(scope="module")
def versity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from _s3.versity_fixture(tmp_path_factory.mktemp("versity"))


@pytest.fixture(params=["moto", "versity"])
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """One of the two servers, with the standard AWS environment pointing at it."""
    srv: S3Server = request.getfixturevalue("s3" if request.param == "moto" else "versity")
    for key, value in srv.env.items():
        monkeypatch.setenv(key, value)
    return srv


def _settings(client: str) -> TransferSettings:
    return TransferSettings(
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
        max_concurrency=4,
        transfer_client=client,
    )


def _tag(local: Path, step: int) -> Path:
    """Multipart-sized, small, empty and nested files, like a DCP or NxD save."""
    tag = local / ck.tag_for_step(step)
    (tag / "model").mkdir(parents=True)
    (tag / "model" / "shard_0.pt").write_bytes(os.urandom(11 * MiB + 123))
    (tag / "model" / "shard_1.pt").write_bytes(os.urandom(6 * MiB))
    (tag / ".metadata").write_bytes(os.urandom(4096))
    (tag / "empty").write_bytes(b"")
    (tag / "done").write_text("1")
    return tag


@pytest.mark.parametrize("client", CLIENTS)
def test_a_checkpoint_round_trips_through_each_server_with_each_transfer_client(
    server: S3Server, client: str, tmp_path: Path
) -> None:
    s = _settings(client)
    assert storage.use_crt(s) is (client == "crt")
    bucket = server.new_bucket()
    root = f"s3://{bucket}/run/ckpt"
    src = _tag(tmp_path / "scratch", 30)
    manifest = ck.upload_and_commit(src, f"{root}/step_30", settings=s)
    assert sorted(f.path for f in manifest.files) == [
        ".metadata",
        "done",
        "empty",
        "model/shard_0.pt",
        "model/shard_1.pt",
    ]
    remote = open_storage(f"{root}/step_30", s).list_sizes()
    assert remote["model/shard_0.pt"] == 11 * MiB + 123 and remote["empty"] == 0
    assert {COMMIT_NAME, MANIFEST_NAME} <= remote.keys()
    got = ck.restore(root, tmp_path / "restore", settings=s)
    assert got is not None and got.local_path is not None and got.step == 30
    for f in manifest.files:
        assert (got.local_path / f.path).read_bytes() == (src / f.path).read_bytes()


@pytest.mark.parametrize("client", CLIENTS)
def test_tree_operations_and_missing_keys_behave_alike_on_both_servers(
    server: S3Server, client: str, tmp_path: Path
) -> None:
    s = _settings(client)
    bucket = server.new_bucket()
    st = open_storage(f"s3://{bucket}/data", s)
    st.write_bytes("a/meta.json", b'{"x": 1}')
    (tmp_path / "up" / "d").mkdir(parents=True)
    (tmp_path / "up" / "d" / "big.bin").write_bytes(os.urandom(7 * MiB))
    (tmp_path / "up" / "_SUCCESS").write_text("")
    assert st.upload_dir(tmp_path / "up", "b") == ["_SUCCESS", "d/big.bin"]
    assert st.list_sizes() == {"a/meta.json": 8, "b/_SUCCESS": 0, "b/d/big.bin": 7 * MiB}
    assert st.list_dirs() == ["a", "b"] and st.list_dirs("b") == ["d"]
    assert st.read_json("a/meta.json") == {"x": 1} and st.exists("b/d")
    # Server-side copy (always s3transfer: the CRT manager cannot copy).
    copied = storage.copy_tree(st.join("b"), f"s3://{bucket}/copy")
    assert copied == ["_SUCCESS", "d/big.bin"]
    assert open_storage(f"s3://{bucket}/copy", s).size("d/big.bin") == 7 * MiB
    st.download_file("b/d/big.bin", tmp_path / "down" / "big.bin")
    assert (tmp_path / "down" / "big.bin").read_bytes() == (
        tmp_path / "up" / "d" / "big.bin"
    ).read_bytes()
    with pytest.raises(FileNotFoundError, match="nope"):
        st.read_bytes("nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        st.download_file("nope", tmp_path / "down" / "nope")
    with pytest.raises(FileNotFoundError):
        st.download_dir("b", tmp_path / "down2", keys=["d/big.bin", "missing"])
    assert st.delete_prefix("b") == 2
    assert st.list() == ["a/meta.json"]


def test_the_benchmark_server_reports_its_cpu_and_stops_cleanly(
    versity: S3Server, tmp_path: Path
) -> None:
    # (the `versity` fixture has put hack/s3server on sys.path and built the binary)
    import s3server  # type: ignore[import-not-found]

    with s3server.VersityServer(tmp_path / "root", log_path=tmp_path / "log") as srv:
        assert srv.endpoint_url.startswith("http://127.0.0.1:")
        assert srv.env["AWS_ENDPOINT_URL"] == srv.endpoint_url
        cpu = srv.cpu_seconds()
        assert cpu is not None and cpu >= 0
        proc = srv.proc
    assert proc is not None and proc.poll() is not None, "stopped with the context"


@pytest.mark.skipif(not storage.crt_available(), reason="awscrt is not installed")
def test_a_crt_client_with_its_own_throughput_target_moves_a_tree_both_ways(
    versity: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in versity.env.items():
        monkeypatch.setenv(key, value)
    s = StorageTuning(target_gbps=40).transfer_settings()
    assert s.crt_target_gbps == 40.0 and storage.use_crt(s)
    st = open_storage(f"s3://{versity.new_bucket()}/t", s)
    (tmp_path / "up").mkdir()
    data = os.urandom(19 * MiB + 5)
    (tmp_path / "up" / "big.bin").write_bytes(data)
    assert st.upload_dir(tmp_path / "up") == ["big.bin"]
    assert st.download_dir("", tmp_path / "down") == ["big.bin"]
    assert (tmp_path / "down" / "big.bin").read_bytes() == data
    client = storage.s3_client(s)
    assert transfer._crt_client(client, 40.0)[0] is not transfer._crt_client(client)[0]
