"""Errors from the API server become one line in the operator's log and in conditions.

The client's own text of an ApiException spans lines (status, headers, body); a log record
split over lines loses its run's namespace on every line but the first, which is how a
Forbidden answer about another test's terminating namespace once read as this run's problem.
"""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from cpt_operator.kube import error_message

pytestmark = pytest.mark.unit


def _api_exception(status: int, body: str) -> ApiException:
    err = ApiException(status=status, reason="Forbidden")
    err.body = body
    return err


def test_an_api_error_reads_as_the_api_servers_own_message() -> None:
    message = 'events "wide." is forbidden: namespace t-1 is being terminated'
    err = _api_exception(403, json.dumps({"kind": "Status", "message": message}))
    assert "\n" in str(err)  # what the client would have logged
    assert error_message(err) == message


def test_an_api_error_without_a_status_body_is_still_one_line() -> None:
    text = error_message(_api_exception(502, "<html>\nbad gateway\n</html>"))
    assert "\n" not in text and "502" in text


def test_any_other_error_is_its_text_on_one_line() -> None:
    assert error_message(ValueError("a\n  b")) == "a b"
