"""Containment: what a peer sends can end its own connection, never the process.

Every trio driver that handles peer input runs each unit of work (one connection,
one datagram, one pool link ...) inside a :class:`Containment`: an exception that
escapes the sans-IO core there (a bug, or an input shape nobody thought of) ends
that unit only — the connection is closed, the datagram dropped — and the rest of
the role carries on. Each contained error is

- **counted**: :attr:`Containment.errors` and :meth:`Containment.statistics` (by
  exception type), which the roles expose as ``contained_errors``;
- **logged once with the peer** at warning level, in one line that says what was
  done and what to do; repeats of the same kind at the same place are rate-limited
  (one line per ``repeat_interval``, saying how many were left out), so a peer that
  triggers the same error in a loop cannot flood the log. The traceback goes to the
  debug log, for the bug report.

Cancellation (``trio.Cancelled``), ``KeyboardInterrupt`` and ``SystemExit`` are
never contained; from an exception group only the ``Exception`` part is, the rest
propagates.

Use, in a driver::

    contain = Containment(log, "proxy")
    await trio.serve_listeners(contain.connections(self._handle, "rig"), listeners)

    with contain.guard(peer, "pool connection") as guard:   # or: async with guard, nursery
        await self._carry(link)
    if guard.error is not None: ...        # the unit ended by a contained error

    except Exception as exc:               # hot loops (one datagram): no context manager
        contain.record(exc, address, "datagram")
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import trio
from msgspec import Struct

from bridge.bounded import BoundedMap
from bridge.net.tcp import close_quietly, peer_name

__all__ = ["Containment", "ContainmentStatistics", "Guard", "describe_peer"]

#: Seconds between two log lines of the same kind of contained error at the same place.
DEFAULT_REPEAT_INTERVAL = 60.0
#: Distinct (place, error type) pairs whose log pacing is remembered.
_MAX_TRACKED = 256


class ContainmentStatistics(Struct, frozen=True):
    contained_errors: int
    """Exceptions from handling one peer's input that ended that unit only."""
    by_kind: dict[str, int]
    """The same, by exception type."""


def describe_peer(peer: Any) -> str:
    """``host:port`` of a socket address tuple (``[v6]:port``); other values as text."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


class Guard:
    """One unit of work under containment; :attr:`error` is the contained exception, if any."""

    __slots__ = ("containment", "error", "peer", "what")

    def __init__(self, containment: Containment, peer: Any, what: str) -> None:
        self.containment = containment
        self.peer = peer
        self.what = what
        self.error: BaseException | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None:
            return False
        if isinstance(exc, Exception):
            self.error = exc
            self.containment.record(exc, self.peer, self.what)
            return True
        if isinstance(exc, BaseExceptionGroup):
            matched, rest = exc.split(Exception)
            if matched is None:
                return False
            self.error = matched
            self.containment.record(matched, self.peer, self.what)
            if rest is None:
                return True
            raise rest
        return False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        return self.__exit__(kind, exc, tb)


class Containment:
    """Counts and logs the exceptions that one role contained (see the module docs)."""

    def __init__(
        self,
        logger: logging.Logger,
        role: str,
        *,
        repeat_interval: float = DEFAULT_REPEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = logger
        self.role = role
        self.repeat_interval = repeat_interval
        self.clock = clock
        self.errors = 0
        self.by_kind: Counter[str] = Counter()
        self.logged = 0
        self._last_logged: BoundedMap[tuple[str, str], float] = BoundedMap(_MAX_TRACKED)
        self._suppressed: Counter[tuple[str, str]] = Counter()

    def guard(self, peer: Any, what: str) -> Guard:
        """A context manager that contains an exception of the unit ``what`` for ``peer``."""
        return Guard(self, peer, what)

    def connections(self, handler: Callable[..., Awaitable[Any]], what: str) -> Callable[..., Awaitable[None]]:
        """Wrap a connection handler (``serve_listeners``' or ``serve_admitted``'s, whose extra
        arguments pass through): a failing connection is closed, the listener goes on."""

        async def contained(stream: trio.SocketStream, *args: Any) -> None:
            peer = peer_name(stream)
            guard = Guard(self, peer, what)
            try:
                with guard:
                    await handler(stream, *args)
            finally:
                if guard.error is not None:
                    await close_quietly(stream)

        contained.__name__ = getattr(handler, "__name__", "handler")
        return contained

    def record(self, exc: BaseException, peer: Any, what: str) -> None:
        """Count one contained exception and log it (rate-limited); the caller already ended the unit."""
        kind = _kind(exc)
        self.errors += 1
        self.by_kind[kind] += 1
        key = (what, kind)
        now = self.clock()
        last = self._last_logged.get(key)
        if last is not None and now - last < self.repeat_interval:
            self._suppressed[key] += 1
            return
        self._last_logged[key] = now
        left_out = self._suppressed.pop(key, 0)
        more = f" ({left_out} more like it in the last {self.repeat_interval:g} s not logged)" if left_out else ""
        self.logged += 1
        self.log.warning(
            "%s %s: internal error %s: %s; only this %s was ended, the %s carries on%s. "
            "This is a bug: please report it with the traceback from --log-level debug",
            what,
            describe_peer(peer),
            kind,
            _message(exc),
            what,
            self.role,
            more,
        )
        self.log.debug("traceback of the %s error from %s", kind, describe_peer(peer), exc_info=exc)

    def statistics(self) -> ContainmentStatistics:
        return ContainmentStatistics(contained_errors=self.errors, by_kind=dict(self.by_kind))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _kind(exc: BaseException) -> str:
    return "+".join(sorted({type(leaf).__name__ for leaf in _leaves(exc)}))


def _message(exc: BaseException) -> str:
    text = "; ".join(str(leaf) or type(leaf).__name__ for leaf in _leaves(exc))
    return text if len(text) <= 200 else text[:197] + "..."
