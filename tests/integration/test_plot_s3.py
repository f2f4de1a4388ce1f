"""`cpt plot` on a run's TensorBoard files in S3 (the loopback S3 server), through the
project's storage layer: the same curves as from the local folder the trainer wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt_operator import cli, plot
from cpt_training import storage
from fixtures.s3 import S3Server
from fixtures.tb_events import write_attempt

pytestmark = pytest.mark.integration


def test_cpt_plot_reads_every_attempt_from_s3_like_from_the_local_folder(
    s3_env: S3Server, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "tensorboard"
    write_attempt(local, 1, 0, 30, evals=True)
    write_attempt(local, 2, 20, 50, evals=True)
    root = f"s3://{bucket}/runs/plotted/"
    storage.open_storage(root + "tensorboard/").upload_dir(local)

    from_s3 = plot.read_curves(root)  # the checkpoint root finds tensorboard/
    assert from_s3.to_json()["attempts"] == plot.read_curves(str(local)).to_json()["attempts"]

    out = tmp_path / "plotted.png"
    assert cli.main(["plot", root, "-o", str(out), "--json", "--terminal"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(printed.splitlines()[0])
    assert [a["resumeStep"] for a in data["attempts"]] == [0, 20]
    assert "attempt 2: started at step 20" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
