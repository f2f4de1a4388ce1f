"""Draw docs/img/schedules.svg from the real schedule code (cpt_training.schedule.LrSchedule).

The picture in docs/training.md compares the seed's warmup + cosine with the two continual
pretraining schedules: re-warming from a non-zero rate, and warmup-stable-decay. SVG is
written by hand (a few polylines) so no plotting library is needed; ``--check`` fails when
the committed file differs from what the code draws now (a unit test runs it).

    .venv/bin/python hack/plot_schedules.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpt_training.schedule import LrSchedule

OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "schedules.svg"
STEPS = 1000
LR, MIN_LR = 3e-4, 3e-5
CURVES: list[tuple[str, str, LrSchedule]] = [
    (
        "warmup + cosine (warmupSteps 100)",
        "#1f77b4",
        LrSchedule(LR, MIN_LR, 100, 0, STEPS, "cosine"),
    ),
    (
        "re-warm from minLr + cosine (warmupStartLr 3e-5)",
        "#ff7f0e",
        LrSchedule(LR, MIN_LR, 100, 0, STEPS, "cosine", warmup_start_lr=MIN_LR),
    ),
    (
        "re-warm + wsd (cooldownFraction 0.2)",
        "#2ca02c",
        LrSchedule(LR, MIN_LR, 100, 0, STEPS, "wsd", 0.2, warmup_start_lr=MIN_LR),
    ),
]
W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 360, 70, 20, 20, 110


def _x(step: float) -> float:
    return LEFT + (W - LEFT - RIGHT) * step / STEPS


def _y(lr: float) -> float:
    return TOP + (H - TOP - BOTTOM) * (1 - lr / LR)


def svg() -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<line x1="{LEFT}" y1="{_y(0)}" x2="{W - RIGHT}" y2="{_y(0)}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{_y(0)}" stroke="black"/>',
    ]
    for step in range(0, STEPS + 1, 200):
        parts.append(
            f'<text x="{_x(step):.1f}" y="{_y(0) + 16:.1f}" text-anchor="middle">{step}</text>'
        )
    for lr in (0.0, 1e-4, 2e-4, 3e-4):
        parts.append(f'<text x="{LEFT - 6}" y="{_y(lr) + 4:.1f}" text-anchor="end">{lr:.0e}</text>')
    parts.append(
        f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y="{_y(0) + 34:.1f}" '
        'text-anchor="middle">optimizer step</text>'
    )
    for i, (label, color, sched) in enumerate(CURVES):
        points = " ".join(f"{_x(s):.1f},{_y(sched(s)):.1f}" for s in range(STEPS))
        dash = ' stroke-dasharray="6,3"' if i == 1 else ""
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{points}"/>'
        )
        ly = _y(0) + 56 + 16 * i
        parts.append(
            f'<line x1="{LEFT}" y1="{ly - 4}" x2="{LEFT + 30}" y2="{ly - 4}" '
            f'stroke="{color}" stroke-width="2"{dash}/>'
        )
        parts.append(f'<text x="{LEFT + 38}" y="{ly}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = ap.parse_args(argv)
    text = svg()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run hack/plot_schedules.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
