"""`cpt plot`: every attempt's TensorBoard scalars on one picture, resume steps marked.

The event files are written by the trainer's own MetricsSink (torch's SummaryWriter); the PNG
is read back and its pixels checked where the markers must be, not only its existence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpt_operator import cli, plot
from fixtures.tb_events import write_attempt

pytestmark = pytest.mark.unit


@pytest.fixture
def failed_and_resumed(tmp_path: Path) -> Path:
    """Attempt 1 logs steps 1..30 and dies (last commit at 20); attempt 2 resumes at 20."""
    tb = tmp_path / "checkpoints" / "tensorboard"
    write_attempt(tb, 1, 0, 30, evals=True)
    write_attempt(tb, 2, 20, 50, evals=True)
    return tb


def test_curves_hold_every_attempt_with_its_resume_step(failed_and_resumed: Path) -> None:
    curves = plot.read_curves(str(failed_and_resumed))
    data = curves.to_json()
    assert [(a["attempt"], a["resumeStep"]) for a in data["attempts"]] == [(1, 0), (2, 20)]
    first, second = data["attempts"]
    assert [s for s, _ in first["series"]["train/loss"]] == list(range(1, 31))
    assert [s for s, _ in second["series"]["train/loss"]] == list(range(21, 51))
    assert second["series"]["train/loss"][-1][1] == pytest.approx(5.0 - 0.05 * 50)
    assert data["panels"] == ["train/loss", "train/lr", "perf/tokens_per_sec", "eval/*/loss"]
    assert curves.eval_sources() == ["domain", "replay"]
    assert [s for s, _ in second["series"]["eval/domain/loss"]] == [25, 50]


def test_a_checkpoint_root_finds_its_tensorboard_folder(failed_and_resumed: Path) -> None:
    curves = plot.read_curves(str(failed_and_resumed.parent))
    assert [a.number for a in curves.attempts] == [1, 2]


def test_without_the_start_tag_the_step_before_the_first_logged_one_is_the_resume_step(
    tmp_path: Path,
) -> None:
    write_attempt(tmp_path, 1, 0, 10, evals=False, start_tag=False)
    write_attempt(tmp_path, 2, 8, 20, evals=False, start_tag=False)
    assert [a.resume_step for a in plot.read_curves(str(tmp_path)).attempts] == [0, 8]


def test_no_event_files_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(plot.PlotError, match=str(tmp_path)):
        plot.read_curves(str(tmp_path))


def _rgb(colour: str) -> np.ndarray[Any, Any]:
    from matplotlib.colors import to_rgb

    return np.array(to_rgb(colour))


def _column_share(png: np.ndarray[Any, Any], x: int, rows: range, colour: str) -> float:
    """Share of the rows whose pixels at column x (+-1) are close to colour."""
    pixels = png[rows.start : rows.stop, x - 1 : x + 2, :3]  # the line may straddle two
    close = np.abs(pixels - _rgb(colour)).max(axis=2) < 0.2
    return float(close.any(axis=1).mean())


def test_the_png_shows_each_series_and_a_marker_at_each_resume_step(
    failed_and_resumed: Path, tmp_path: Path
) -> None:
    from matplotlib.image import imread

    curves = plot.read_curves(str(failed_and_resumed))
    out = tmp_path / "curves.png"
    fig = plot.render_png(curves, out)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == [
        "training loss",
        "learning rate",
        "tokens/s",
        "held-out loss per source",
    ]
    loss_lines = [ln for ln in axes[0].get_lines() if ln.get_linestyle() == "-"]
    assert [list(ln.get_xdata()) for ln in loss_lines] == [list(range(1, 31)), list(range(21, 51))]
    markers = [ln for ln in axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_xdata()[0] for ln in markers] == [0, 20]
    assert len([ln for ln in axes[3].get_lines() if ln.get_linestyle() == "-"]) == 4

    png = imread(out)
    height = png.shape[0]
    ax = axes[0]
    bbox = ax.get_window_extent()
    rows = range(int(height - bbox.y1) + 3, int(height - bbox.y0) - 3)
    at_resume = round(ax.transData.transform((20, 0))[0])
    elsewhere = round(ax.transData.transform((40, 0))[0])
    # The dashed marker of attempt 2 (colour C1) covers much of its column; step 40 only
    # crosses attempt 2's loss line.
    assert _column_share(png, at_resume, rows, "C1") > 0.3
    assert _column_share(png, elsewhere, rows, "C1") < 0.1
    assert _column_share(png, elsewhere, rows, "C0") < 0.05  # attempt 1 ended at step 30


def test_the_terminal_drawing_marks_attempts_and_resume_steps(failed_and_resumed: Path) -> None:
    text = plot.render_text(plot.read_curves(str(failed_and_resumed)), width=60, height=10)
    grid = [line[10:] for line in text.splitlines()[1:11]]
    column_20 = round(20 / 50 * 59)
    assert all(len(row) > column_20 and row[column_20] in "|12" for row in grid)
    assert "1" in "".join(grid) and "2" in "".join(grid)
    assert "attempt 2: started at step 20" in text


def test_cpt_plot_writes_the_png_and_prints_the_data(
    failed_and_resumed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.png"
    rc = cli.main(["plot", str(failed_and_resumed.parent), "-o", str(out), "--json"])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(capsys.readouterr().out)
    assert [a["resumeStep"] for a in data["attempts"]] == [0, 20]


def test_cpt_plot_of_an_unknown_folder_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["plot", str(tmp_path), "--terminal"]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_a_run_name_without_a_reachable_cluster_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # "llama" is no folder here: it names a run
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["plot", "llama", "-n", "team"]) == 1
    assert "cannot read ContinualPretrain 'llama' from the cluster" in capsys.readouterr().err
