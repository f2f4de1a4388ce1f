"""The latest held-out evaluation per source (progress.json's ``eval``) in the run's status and
in the Eval column of ``kubectl get cpt -o wide``."""

from __future__ import annotations

from typing import Any

import pytest
from test_reconcile import T0, body_of, gang, node, ptj, run, training_status, ts

from cpt_operator.api.crd import PRINTER_COLUMNS
from cpt_operator.api.models import EVAL_SUMMARY_MAX, EvalStatus
from cpt_operator.local import progress_postfix
from cpt_operator.reconcile.status import dump_status, load_status

pytestmark = pytest.mark.unit


def progress(step: int, evaluation: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "attempt": 1,
        "step": step,
        "maxSteps": 100,
        "loss": 2.5,
        "tokensPerSec": 1000.0,
        "updatedAt": ts(T0),
    }
    if evaluation is not None:
        out["eval"] = evaluation
    return out


def reconcile(body: dict[str, Any], status: dict[str, Any], prog: dict[str, Any]) -> Any:
    return run(
        body,
        status,
        pytorchjobs=[ptj("llama-cpt-train-1", 1)],
        pods=gang(1),
        nodes=[node("trn1-0"), node("trn1-1")],
        progress=prog,
    )


EVAL_40 = {
    "step": 40,
    "sources": {
        "domain": {"loss": 2.345678, "perplexity": 10.4412345},
        "replay": {"loss": 3.1, "perplexity": 22.197951},
    },
}


def test_the_latest_eval_per_source_goes_into_status_with_a_compact_summary() -> None:
    body = body_of("trn1-nxd")
    d = reconcile(body, training_status(body), progress(42, EVAL_40))
    assert d.status["eval"] == {
        "step": 40,
        "sources": [
            {"name": "domain", "loss": 2.3457, "perplexity": 10.441},
            {"name": "replay", "loss": 3.1, "perplexity": 22.198},
        ],
        "summary": "domain=2.346,replay=3.100@40",
    }
    # Read back by the next reconcile unchanged.
    assert load_status(d.status).eval == EvalStatus.model_validate(d.status["eval"])
    again = reconcile(body, d.status, progress(42, EVAL_40))
    assert again.status["eval"] == d.status["eval"]


def test_a_newer_progress_without_eval_keeps_the_last_one_and_a_newer_eval_replaces_it() -> None:
    body = body_of("trn1-nxd")
    status = reconcile(body, training_status(body), progress(42, EVAL_40)).status
    # Attempt 2's progress.json has no eval until its first evaluation.
    status = reconcile(body, status, progress(45)).status
    assert status["eval"]["step"] == 40 and status["progress"]["step"] == 45
    later = {"step": 60, "sources": {"domain": {"loss": 2.0}, "replay": {"loss": 3.0}}}
    status = reconcile(body, status, progress(61, later)).status
    assert status["eval"]["summary"] == "domain=2.000,replay=3.000@60"
    assert "perplexity" not in status["eval"]["sources"][0]


@pytest.mark.parametrize(
    "bad",
    [
        "not an object",
        {"step": 40},
        {"step": "forty", "sources": {"domain": {"loss": 2.0}}},
        {"step": -1, "sources": {"domain": {"loss": 2.0}}},
    ],
)
def test_a_malformed_eval_in_progress_json_is_ignored(bad: Any) -> None:
    body = body_of("trn1-nxd")
    d = reconcile(body, training_status(body), progress(42, bad))
    assert "eval" not in d.status and d.status["progress"]["step"] == 42


def test_a_source_without_a_finite_loss_shows_a_dash_and_no_number() -> None:
    body = body_of("trn1-nxd")
    evaluation = {
        "step": 8,
        "sources": {"domain": {"loss": None}, "replay": {"loss": "NaN"}, "x": "junk"},
    }
    d = reconcile(body, training_status(body), progress(8, evaluation))
    assert d.status["eval"]["sources"] == [{"name": "domain"}, {"name": "replay"}]
    assert d.status["eval"]["summary"] == "domain=-,replay=-@8"


def test_the_summary_fits_its_column_and_counts_the_sources_left_out() -> None:
    many = [(f"source-with-a-long-name-{i:02d}", 1.0 + i / 100, None) for i in range(20)]
    ev = EvalStatus.make(123456, many)
    assert len(ev.summary) <= EVAL_SUMMARY_MAX
    assert ev.summary.startswith("source-with-a-long-name-00=1.000,")
    shown = ev.summary.count("=")
    assert ev.summary.endswith(f",+{20 - shown}@123456") and 0 < shown < 20
    assert len(ev.sources) == 20  # the list keeps every source; only the summary is cut


def test_repeated_or_overlong_source_names_cannot_break_the_status_list_map() -> None:
    ev = EvalStatus.make(1, [("a", 1.0, None), ("a", 2.0, None), ("n" * 300, 3.0, None)])
    assert [s.name for s in ev.sources] == ["a", "n" * 253]
    assert dump_status(load_status({"eval": ev.model_dump(by_alias=True)})).get("eval")


def test_kubectl_get_wide_has_an_eval_column_from_the_summary() -> None:
    col = next(c for c in PRINTER_COLUMNS if c["name"] == "Eval")
    assert col == {
        "name": "Eval",
        "type": "string",
        "jsonPath": ".status.eval.summary",
        "priority": 1,
    }


def test_cpt_local_shows_the_same_summary_next_to_its_progress_bar() -> None:
    assert progress_postfix(progress(42, EVAL_40)) == {
        "attempt": 1,
        "loss": "2.500",
        "tok/s": "1000",
        "eval": "domain=2.346,replay=3.100@40",
    }
    assert "eval" not in progress_postfix(progress(3))
