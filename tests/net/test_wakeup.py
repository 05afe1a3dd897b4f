"""Wakeup: a reusable one-task wake-up (a rig's idle wait without an Event per wait)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bridge.net.wakeup import Wakeup


async def test_a_set_wakes_the_waiting_task_and_is_used_up() -> None:
    wakeup = Wakeup()
    woken = 0

    async def waiter() -> None:
        nonlocal woken
        while True:
            await wakeup.wait()
            woken += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == 0
        wakeup.set()
        await trio.testing.wait_all_tasks_blocked()
        assert woken == 1 and not wakeup.is_set()
        wakeup.set()
        wakeup.set()  # two sets before the waiter runs: one wake-up
        await trio.testing.wait_all_tasks_blocked()
        assert woken == 2
        nursery.cancel_scope.cancel()


async def test_a_set_with_nobody_waiting_is_kept_for_the_next_wait() -> None:
    wakeup = Wakeup()
    wakeup.set()
    assert wakeup.is_set()
    with trio.move_on_after(1) as scope:
        await wakeup.wait()
    assert not scope.cancelled_caught and not wakeup.is_set()


async def test_a_cancelled_wait_leaves_the_wakeup_usable(autojump_clock: trio.testing.MockClock) -> None:
    wakeup = Wakeup()
    with trio.move_on_after(5) as scope:
        await wakeup.wait()
    assert scope.cancelled_caught
    wakeup.set()  # nobody waits any more: kept
    await wakeup.wait()


async def test_one_task_waits_at_a_time() -> None:
    wakeup = Wakeup()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wakeup.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="already waiting"):
            await wakeup.wait()
        wakeup.set()
