"""Running a role's trio main loop from a command."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

#: CPython's collector thresholds for a serving role: young objects between young
#: collections, young collections between middle ones, middle ones between full ones.
#: A proxy holding 10,000 rigs has about 250,000 objects; with the defaults (700, 10, 10)
#: a reconnect storm of all of them spent 2.4 of the proxy's 6.2 CPU seconds collecting
#: (8 full collections), with these 0.06 s more than the young collections (none full),
#: for the same resident memory (bench scale).
GC_THRESHOLDS = (10_000, 20, 100)


#: Seconds between the full collections a role runs itself. The thresholds above make
#: the collector's own full collections rare, and garbage in reference cycles that has
#: grown old (an exception kept with its traceback, say; a closed rig's channel handle
#: was one, six objects a rig, until it stopped referring back) is freed by nothing
#: else: this bounds how long it lives. A full collection takes about 70 ms at 3,000 rigs.
FULL_COLLECTION_INTERVAL = 60.0


def tune_garbage_collector() -> None:
    """Collect less often in a long-running role: what is loaded at start is frozen (no
    collection walks it again) and the thresholds are :data:`GC_THRESHOLDS`."""
    import gc

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def collect_garbage_periodically(interval: float = FULL_COLLECTION_INTERVAL) -> None:
    """A role's background task: a full collection every ``interval`` seconds."""
    import gc

    while True:
        await trio.sleep(interval)
        started = time.perf_counter()
        unreachable = gc.collect()
        _log.debug("garbage collection: %d unreachable objects in %.0f ms", unreachable, (time.perf_counter() - started) * 1e3)


