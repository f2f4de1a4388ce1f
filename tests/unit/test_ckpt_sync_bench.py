"""The checkpoint transfer benchmark's pure parts: row names and goals per machine, the
machine description of a pinned run, and the carry packing for a machine without network.
No transfer and no timing here."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench import ckpt_sync_bench as csb  # noqa: E402
from bench import common, report  # noqa: E402

pytestmark = pytest.mark.unit


class _Server:
    name = "versitygw (test)"
    short = "versitygw S3 server on loopback"


def _runs() -> dict[str, list[dict[str, Any]]]:
    def run(mbps: float) -> dict[str, Any]:
        return {"seconds": 2000 / mbps, "MBps": mbps, "MBperCpuSecond": mbps / 2}

    return {
        "ours-upload": [run(900.0), run(1000.0)],
        "cli-upload": [run(400.0), run(450.0)],
        "ours-download": [run(1200.0), run(1100.0)],
        "cli-download": [run(800.0), run(700.0)],
    }


def _rows(label: str, goal_rows: bool | None) -> dict[str, dict[str, Any]]:
    items = csb._measurements(
        "versity", _Server(), _runs(), {}, 8, 256, 2_000_000_000, 2, "crc64nvme",
        label=label, goal_rows=goal_rows,
    )  # fmt: skip
    return {m["name"]: m for m in items}


def test_rows_of_another_machine_carry_its_label_and_their_own_goal() -> None:
    host = _rows("", goal_rows=True)
    dev = _rows("16core", goal_rows=True)
    assert set(host) == {
        "ckpt.sync.upload",
        "ckpt.sync.upload.client_cpu",
        "ckpt.sync.download",
        "ckpt.sync.download.client_cpu",
    }
    assert {n.replace("ckpt.sync.16core.", "ckpt.sync.") for n in dev} == set(host)
    up = dev["ckpt.sync.16core.upload"]
    assert up["value"] == 1000.0 and up["baselineValue"] == 450.0  # the best repeat of each
    assert up["ratio"] == pytest.approx(1000.0 / 450.0)
    assert common.goal_met(up) is True
    assert common.goal_met(dev["ckpt.sync.16core.download"]) is False  # 1200 / 800 = 1.5x
    assert "goal" not in dev["ckpt.sync.16core.upload.client_cpu"]


def test_a_pinned_stand_in_has_no_goal_rows() -> None:
    pinned = _rows("16core-pin2", goal_rows=False)
    assert all("goal" not in m for m in pinned.values())
    assert "ckpt.sync.16core-pin2.download" in pinned


def test_both_machines_rows_appear_in_the_goal_and_section_tables() -> None:
    items = [*_rows("", True).values(), *_rows("16core", True).values()]
    for m in items:
        m["source"] = "x.json"
    blocks = report.render_blocks(items)
    goals = blocks["goals"]
    assert "`ckpt.sync.upload`" in goals and "`ckpt.sync.16core.upload`" in goals
    assert "`ckpt.sync.16core.download.client_cpu`" in blocks["ckpt-sync"]
    assert blocks["ckpt-runs"].count("`ckpt.sync.16core.download`") == 4  # 2 repeats x 2 sides


def test_a_pinned_run_says_how_many_of_the_machines_cores_it_had(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(common, "usable_cores", lambda: 2)
    monkeypatch.setattr(csb.os, "cpu_count", lambda: 16)
    desc = csb.machine_description("lent GPU host")
    assert "2 of 16 cores (taskset" in desc and desc.endswith(", lent GPU host")
    monkeypatch.setattr(common, "usable_cores", lambda: 16)
    assert "pinned" not in csb.machine_description()


def test_the_carry_takes_the_locked_versions_of_the_clients() -> None:
    pins = csb._locked_versions(csb.CARRY_PACKAGES)
    assert len(pins) == len(csb.CARRY_PACKAGES)
    assert all("==" in p for p in pins)
    with pytest.raises(SystemExit, match="no-such-package"):
        csb._locked_versions(("no-such-package",))


def test_unpacked_wheels_put_scripts_in_bin_and_leave_out_the_cli_examples(
    tmp_path: Path,
) -> None:
    whl = tmp_path / "awscli-0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("awscli/__init__.py", "x = 1\n")
        z.writestr("awscli/examples/s3/cp.rst", "help text\n")
        z.writestr("awscli-0.data/scripts/aws", "#!python\nprint('aws')\n")
        z.writestr("awscli-0.dist-info/METADATA", "Name: awscli\n")
    site = tmp_path / "site"
    csb._unpack_wheels([whl], site)
    assert (site / "awscli" / "__init__.py").read_text() == "x = 1\n"
    assert not (site / "awscli" / "examples").exists()
    aws = site / "bin" / "aws"
    assert aws.read_text().startswith("#!python") and aws.stat().st_mode & 0o111
    assert (site / "awscli-0.dist-info" / "METADATA").is_file()


def test_a_second_run_appends_its_rows_and_replaces_only_rows_of_the_same_name(
    tmp_path: Path,
) -> None:
    whole = list(_rows("16core", True).values())
    pinned = list(_rows("16core-pin2", False).values())
    path = common.write_results("ckpt_sync-device", whole, tmp_path)
    merged = csb.merge_rows(path, pinned)
    assert [m["name"] for m in merged] == [m["name"] for m in whole + pinned]
    again = csb.merge_rows(path, whole)  # a rerun of the same label replaces its rows
    assert len(again) == len(whole)
    assert csb.merge_rows(tmp_path / "absent.json", pinned) == pinned
