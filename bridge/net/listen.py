"""The trio driver of admission control: every role's accept loop.

:func:`serve_admitted` replaces ``trio.serve_listeners``. For each accepted connection
it asks the port's :class:`~bridge.net.admission.Admission` (sans-IO) whether to serve
it, closes refused ones at once (a TCP reset, so the kernel's backlog drains and an
honest client learns at once), and runs the handler of admitted ones inside a cancel
scope whose deadline is the handshake deadline. The handler gets a :class:`Pending`
and calls :meth:`Pending.established` when its handshake is done (the deadline is then
lifted), or :meth:`Pending.rebind` when a front end told it the real client address.

File descriptors: :class:`FdGauge` tells how many the process has left, counting
``/proc/self/fd`` at most every ``sample_interval`` seconds and tracking the accepts
and closes in between; :func:`raise_fd_limit` raises the soft RLIMIT_NOFILE to the
hard limit once per process (the first listener does it) and logs the result.
An ``accept`` that fails for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) is
logged, rate-limited, and retried after a short pause: the process never exits for it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import trio

from bridge.net.admission import Admission, Admitted, Ticket
from bridge.net.tcp import close_quietly, reset

__all__ = [
    "RESOURCE_ERRNOS",
    "FdGauge",
    "Pending",
    "fd_gauge",
    "is_resource_shortage",
    "raise_fd_limit",
    "serve_admitted",
    "source_of",
]

log = logging.getLogger("bridge.admission")

#: errno values that mean "this host is short of a resource", not "the peer is unreachable".
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Pause after an accept failed for lack of resources (as trio.serve_listeners does).
ACCEPT_BACKOFF: Final = 0.1
#: Cap on a soft limit raised from an unlimited hard limit.
MAX_RAISED_LIMIT: Final = 1 << 20


def is_resource_shortage(exc: BaseException | None) -> bool:
    """True if ``exc`` (or what it wraps) says this host ran out of descriptors or buffers."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


_raised: tuple[int, int] | None = None


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (once per process); return (soft, hard)."""
    global _raised  # noqa: PLW0603 -- the limit is per process, raised once
    if _raised is not None:
        return _raised
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_RAISED_LIMIT if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    log.info(
        "open-file limit %d (hard %s); each connection takes one: raise LimitNOFILE (systemd) "
        "or ulimit -n if that is short of rigs + pool connections",
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
    )
    _raised = (soft, hard)
    return _raised


def _count_open_fds() -> int | None:
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory)) - 1  # the listing's own descriptor
        except OSError:
            continue
    return None


class FdGauge:
    """How many file descriptors this process has left (an estimate between samples)."""

    def __init__(self, sample_interval: float = 0.25, count: Callable[[], int | None] = _count_open_fds) -> None:
        self.sample_interval = sample_interval
        self._count = count
        self._sampled_at = -math.inf
        self._open: int | None = None
        self._delta = 0

    def opened(self) -> None:
        self._delta += 1

    def closed(self) -> None:
        self._delta -= 1

    def free(self, now: float) -> int | None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return None
        elapsed = now - self._sampled_at
        if elapsed >= self.sample_interval or elapsed < 0:  # < 0: another trio run's clock
            self._open = self._count()
            self._sampled_at = now
            self._delta = 0
        if self._open is None:
            return None
        return soft - (self._open + self._delta)


_gauge: FdGauge | None = None


def fd_gauge() -> FdGauge:
    """The process's one gauge (file descriptors are a per-process resource)."""
    global _gauge  # noqa: PLW0603 -- one gauge per process, made on first use
    if _gauge is None:
        _gauge = FdGauge()
    return _gauge


def source_of(stream: trio.SocketStream) -> str:
    """The peer's address without the port: what per-source caps count."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address) or "local"


class Pending:
    """What a handler holds of its connection's admission."""

    __slots__ = ("_admission", "_scope", "ticket")

    def __init__(self, admission: Admission, ticket: Ticket, scope: trio.CancelScope) -> None:
        self._admission = admission
        self.ticket = ticket
        self._scope = scope

    @property
    def source(self) -> str:
        return self.ticket.source

    def established(self) -> None:
        """The handshake is done: lift the deadline, stop counting this connection as pending."""
        self._admission.established(self.ticket)
        self._scope.deadline = math.inf

    def rebind(self, source: str) -> bool:
        """Count this connection under ``source`` (the real client, from PROXY protocol).

        False when that source is over its cap: the handler should close the connection.
        """
        refused = self._admission.rebind(self.ticket, source, trio.current_time())
        if refused is None:
            return True
        if refused.log:
            log.warning("%s", refused.log)
        return False


Handler = Callable[[trio.SocketStream, Pending], Awaitable[Any]]


async def serve_admitted(
    handler: Handler,
    listeners: Sequence[trio.SocketListener],
    admission: Admission,
    *,
    gauge: FdGauge | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every listener until cancelled, admitting each connection (module docs)."""
    raise_fd_limit()
    gauge = gauge or fd_gauge()
    scopes: dict[Ticket, trio.CancelScope] = {}

    async def run(stream: trio.SocketStream, ticket: Ticket) -> None:
        scope = trio.CancelScope(deadline=ticket.deadline)
        scopes[ticket] = scope
        try:
            with scope:
                await handler(stream, Pending(admission, ticket, scope))
        finally:
            del scopes[ticket]
            gauge.closed()
            if scope.cancelled_caught and ticket.pending:
                line = admission.timed_out(ticket, trio.current_time())
                if line:
                    log.warning("%s", line)
            admission.release(ticket)
            await close_quietly(stream)

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        shortage_logged = -math.inf
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return  # the listener was closed (a draining sidecar): accepted connections carry on
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                now = trio.current_time()
                if now - shortage_logged >= admission.limits.log_interval:
                    shortage_logged = now
                    log.warning(
                        "%s: cannot accept connections: %s; pausing accepts (raise LimitNOFILE / ulimit -n if this lasts)",
                        admission.name,
                        os.strerror(exc.errno or 0),
                    )
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            gauge.opened()
            now = trio.current_time()
            decision = admission.offer(source_of(stream), now, gauge.free(now))
            if not isinstance(decision, Admitted):
                if decision.log:
                    log.warning("%s", decision.log)
                reset(stream)
                await close_quietly(stream)
                gauge.closed()
                continue
            if decision.evict is not None:
                if decision.log:
                    log.warning("%s", decision.log)
                victim = scopes.get(decision.evict)
                if victim is not None:
                    victim.cancel()
            nursery.start_soon(run, stream, decision.ticket)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(listeners)
