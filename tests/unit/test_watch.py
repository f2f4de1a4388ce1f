"""The children's watch loop (cpt_operator/k8s/watch.py) on a scripted API: resume from the
last version seen, restart from now on 410 with a verification, back off on failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cpt_operator.k8s import watch

pytestmark = pytest.mark.unit

POD = ("v1", "Pod")


def line(type_: str, name: str, rv: str, **obj: Any) -> str:
    body = {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}, **obj}
    return json.dumps({"type": type_, "object": body})


class ScriptedApi:
    """Each watch request plays the next script: a list of lines, or an exception to raise
    (after the lines before it). Records the resourceVersion each request asked for."""

    def __init__(self, scripts: list[list[Any]]) -> None:
        self.scripts = scripts
        self.asked: list[tuple[str | None, str | None]] = []
        self.done = asyncio.Event()

    async def watch_labelled(
        self, kind: tuple[str, str], namespace: str | None, resource_version: str | None
    ) -> AsyncIterator[str]:
        assert kind == POD
        self.asked.append((namespace, resource_version))
        if not self.scripts:
            self.done.set()
            await asyncio.Event().wait()  # an open watch with nothing to say
        for item in self.scripts.pop(0):
            if isinstance(item, BaseException):
                raise item
            yield item


def run_follow(
    api: ScriptedApi, deliver: watch.Deliver | None = None
) -> tuple[list[tuple[str, str]], int]:
    """Follows `api` until its scripts are played; (type, name) of what was delivered (by the
    default `deliver`) and how many times the watch asked for a verification."""
    got: list[tuple[str, str]] = []
    restarts = 0

    async def on_restart() -> None:
        nonlocal restarts
        restarts += 1

    async def main() -> None:
        task = asyncio.create_task(
            watch.follow(
                api,
                POD,
                "ns",
                deliver or (lambda t, o: got.append((t, o["metadata"]["name"]))),
                on_restart=on_restart,
                backoff=(0.01, 0.02),
            )
        )
        await asyncio.wait_for(api.done.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return got, restarts


def test_events_are_delivered_and_a_new_request_resumes_after_the_last_version() -> None:
    api = ScriptedApi(
        [
            [line("ADDED", "a", "5"), line("MODIFIED", "a", "6")],  # the server's timeout
            [line("BOOKMARK", "", "9")],
            [line("DELETED", "a", "10")],
        ]
    )
    got, restarts = run_follow(api)
    assert got == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]  # bookmarks: no
    assert api.asked == [("ns", None), ("ns", "6"), ("ns", "9"), ("ns", "10")]
    assert restarts == 0


def test_gone_restarts_from_now_and_asks_for_a_verification() -> None:
    gone = json.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 410}})
    api = ScriptedApi(
        [
            [line("ADDED", "a", "5"), gone],
            [watch.Gone("HTTP 410")],
            [line("ADDED", "b", "20")],
        ]
    )
    got, restarts = run_follow(api)
    assert got == [("ADDED", "a"), ("ADDED", "b")]
    assert api.asked == [("ns", None), ("ns", None), ("ns", None), ("ns", "20")]
    assert restarts == 2  # before each request that starts over


def test_failures_are_retried_and_a_watch_that_ends_at_once_counts_as_one() -> None:
    api = ScriptedApi(
        [
            [line("ADDED", "a", "5"), ConnectionError("reset by peer")],
            [],  # ended at once, nothing said: retried after the backoff, not in a spin
            ["not json"],
            [line("MODIFIED", "a", "7")],
        ]
    )
    got, restarts = run_follow(api)
    assert got == [("ADDED", "a"), ("MODIFIED", "a")]
    assert api.asked == [("ns", None), ("ns", "5"), ("ns", "5"), ("ns", "5"), ("ns", "7")]
    assert restarts == 0


def test_objects_carry_their_kind_for_the_index() -> None:
    type_, obj = watch.parse(line("ADDED", "p", "3"), POD)
    assert type_ == "ADDED" and (obj["apiVersion"], obj["kind"]) == POD
    with pytest.raises(RuntimeError, match="500"):
        watch.parse(json.dumps({"type": "ERROR", "object": {"code": 500}}), POD)


def test_an_event_the_handler_cannot_apply_is_skipped_not_replayed() -> None:
    api = ScriptedApi([[line("ADDED", "bad", "5"), line("ADDED", "good", "6")]])
    got: list[str] = []

    def deliver(type_: str, obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] == "bad":
            raise KeyError("status")
        got.append(obj["metadata"]["name"])

    run_follow(api, deliver)
    assert got == ["good"]
    assert api.asked == [("ns", None), ("ns", "6")]
