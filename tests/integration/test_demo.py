"""`make demo` (hack/demo.py) end to end, shortened: two sources at 0.9/0.1 through `cpt local`
(plan, preflight, tokenize, 2-process training with per-source evaluation, export), then the
mixture and the before/after table it prints, and the model card in the output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


def test_the_demo_prints_the_mixture_and_the_before_after_table_per_source(
    tmp_path: Path,
) -> None:
    demo = [sys.executable, str(ROOT / "hack" / "demo.py")]
    proc = subprocess.run(
        [*demo, "--workdir", str(tmp_path), "--max-steps", str(STEPS)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    run = tmp_path / ".demo" / "run"
    seen = json.loads((run / "checkpoints" / "progress.json").read_text())["tokensPerSource"]
    assert sum(seen.values()) == STEPS * 8 * 128  # 8 blocks of 128 tokens a step

    mixture = out[out.index("data mixture") :]
    for name in ("domain", "replay"):
        row = re.search(rf"^  {name} +[\d,]+ -> +([\d,]+) \(([\d.]+)%", mixture, re.M)
        assert row, mixture[:600]
        assert int(row.group(1).replace(",", "")) == seen[name]
    assert abs(seen["replay"] / sum(seen.values()) - 0.1) <= 2 / (STEPS * 8)

    evaluation = json.loads((run / "hf-model" / "eval.json").read_text())
    table = out[out.index("held-out loss per source") :]
    assert re.search(r"source +blocks +before +after +change", table)
    for name, e in [*evaluation["sources"].items(), ("total", evaluation["totals"])]:
        cells = f"{e['before']['loss']:>8.3f} {e['after']['loss']:>8.3f} {e['lossChange']:>+8.3f}"
        assert f"  {name:<8} {e['blocks']:>6} {cells}" in table, table
    assert set(evaluation["sources"]) == {"domain", "replay"}

    card = run / "hf-model" / "README.md"
    assert f"model card: {card}" in out
    from huggingface_hub import ModelCard

    assert "replay" in ModelCard.load(card).text
    assert "sample from the continually pretrained model:" in out
