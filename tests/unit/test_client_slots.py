"""The client's request cap (cpt_operator/k8s/client.py `_Slots`): under a burst, creates of
children go first, then admission checks, then queued reads, Events and status patches."""

from __future__ import annotations

import asyncio

import pytest

from cpt_operator.k8s.client import CREATE, FIRST, LATER, _Slots

pytestmark = pytest.mark.unit


def test_queued_requests_get_a_slot_by_priority_then_in_arrival_order() -> None:
    order: list[str] = []

    async def request(slots: _Slots, name: str, priority: int, hold: asyncio.Event) -> None:
        async with slots(priority):
            order.append(name)
            await hold.wait()

    async def go() -> None:
        slots = _Slots(1)
        hold = asyncio.Event()
        first = asyncio.create_task(request(slots, "holder", LATER, hold))
        await asyncio.sleep(0)
        tasks = [
            asyncio.create_task(request(slots, name, prio, hold))
            for name, prio in (
                ("event", LATER),
                ("dry-run-a", FIRST),
                ("patch", LATER),
                ("dry-run-b", FIRST),
                ("create-a", CREATE),
            )
        ]
        await asyncio.sleep(0.01)
        assert order == ["holder"]  # one slot: everyone else waits
        hold.set()
        await asyncio.gather(first, *tasks)

    asyncio.run(go())
    assert order == ["holder", "create-a", "dry-run-a", "dry-run-b", "event", "patch"]


def test_a_cancelled_waiter_neither_keeps_nor_loses_a_slot() -> None:
    async def go() -> int:
        slots = _Slots(1)
        hold = asyncio.Event()

        async def holder() -> None:
            async with slots(LATER):
                await hold.wait()

        async def quick() -> None:
            async with slots(FIRST):
                pass

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(quick())
        await asyncio.sleep(0)
        waiter.cancel()
        hold.set()
        await h
        await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.wait_for(quick(), 1)  # the slot came back
        return slots._free

    assert asyncio.run(go()) == 1
