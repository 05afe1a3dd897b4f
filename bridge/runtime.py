"""Running a role's trio main loop from a command."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio


def run_until_interrupted(async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """``trio.run`` where Ctrl-C is a normal way to stop.

    Newer trio raises a Ctrl-C that arrives inside a nursery as an exception group
    (strict exception groups); ``except*`` takes it out of the group either way.
    Any other error propagates; a lone error (an address already in use, say)
    stays a plain exception.
    """
    try:
        trio.run(async_fn, *args)
    except* KeyboardInterrupt:
        pass
