"""The session runs the tiers cheapest first (tests/fixtures/tiers.py), so a broken unit fails a CI
run within minutes instead of after the control-plane tiers."""

from __future__ import annotations

import pytest

from fixtures.tiers import TESTS, TIER_ORDER, tier_rank

pytestmark = pytest.mark.unit


def test_tiers_sort_cheapest_first_and_a_tier_keeps_its_modules_in_order() -> None:
    paths = [
        "containers/test_golden_path.py",
        "unit/test_b.py",
        "faults/test_fault_kueue.py",
        "e2e/test_x.py",
        "unit/test_a.py",
        "integration/test_s3.py",
        "parity/test_p.py",
    ]
    ordered = sorted(paths, key=lambda p: tier_rank(TESTS / p))
    assert ordered == [
        "unit/test_b.py",
        "unit/test_a.py",
        "parity/test_p.py",
        "integration/test_s3.py",
        "e2e/test_x.py",
        "faults/test_fault_kueue.py",
        "containers/test_golden_path.py",
    ]


def test_every_tier_folder_has_a_rank() -> None:
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders == set(TIER_ORDER)