def run_until_interrupted(async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """``trio.run`` where Ctrl-C (or SIGTERM) is a normal way to stop.

    The role is cancelled (see :func:`_until_signalled`): Ctrl-C never lands as a
    ``KeyboardInterrupt`` in the middle of the role's code. Any other error
    propagates; a lone error (an address already in use, say) stays a plain exception.
    """
    watched = _stop_signals()
    tune_garbage_collector()
    try:
        trio.run(_until_signalled, watched, async_fn, *args)
    except* KeyboardInterrupt:  # Ctrl-C before the role's signal receiver was open, or after it closed
        pass


def _stop_signals() -> tuple[int, ...]:
    """The signals that stop a role: SIGTERM, and SIGINT unless this process was started with it ignored.

    A job started in the background by a shell without job control inherits SIGINT
    ignored; like trio, we leave it so. Signals are only seen from the main thread.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return ()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        return (signal.SIGINT, signal.SIGTERM)
    return (signal.SIGTERM,)


async def _until_signalled(watched: tuple[int, ...], async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run the role; Ctrl-C or SIGTERM (systemd, docker stop) cancels it, with a line saying which.

    Ctrl-C goes through the same signal receiver as SIGTERM rather than trio's
    ``KeyboardInterrupt``: trio raises that at whatever line of the role's code is
    running when it arrives (any code not under its KI protection), say half-way
    through closing a connection, and what the interrupted code leaves behind can
    fail with another exception, which no ``except* KeyboardInterrupt`` catches.
    A cancellation stops the role only at its checkpoints, where its cleanup is written
    to run. The receiver is open before the role starts; a second Ctrl-C while the role
    is shutting down is trio's ``KeyboardInterrupt`` again (a way out of a stuck shutdown).
    """
    import signal

    async with trio.open_nursery() as nursery:
        if watched:

            async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with trio.open_signal_receiver(*watched) as signals:
                    task_status.started()
                    async for signum in signals:
                        if signum == signal.SIGTERM:
                            _log.info("shutting down (SIGTERM): closing connections")
                        else:
                            _log.info("shutting down (interrupted)")
                        nursery.cancel_scope.cancel()
                        return

            await nursery.start(watch)
        nursery.start_soon(collect_garbage_periodically)
        await async_fn(*args)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- start-up failures
#
# A role that cannot start says so in one line naming the option and what to do,
# with exit status 2 (a usage error), never a traceback.

import errno as _errno
import logging as _logging
import socket as _socket

import click as _click

_log = _logging.getLogger("bridge")


class OptionProblem(_click.ClickException):
    """One line ``Error: ...`` and exit status 2: the command line (or config file) is wrong."""

    exit_code = 2


def _probe_bind(host: str, port: int, kind: int) -> OSError | None:
    """Bind a throw-away socket like a role would; the error, if any."""
    try:
        infos = _socket.getaddrinfo(host or None, port, type=kind, flags=_socket.AI_PASSIVE)
    except _socket.gaierror as exc:
        return exc
    for family, socktype, proto, _name, address in infos:
        with _socket.socket(family, socktype, proto) as sock:
            if kind == _socket.SOCK_STREAM:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            if family == _socket.AF_INET6:
                sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return exc
    return None


def describe_bind_problem(option: str, host: str, port: int, exc: OSError, what: str = "TCP") -> str:
    """The one line for an address ``option`` names that cannot be used."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(exc, _socket.gaierror):
        return (
            f"{option} {shown}: the host name {host!r} does not resolve; use an IP address of this machine "
            "(0.0.0.0 for all) or fix the name in DNS or /etc/hosts"
        )
    if exc.errno == _errno.EADDRINUSE:
        return (
            f"{option} {shown}: {what} port {port} is already in use by another program (another stratumrm?); "
            f"stop it, or choose a free port with {option}"
        )
    if exc.errno == _errno.EADDRNOTAVAIL:
        return (
            f"{option} {shown}: {host} is not an address of this machine; use one of its addresses "
            f"(`ip -br addr`), or 0.0.0.0 for all"
        )
    if exc.errno == _errno.EACCES:
        return (
            f"{option} {shown}: ports below 1024 need privileges; use a port from 1024 up, or grant "
            "CAP_NET_BIND_SERVICE (AmbientCapabilities= in the systemd unit)"
        )
    return f"{option} {shown}: cannot listen there: {exc.strerror or exc}"


def check_names(names: dict[str, str]) -> None:
    """Refuse (exit 2) an option whose host name does not resolve at all.

    ``names`` maps an option (``--pool``) to a host name. A temporary DNS failure
    (EAI_AGAIN) is not a typo: the role starts and its connections retry.
    """
    for option, host in names.items():
        try:
            _socket.getaddrinfo(host, None)
        except _socket.gaierror as exc:
            if exc.errno in (_socket.EAI_AGAIN,):
                _log.warning(
                    "%s: %s does not resolve yet (%s); starting anyway, connections will retry", option, host, exc.strerror
                )
                continue
            raise OptionProblem(
                f"{option}: the host name {host!r} does not resolve; check the spelling, DNS or /etc/hosts"
            ) from None


def run_role(
    async_fn: Callable[..., Awaitable[Any]],
    *args: Any,
    listens: dict[str, tuple[str, int]] | None = None,
    udp: dict[str, tuple[str, int]] | None = None,
) -> None:
    """Run a serving role until Ctrl-C or SIGTERM; a failure to listen is one line, exit status 2.

    ``listens`` maps options to the TCP addresses the role binds (``{"--listen": (host, port)}``),
    ``udp`` likewise for UDP. When the role fails with an ``OSError`` (after trio has closed
    every socket it opened), each address is probed to name the option at fault.
    """
    failure: OSError | None = None
    watched = _stop_signals()
    tune_garbage_collector()
    try:
        trio.run(_until_signalled, watched, async_fn, *args)
    except* KeyboardInterrupt:  # Ctrl-C before the role's signal receiver was open, or after it closed
        _log.info("shutting down (interrupted)")
    except* OSError as group:
        failure = _first_os_error(group)
    if failure is None:
        _log.info("stopped")
        return
    import gc

    gc.collect()  # sockets the failed start left to the garbage collector are closed before the probes
    for kind, what, table in ((_socket.SOCK_STREAM, "TCP", listens or {}), (_socket.SOCK_DGRAM, "UDP", udp or {})):
        for option, (host, port) in table.items():
            problem = _probe_bind(host, port, kind) if port else None
            if problem is not None:
                raise OptionProblem(describe_bind_problem(option, host, port, problem, what))
    raise OptionProblem(f"cannot start: {failure.strerror or failure}")


def _first_os_error(group: BaseExceptionGroup) -> OSError:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_os_error(exc)
        if isinstance(exc, OSError):
            return exc
    raise AssertionError("except* OSError gave a group without one")
