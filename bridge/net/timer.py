"""The drivers' one timer loop for a sans-IO core (the contract in :mod:`bridge.relay.contract`).

A driver sleeps until the core's :meth:`get_timer`, or until an input may have
moved that deadline (:meth:`CoreTimer.wake`), and tells the core when it came.
:func:`run_timer` is that loop for a task of its own; a driver whose loop also
writes (the sidecar's pump) uses :meth:`CoreTimer.rearm` and
:meth:`CoreTimer.sleep` inside its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import trio

__all__ = ["CoreTimer", "run_timer"]


class Scheduled(Protocol):
    """What the timer asks of a core: its next deadline."""

    def get_timer(self) -> float | None: ...


class CoreTimer:
    """Sleeps until a core's deadline; woken early when an input may have moved it."""

    __slots__ = ("_wake", "core", "sleeping_until")

    def __init__(self, core: Scheduled) -> None:
        self.core = core
        self._wake = trio.Event()
        self.sleeping_until = math.inf
        """The deadline being slept to (infinity while awake or with no deadline)."""

    def wake(self) -> None:
        """Ask the core again: an input may have moved its deadline."""
        self._wake.set()

    def wake_if_sooner(self) -> None:
        """Wake only when the core's deadline is now earlier than the one being slept to."""
        deadline = self.core.get_timer()
        if deadline is not None and deadline < self.sleeping_until:
            self._wake.set()

    def rearm(self) -> None:
        """Forget wakes so far: the caller is about to look at the core anyway."""
        self._wake = trio.Event()

    async def sleep(self) -> float | None:
        """Sleep until the core's deadline or a wake since :meth:`rearm`.

        The deadline when it came (the core's timer is due), None after a wake.
        """
        deadline = self.core.get_timer()
        self.sleeping_until = math.inf if deadline is None else deadline
        try:
            with trio.move_on_at(self.sleeping_until):
                await self._wake.wait()
                return None
        finally:
            self.sleeping_until = math.inf
        return deadline


async def run_timer(
    timer: CoreTimer, on_due: Callable[[float, float], None], *, running: Callable[[], bool] = lambda: True
) -> None:
    """Call ``on_due(now, deadline)`` whenever the core's deadline comes, while ``running()``.

    ``on_due`` hands the core its timer (``handle_timer`` or a timer event) and takes
    its outputs; the deadline lets the core tell this process's lateness from a
    peer's silence.
    """
    while running():
        timer.rearm()
        due = await timer.sleep()
        if due is not None:
            on_due(trio.current_time(), due)
