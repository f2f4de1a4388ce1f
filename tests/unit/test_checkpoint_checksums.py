"""File checksums of checkpoint manifests: CRC64NVME for new tags, sha256 tags still verify.

A manifest written before the switch (every entry under ``"sha256"``) is produced here the way
the old code wrote it, byte for byte, and must restore, detect corruption and quarantine
exactly as before."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from cpt_training import checkpoint as ck
from cpt_training.checkpoint import COMMIT_NAME, CORRUPT_NAME, MANIFEST_NAME, Selection, TagFiles
from cpt_training.checkpoint.manifest import (
    FORMAT,
    digest_bytes,
    file_digest,
    hash_local_files,
    new_hasher,
)
from cpt_training.storage import open_storage
from fixtures.legacy_ckpt import commit_the_old_way

pytestmark = pytest.mark.unit


def tag_dir(tmp: Path, step: int) -> Path:
    d = tmp / "scratch" / f"step_{step}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "rank_0.pt").write_bytes(bytes([step]) * 70_000)
    (d / "model" / "rank_1.pt").write_bytes(bytes([step, 1]) * 50_000)
    (d / "done").write_bytes(b"1")
    return d


def test_the_crcs_match_their_published_check_values() -> None:
    # The standard check input "123456789" (CRC-64/NVME and CRC-32C/Castagnoli catalogues).
    assert digest_bytes(b"123456789", "crc64nvme") == "ae8b14860a799888"
    assert digest_bytes(b"123456789", "crc32c") == "e3069283"
    assert digest_bytes(b"123456789", "sha256") == hashlib.sha256(b"123456789").hexdigest()
    assert digest_bytes(b"", "crc64nvme") == "0" * 16


@pytest.mark.parametrize("algorithm", ["crc64nvme", "crc32c", "sha256"])
def test_a_file_read_in_chunks_has_the_digest_of_its_whole_bytes(
    tmp_path: Path, algorithm: str
) -> None:
    data = os.urandom(9 * 1024 * 1024 + 123)  # crosses the 4 MiB read buffer twice
    (tmp_path / "f").write_bytes(data)
    assert file_digest(tmp_path / "f", algorithm) == digest_bytes(data, algorithm)
    h = new_hasher(algorithm)
    for i in range(0, len(data), 1_000_003):
        h.update(memoryview(data)[i : i + 1_000_003])
    assert h.hexdigest() == digest_bytes(data, algorithm)


def test_a_single_flipped_bit_changes_the_crc64nvme(tmp_path: Path) -> None:
    data = bytearray(os.urandom(1 << 20))
    before = digest_bytes(bytes(data))
    data[654_321] ^= 0x10
    assert digest_bytes(bytes(data)) != before


def test_new_manifests_name_crc64nvme_per_file_and_read_back_equal(tmp_path: Path) -> None:
    m = ck.upload_and_commit(tag_dir(tmp_path, 3), str(tmp_path / "root" / "step_3"))
    raw = json.loads((tmp_path / "root" / "step_3" / MANIFEST_NAME).read_text())
    assert raw["algorithm"] == "crc64nvme"
    assert all(set(f) == {"path", "size", "node", "crc64nvme"} for f in raw["files"])
    entry = m.by_path()["model/rank_1.pt"]
    assert entry.digest == file_digest(tmp_path / "scratch" / "step_3" / "model" / "rank_1.pt")
    assert ck.read_manifest(str(tmp_path / "root" / "step_3")).files == m.files


def test_an_unknown_checksum_algorithm_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'md5'; allowed: crc64nvme, crc32c, sha256"):
        ck.Manifest.from_json(
            {
                "format": FORMAT,
                "tag": "step_1",
                "step": 1,
                "algorithm": "md5",
                "files": [{"path": "a", "size": 1, "md5": "00"}],
            }
        )
    with pytest.raises(ValueError, match="'md5'"):
        hash_local_files(".", [], algorithm="md5")


def test_a_manifest_written_with_sha256_still_restores_and_verifies(tmp_path: Path) -> None:
    root = tmp_path / "root"
    commit_the_old_way(tag_dir(tmp_path, 5), str(root / "step_5"), 5)
    manifest = ck.read_manifest(str(root / "step_5"))
    assert {f.algorithm for f in manifest.files} == {"sha256"}
    got = ck.restore(str(root), tmp_path / "restore")
    assert got is not None and got.tag == "step_5" and got.local_path is not None
    src = tmp_path / "scratch" / "step_5"
    for rel in ("model/rank_0.pt", "model/rank_1.pt", "done"):
        assert (got.local_path / rel).read_bytes() == (src / rel).read_bytes()
    # The local copy keeps the sha256 entries, and a restart re-verifies it without fetching.
    local = json.loads((got.local_path / MANIFEST_NAME).read_text())
    assert all("sha256" in f and "crc64nvme" not in f for f in local["files"])
    open_storage(str(root / "step_5")).delete("model/rank_0.pt")
    assert ck.restore(str(root), tmp_path / "restore") is not None


def test_a_corrupted_sha256_tag_is_detected_quarantined_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    ck.upload_and_commit(tag_dir(tmp_path, 1), str(root / "step_1"))  # new format
    commit_the_old_way(tag_dir(tmp_path, 2), str(root / "step_2"), 2)  # old format, newer
    victim = root / "step_2" / "model" / "rank_1.pt"
    data = bytearray(victim.read_bytes())
    data[99_999] ^= 0x01
    victim.write_bytes(bytes(data))
    got = ck.restore(str(root), tmp_path / "restore")
    assert got is not None and got.tag == "step_1"
    assert "step_2 (step 2) is corrupt" in caplog.text
    assert "model/rank_1.pt: sha256" in caplog.text
    assert not (root / "step_2" / COMMIT_NAME).exists()
    assert "sha256" in json.loads((root / "step_2" / CORRUPT_NAME).read_text())["reason"]


def test_per_node_selection_checks_small_files_with_the_entrys_own_algorithm(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    commit_the_old_way(tag_dir(tmp_path, 7), str(root / "step_7"), 7)
    ck.upload_and_commit(tag_dir(tmp_path, 8), str(root / "step_8"))
    for step in (7, 8):
        uri = str(root / f"step_{step}")
        view = TagFiles(uri, ck.read_manifest(uri))
        assert view.read_bytes("done") == b"1"
        (root / f"step_{step}" / "done").write_bytes(b"2")
        with pytest.raises(ValueError, match="does not match the manifest"):
            view.read_bytes("done")
        (root / f"step_{step}" / "done").write_bytes(b"1")
    got = ck.restore(
        str(root), tmp_path / "restore", tag="step_7", select=lambda v: Selection.of(["done"])
    )
    assert got is not None and got.local_path is not None
    assert sorted(p.name for p in got.local_path.rglob("*.pt")) == []


def test_merging_the_same_path_hashed_two_ways_is_a_conflict() -> None:
    a = ck.FileEntry("done", 1, "aa", 0, "sha256")
    b = ck.FileEntry("done", 1, "aa", 1, "crc64nvme")
    with pytest.raises(ck.CheckpointError, match="different content"):
        ck.merge_entries([[a], [b]])
