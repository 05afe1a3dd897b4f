"""The trio driver of admission control: every role's accept loop.

:func:`serve_admitted` replaces ``trio.serve_listeners``. For each accepted connection
it asks the port's :class:`~bridge.net.admission.Admission` (sans-IO) whether to serve
it, closes refused ones at once (a TCP reset, so the kernel's backlog drains and an
honest client learns at once), and runs the handler of admitted ones inside a cancel
scope whose deadline is the handshake deadline. The handler gets a :class:`Pending`
and calls :meth:`Pending.established` when its handshake is done (the deadline is then
lifted), or :meth:`Pending.rebind` when a front end told it the real client address.

With ``handler_owns_connection`` the handler is the connection's task itself, with no
wrapper coroutine or cancel scope kept for the connection's whole life (a few hundred
bytes each, which count at thousands of connections): it runs its handshake inside
``with pending.handshake():`` (the cancel scope of the deadline and of eviction, held
only that long; :attr:`Pending.cut_short` tells afterwards whether admission ended it)
and ends, whatever happens, with ``await pending.release(stream)``, which counts the
connection out of admission and closes it.

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
    try:
        # Linux 6.2 and later give the count as the directory's size: about 1 us, where
        # listing 20,000 descriptors takes milliseconds. Older kernels say 0.
        counted = os.stat("/proc/self/fd").st_size
    except OSError:
        counted = 0
    if counted > 0:
        return counted
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


class _Port:
    """What every connection of one :func:`serve_admitted` shares."""

    __slots__ = ("admission", "gauge", "scopes")

    def __init__(self, admission: Admission, gauge: FdGauge) -> None:
        self.admission = admission
        self.gauge = gauge
        #: The cancel scope of each connection in its handshake (for eviction).
        self.scopes: dict[Ticket, trio.CancelScope] = {}


class Pending:
    """What a handler holds of its connection's admission."""

    __slots__ = ("_owned", "_port", "_released", "_scope", "cut_short", "ticket")

    def __init__(self, port: _Port, ticket: Ticket, scope: trio.CancelScope | None = None) -> None:
        self._port = port
        self.ticket = ticket
        #: The scope the handshake runs in: the driver's (for the whole handler), or, when
        #: the handler owns its connection, its own while inside :meth:`handshake`.
        self._scope = scope
        self._owned = scope is None
        self._released = False
        #: Admission ended the handshake (its deadline passed, or it was evicted for a
        #: newcomer): set when :meth:`handshake` caught that cancellation.
        self.cut_short = False

    @property
    def source(self) -> str:
        return self.ticket.source

    def established(self) -> None:
        """The handshake is done: lift the deadline, stop counting this connection as pending."""
        self._port.admission.established(self.ticket)
        if self._scope is not None:
            self._scope.deadline = math.inf

    def rebind(self, source: str) -> bool:
        """Count this connection under ``source`` (the real client, from PROXY protocol).

        False when that source is over its cap: the handler should close the connection.
        """
        refused = self._port.admission.rebind(self.ticket, source, trio.current_time())
        if refused is None:
            return True
        if refused.log:
            log.warning("%s", refused.log)
        return False

    def handshake(self) -> Pending:
        """``with pending.handshake():`` around the handshake of a handler that owns its
        connection: the cancel scope of the handshake deadline (and of eviction) is held
        only there. Admission's cancellation ends the ``with`` block, not the handler, and
        sets :attr:`cut_short`. Under the driver's own scope (the default) it does nothing.
        """
        return self

    def __enter__(self) -> Pending:
        if not self._owned:
            return self
        if self._scope is not None:
            raise RuntimeError("Pending.handshake() is not reentrant")
        ticket = self.ticket
        scope = trio.CancelScope(deadline=ticket.deadline)
        if ticket.state == "done":
            scope.cancel()  # evicted (or refused by a rebind) before its handshake began
        self._scope = scope
        self._port.scopes[ticket] = scope
        scope.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        scope = self._scope
        if not self._owned or scope is None:
            return False
        self._scope = None
        port = self._port
        ticket = self.ticket
        port.scopes.pop(ticket, None)
        try:
            return bool(scope.__exit__(*exc_info))
        finally:
            if scope.cancelled_caught:
                self.cut_short = True
                _timed_out(port.admission, ticket)

    async def release(self, stream: trio.abc.AsyncResource) -> None:
        """The connection is over: count it out of admission (once) and close it.

        A handler that owns its connection must end with this, whatever happened.
        """
        if not self._released:
            self._released = True
            self._port.gauge.closed()
            self._port.admission.release(self.ticket)
        await close_quietly(stream)


def _timed_out(admission: Admission, ticket: Ticket) -> None:
    """The connection was cancelled by its handshake scope: count a timeout if it was still pending."""
    if ticket.pending:
        line = admission.timed_out(ticket, trio.current_time())
        if line:
            log.warning("%s", line)


Handler = Callable[[trio.SocketStream, Pending], Awaitable[Any]]


async def serve_admitted(
    handler: Handler,
    listeners: Sequence[trio.SocketListener],
    admission: Admission,
    *,
    gauge: FdGauge | None = None,
    handler_owns_connection: bool = False,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every listener until cancelled, admitting each connection (module docs).

    ``handler_owns_connection``: the handler runs as the connection's task itself, holds
    the handshake's cancel scope with :meth:`Pending.handshake` and ends with
    :meth:`Pending.release`; by default it runs inside a wrapper that does both.
    """
    raise_fd_limit()
    port = _Port(admission, gauge or fd_gauge())
    scopes = port.scopes

    async def run(stream: trio.SocketStream, ticket: Ticket) -> None:
        scope = trio.CancelScope(deadline=ticket.deadline)
        scopes[ticket] = scope
        pending = Pending(port, ticket, scope)
        try:
            with scope:
                await handler(stream, pending)
        finally:
            del scopes[ticket]
            if scope.cancelled_caught:
                _timed_out(admission, ticket)
            await pending.release(stream)

    # One name for every connection's task: trio makes a string per task otherwise (about
    # 100 B per connection, held as long as the connection).
    task_name = f"{handler.__module__}.{handler.__qualname__}"

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
            port.gauge.opened()
            now = trio.current_time()
            decision = admission.offer(source_of(stream), now, port.gauge.free(now))
            if not isinstance(decision, Admitted):
                if decision.log:
                    log.warning("%s", decision.log)
                reset(stream)
                await close_quietly(stream)
                port.gauge.closed()
                continue
            if decision.evict is not None:
                if decision.log:
                    log.warning("%s", decision.log)
                victim = scopes.get(decision.evict)
                if victim is not None:
                    victim.cancel()
            if handler_owns_connection:
                nursery.start_soon(handler, stream, Pending(port, decision.ticket), name=task_name)
            else:
                nursery.start_soon(run, stream, decision.ticket, name=task_name)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(listeners)
