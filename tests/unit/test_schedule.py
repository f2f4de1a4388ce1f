"""The learning-rate curve: warmup, hold, decay to min_lr, exactly."""

from __future__ import annotations

import itertools
import math

import pytest

from cpt_training.config import OptimizerConfig
from cpt_training.schedule import LrSchedule

pytestmark = pytest.mark.unit


def test_warmup_is_linear_and_never_zero() -> None:
    s = LrSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, constant_steps=0, max_steps=10)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_constant_hold_keeps_the_peak_for_constant_steps() -> None:
    s = LrSchedule(lr=2.0, min_lr=0.0, warmup_steps=2, constant_steps=3, max_steps=20)
    assert [s(i) for i in range(2, 5)] == [2.0, 2.0, 2.0]
    assert s(5) < 2.0


def test_cosine_decay_matches_the_formula_at_every_step_and_ends_at_min_lr() -> None:
    lr, min_lr, w, c, n = 3e-4, 3e-5, 5, 2, 27
    s = LrSchedule(lr=lr, min_lr=min_lr, warmup_steps=w, constant_steps=c, max_steps=n)
    d = n - w - c
    for step in range(w + c, n):
        p = (step - w - c + 1) / d
        expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p))
        assert s(step) == pytest.approx(expected, rel=0, abs=1e-15)
    assert s(n - 1) == pytest.approx(min_lr, abs=1e-15)
    assert s(n + 100) == pytest.approx(min_lr, abs=1e-15)


def test_cosine_midpoint_is_halfway_between_peak_and_floor() -> None:
    s = LrSchedule(lr=1.0, min_lr=0.2, warmup_steps=0, constant_steps=0, max_steps=10)
    assert s(4) == pytest.approx(0.6)  # p = 5/10


def test_linear_decay_is_a_straight_line_to_min_lr() -> None:
    s = LrSchedule(
        lr=1.0, min_lr=0.0, warmup_steps=0, constant_steps=0, max_steps=4, decay_style="linear"
    )
    assert [s(i) for i in range(4)] == [0.75, 0.5, 0.25, 0.0]


def test_constant_decay_style_stays_at_peak_after_warmup() -> None:
    s = LrSchedule(
        lr=1.0, min_lr=0.0, warmup_steps=2, constant_steps=0, max_steps=6, decay_style="constant"
    )
    assert [s(i) for i in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_curve_is_monotone_after_warmup() -> None:
    s = LrSchedule(lr=1e-3, min_lr=1e-5, warmup_steps=10, constant_steps=5, max_steps=100)
    values = [s(i) for i in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_from_config_uses_the_seed_defaults() -> None:
    s = LrSchedule.from_config(OptimizerConfig(), max_steps=1500)
    assert (s.lr, s.min_lr, s.warmup_steps, s.constant_steps) == (1.5e-4, 1e-5, 2000, 0)
    # Warmup longer than the run: the rate never reaches the peak.
    assert s(1499) == pytest.approx(1.5e-4 * 1500 / 2000)


def test_bad_parameters_are_rejected_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="minLr"):
        LrSchedule(lr=1.0, min_lr=2.0, warmup_steps=0, constant_steps=0, max_steps=3)
    with pytest.raises(ValueError, match="maxSteps"):
        LrSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, constant_steps=0, max_steps=0)
    with pytest.raises(ValueError, match="step"):
        LrSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, constant_steps=0, max_steps=3)(-1)


def test_wsd_holds_the_peak_then_cools_down_linearly_over_its_fraction() -> None:
    s = LrSchedule(
        lr=1.0,
        min_lr=0.1,
        warmup_steps=2,
        constant_steps=99,
        max_steps=20,
        decay_style="wsd",
        cooldown_fraction=0.25,
    )
    assert s.hold_steps == 13  # 20 - 2 warmup - 5 cooldown; constantSteps is ignored
    assert [s(i) for i in range(2, 15)] == [1.0] * 13
    cooldown = [s(i) for i in range(15, 20)]
    assert cooldown == pytest.approx([1.0 - 0.9 * k / 5 for k in range(1, 6)], abs=1e-15)
    assert s(19) == pytest.approx(0.1, abs=1e-15) and s(500) == pytest.approx(0.1, abs=1e-15)


def test_wsd_cooldown_is_at_least_one_step_and_eats_the_plateau_first() -> None:
    tiny = LrSchedule(
        lr=1.0,
        min_lr=0.0,
        warmup_steps=0,
        constant_steps=0,
        max_steps=3,
        decay_style="wsd",
        cooldown_fraction=0.01,
    )
    assert [tiny(i) for i in range(3)] == [1.0, 1.0, 0.0]
    whole = LrSchedule(
        lr=1.0,
        min_lr=0.0,
        warmup_steps=4,
        constant_steps=0,
        max_steps=10,
        decay_style="wsd",
        cooldown_fraction=1.0,
    )
    assert whole.hold_steps == 0 and whole(3) == 1.0 and whole(9) == 0.0


def test_rewarming_starts_the_warmup_line_at_warmup_start_lr() -> None:
    s = LrSchedule(
        lr=1.0, min_lr=0.1, warmup_steps=4, constant_steps=0, max_steps=10, warmup_start_lr=0.2
    )
    assert [s(i) for i in range(4)] == pytest.approx([0.4, 0.6, 0.8, 1.0], abs=1e-15)
    opt = OptimizerConfig(
        lr=1.0,
        min_lr=0.1,
        warmup_steps=4,
        warmup_start_lr=0.2,
        decay_style="wsd",
        cooldown_fraction=0.5,
    )
    from_cfg = LrSchedule.from_config(opt, 10)
    assert from_cfg.warmup_start_lr == 0.2 and from_cfg.decay_style == "wsd"
    assert from_cfg.hold_steps == 1


def test_a_warmup_start_above_the_peak_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"warmupStartLr \(2.0\) must not exceed lr \(1.0\)"):
        OptimizerConfig(lr=1.0, warmup_start_lr=2.0)
    with pytest.raises(ValueError, match="cooldownFraction"):
        LrSchedule(
            lr=1.0,
            min_lr=0.0,
            warmup_steps=0,
            constant_steps=0,
            max_steps=5,
            decay_style="wsd",
            cooldown_fraction=0.0,
        )


def test_the_schedule_picture_in_the_docs_is_drawn_from_this_code() -> None:
    import subprocess
    import sys
    import xml.etree.ElementTree as ET
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = root / "hack" / "plot_schedules.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    svg = ET.parse(root / "docs" / "img" / "schedules.svg").getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 3 and all(len(p.get("points", "").split()) == 1000 for p in lines)
