"""A reusable wake-up for one waiting task: what a per-rig ``trio.Event`` is used for, for less.

A driver that keeps one task per rig waiting for "something to do" used to make a new
:class:`trio.Event` for every wait (an Event, its set of waiting tasks: about 300 bytes
per rig, kept while the rig is idle, which is nearly always). :class:`Wakeup` holds a
flag and the waiting task, nothing else, and is reused for the life of the rig.

- :meth:`Wakeup.set` wakes the waiting task, or makes the next :meth:`Wakeup.wait`
  return at once (the flag);
- :meth:`Wakeup.wait` is a checkpoint either way, can be cancelled, and clears the flag
  when it returns; one task may wait at a time.
"""

from __future__ import annotations

import trio

__all__ = ["Wakeup"]


class Wakeup:
    """Wake one task; a :meth:`set` with nobody waiting is kept for the next :meth:`wait`."""

    __slots__ = ("_set", "_task")

    def __init__(self) -> None:
        self._set = False
        self._task: trio.lowlevel.Task | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return  # already woken (the waiter has not run yet) or kept for the next wait
        self._set = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self._set:
            self._set = False
            await trio.lowlevel.checkpoint()
            return
        if self._task is not None:
            raise RuntimeError("another task is already waiting for this wake-up")
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)
        self._set = False

    def _abort(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED
