"""CoreTimer and run_timer: the drivers' one timer loop over a core's get_timer()."""

from __future__ import annotations

import trio
import trio.testing

from bridge.net.timer import CoreTimer, run_timer


class Deadlines:
    """A core whose deadlines are a list; handling the timer drops the first."""

    def __init__(self, *deadlines: float) -> None:
        self.deadlines = list(deadlines)
        self.fired: list[tuple[float, float]] = []

    def get_timer(self) -> float | None:
        return self.deadlines[0] if self.deadlines else None

    def handle_timer(self, now: float, due: float) -> None:
        self.fired.append((now, due))
        self.deadlines.pop(0)


async def test_the_timer_fires_at_each_deadline_and_an_input_that_moves_it_wakes_it(autojump_clock) -> None:
    core = Deadlines(10.0, 20.0)
    timer = CoreTimer(core)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_timer, timer, core.handle_timer)
        await trio.sleep(12.0)
        assert core.fired == [(10.0, 10.0)] and timer.sleeping_until == 20.0
        core.deadlines.insert(0, 15.0)  # an input brought a deadline forward
        timer.wake_if_sooner()
        await trio.sleep(4.0)
        assert core.fired == [(10.0, 10.0), (15.0, 15.0)]
        await trio.sleep(10.0)
        assert core.fired[-1] == (20.0, 20.0) and timer.sleeping_until == float("inf")
        nursery.cancel_scope.cancel()


async def test_the_loop_ends_when_the_core_is_no_longer_running(autojump_clock) -> None:
    core = Deadlines(1.0, 2.0, 3.0)
    await run_timer(CoreTimer(core), core.handle_timer, running=lambda: len(core.fired) < 2)
    assert core.fired == [(1.0, 1.0), (2.0, 2.0)] and trio.current_time() == 2.0
