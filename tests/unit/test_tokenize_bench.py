"""The tokenization benchmark's pure parts: the scaling corpus and the results merge of a
``--only scaling`` run. No timing here."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from bench import common, tokenize_bench  # noqa: E402

pytestmark = pytest.mark.unit


def _packages(root: Path) -> None:
    body = "def f(x):\n    '''Return x, documented at some length.'''\n    return x\n" * 6
    (root / "b" / "sub").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "a" / "one.py").write_text(body + "# one\n")
    (root / "a" / "copy.py").write_text(body + "# one\n")  # the same bytes as one.py
    (root / "b" / "two.py").write_text(body + "# two\n")
    (root / "b" / "sub" / "three.py").write_text(body + "# three\n")
    (root / "b" / "tiny.py").write_text("x = 1\n")  # too short to be a document
    (root / "b" / "latin.py").write_bytes(b"# caf\xe9\n" * 100)  # not UTF-8
    (root / "b" / "notes.txt").write_text(body)  # not a .py file


def test_the_scaling_corpus_is_every_distinct_py_file_once_in_path_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _packages(tmp_path / "site")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"purelib": str(tmp_path / "site")})
    monkeypatch.setattr(tokenize_bench, "FILES", 2)
    corpus, info = tokenize_bench.prepare_code(tmp_path / "work", 256)
    files = sorted(corpus.glob("*.jsonl"))
    assert [f.name for f in files] == ["part-000.jsonl", "part-001.jsonl"]
    docs = [[json.loads(line)["text"] for line in f.read_text().splitlines()] for f in files]
    site = tmp_path / "site"
    copy, three, two = ((site / p).read_text() for p in ("a/copy.py", "b/sub/three.py", "b/two.py"))
    assert (site / "a" / "one.py").read_text() == copy
    # Path order a/copy.py, a/one.py (same bytes: left out), b/sub/three.py, b/two.py,
    # dealt round-robin.
    assert docs == [[copy, two], [three]]
    assert info["corpusDocs"] == 3 and info["corpusTextBytes"] == len(copy + three + two)
    assert info["corpusBytes"] == sum(f.stat().st_size for f in files)
    again = tokenize_bench.prepare_code(tmp_path / "work2", 256)[1]
    assert again["corpusDigest"] == info["corpusDigest"], "deterministic"
    capped = tokenize_bench.prepare_code(tmp_path / "work3", 0)[1]
    assert capped["corpusDocs"] == 1, "stops once the size is reached"


def _row(name: str, value: float) -> dict[str, Any]:
    return common.measurement(name, "m", {}, "tokens/s", value, date="2026-01-01T00:00:00+00:00")


def test_a_scaling_only_run_replaces_just_the_scaling_rows_in_place() -> None:
    old = [
        _row("tokenize.per_core", 1.0),
        _row("tokenize.scaling.2workers", 2.0),
        _row("tokenize.vs_seed.1core", 3.0),
        _row("tokenize.scaling.2shards", 4.0),
        _row("tokenize.scaling.retired", 5.0),
    ]
    new = [_row("tokenize.scaling.2shards", 40.0), _row("tokenize.scaling.2workers", 20.0)]
    merged = tokenize_bench.merge_scaling(old, new)
    assert [(m["name"], m["value"]) for m in merged] == [
        ("tokenize.per_core", 1.0),
        ("tokenize.scaling.2workers", 20.0),
        ("tokenize.vs_seed.1core", 3.0),
        ("tokenize.scaling.2shards", 40.0),
    ]
    assert [m["name"] for m in tokenize_bench.merge_scaling([], new)] == [
        "tokenize.scaling.2shards",
        "tokenize.scaling.2workers",
    ]
