"""The benchmarks' child processes: each role of the chain in a process of its own.

CPU time per share is read per process, so the reference pool, the miner-side proxy,
the sidecar and the lossy UDP link each run in a child started with ``python -m
bridge.bench.roles ROLE [options]``. A child serves its role on 127.0.0.1 and talks
to the benchmark over its standard input and output, one JSON object per line:

- once serving it writes ``{"ready": {...}}`` (its ports);
- for every command line ``{"command": NAME, ...}`` it writes one answer line,
  ``{"ok": ...}`` or ``{"error": "..."}``;
- end of input stops it.

Commands: every role answers ``stats`` (its counters) and ``memory`` (tasks, objects by
type, allocations by code line: :mod:`bridge.bench.memory`). The pool also takes
``record`` (``{"on": true}`` starts timestamping every ``mining.submit`` it receives,
and the moment its verdict is handed to the connection's stream, by nonce; ``false``
stops), ``receipts`` and ``answers`` (hand over and forget those timestamps) and
``new_block``. Logs (warnings and up) go to standard error, which the benchmark sends
to a file.

:class:`RoleProcess` is the benchmark's side: it starts a child, waits for its ready
line, sends commands and stops it.
"""

from __future__ import annotations

import cProfile
import functools
import math
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import click
import msgspec
import trio

import bridge
from bridge.bench.memory import census, waits
from bridge.config import parse_upstream_url
from bridge.runtime import collect_garbage_periodically, tune_garbage_collector
from bridge.sv1.framing import decode_json
from bridge.sv1.messages import Submit
from bridge.testing.pool import PoolConfig, ReferencePool
from bridge.testing.pool_core import ConnectionState, PoolCore

HOST = "127.0.0.1"


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, host: str = HOST) -> int:
    """A port nothing on ``host`` uses now: TCP, or UDP with ``socket.SOCK_DGRAM``."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


_encode = msgspec.json.Encoder().encode
_decode = decode_json


class ProcessPair:
    """Two processes a path's shares cross, as StratumRM's proxy and sidecar (the stunnel and
    the bare Python pairs): the miner-side one first in :attr:`processes`."""

    def __init__(self) -> None:
        self.processes: list[trio.Process] = []

    @property
    def pids(self) -> dict[str, int]:
        """CPU meter names: the miner-side process stands where the proxy does, the pool-side one where the sidecar does."""
        miner_side, pool_side = self.processes
        return {"proxy": miner_side.pid, "sidecar": pool_side.pid}

    async def stop(self) -> None:
        """Terminate both, and kill what has not exited 5 s later."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        with trio.move_on_after(5):
            for process in self.processes:
                await process.wait()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                await process.wait()


class RoleError(Exception):
    """A child process did not start, answered with an error, or died."""


# --------------------------------------------------------------------------- parent side


class RoleProcess:
    """A running child role: its pid, what it reported when ready, and a command line to it."""

    def __init__(self, name: str, process: trio.Process, log_path: Path) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.ready: dict[str, Any] = {}
        self._buffer = bytearray()
        self._lock = trio.Lock()

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @classmethod
    async def start(
        cls,
        name: str,
        role: str,
        options: list[str],
        log_dir: Path,
        *,
        timeout: float = 30.0,
        verbose: bool = False,
        profile: bool = False,
        trace_memory: int = 0,
        prefix: list[str] | None = None,
    ) -> RoleProcess:
        """Start ``role`` with ``options``; return once it reported ready (raises :class:`RoleError`).

        ``prefix`` goes before the command (``ip netns exec NS``: the role runs in that
        network namespace; the program execs, so the pid is still the role's).

        Its log goes to ``log_dir/NAME.log`` (info level with ``verbose``); with ``profile``
        it runs under cProfile and leaves ``log_dir/NAME.pstats`` when stopped; with
        ``trace_memory`` N it runs under tracemalloc keeping N frames (its ``memory``
        command then reports allocations by code line too).
        """
        log_path = log_dir / f"{name}.log"
        flags = ["--verbose"] if verbose else []
        if profile:
            flags += ["--profile", str(log_dir / f"{name}.pstats")]
        command = [*(prefix or []), sys.executable, "-m", "bridge.bench.roles", *flags, role, *options]
        with _open_log(log_path) as log_file:
            process = await trio.lowlevel.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=_child_environment(trace_memory),
            )
        child = cls(name, process, log_path)
        with trio.move_on_after(timeout):
            message = await child._read_message()
            if "ready" not in message:
                raise RoleError(f"{name} did not start: {message.get('error', message)}; log: {log_path}")
            child.ready = message["ready"]
            return child
        await child.stop()
        raise RoleError(f"{name} not ready after {timeout:g} s; {child.log_tail()}")

    async def request(self, command: str, **params: Any) -> Any:
        """Send a command, return its ``ok`` value."""
        async with self._lock:
            assert self.process.stdin is not None
            try:
                await self.process.stdin.send_all(_encode({"command": command, **params}) + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise RoleError(f"{self.name} is gone ({exc}); {self.log_tail()}") from None
            message = await self._read_message()
        if "error" in message:
            raise RoleError(f"{self.name}: {command} failed: {message['error']}")
        return message["ok"]

    async def _read_message(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some(1 << 20)
            if not data:
                raise RoleError(f"{self.name} exited (status {self.process.poll()}); {self.log_tail()}")
            self._buffer += data
        end = self._buffer.index(b"\n")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        message = _decode(line)
        if not isinstance(message, dict):
            raise RoleError(f"{self.name} wrote {line[:80]!r}, not a JSON object")
        return message

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return f"no log at {self.log_path}"
        return f"last lines of {self.log_path}:\n" + "\n".join(text[-lines:]) if text else f"empty log {self.log_path}"

    async def stop(self, timeout: float = 5.0) -> None:
        """Close its input (it exits), then terminate or kill it if it lingers."""
        process = self.process
        if process.stdin is not None:
            try:
                await process.stdin.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.move_on_after(timeout):
            await process.wait()
            return
        process.terminate()
        with trio.move_on_after(timeout):
            await process.wait()
            return
        process.kill()
        await process.wait()


@dataclass(frozen=True)
class RoleLauncher:
    """Starts roles with their logs in one directory, at one log level, profiled or not."""

    log_dir: Path
    verbose: bool = False
    profile: bool = False
    trace_memory: int = 0

    async def start(self, name: str, role: str, options: list[str], *, prefix: list[str] | None = None) -> RoleProcess:
        return await RoleProcess.start(
            name,
            role,
            options,
            self.log_dir,
            prefix=prefix,
            timeout=120.0 if self.trace_memory else 30.0,  # imports alone are several times slower traced
            verbose=self.verbose,
            profile=self.profile,
            trace_memory=self.trace_memory,
        )


def _open_log(path: Path) -> BinaryIO:
    """The file a child's standard error goes to (created or truncated)."""
    return open(path, "wb")


def _child_environment(trace_memory: int = 0) -> dict[str, str]:
    """This environment, with the directory holding the ``bridge`` package first on the path.

    ``trace_memory`` N > 0 starts the child under tracemalloc with N frames per trace.
    """
    package_root = str(Path(bridge.__file__).resolve().parent.parent)
    environment = dict(os.environ)
    environment.pop("PYTHONTRACEMALLOC", None)
    if trace_memory > 0:
        environment["PYTHONTRACEMALLOC"] = str(trace_memory)
    existing = environment.get("PYTHONPATH")
    environment["PYTHONPATH"] = package_root + (os.pathsep + existing if existing else "")
    return environment


# --------------------------------------------------------------------------- child side


class _TimestampingCore(PoolCore):
    """The reference pool's core, noting arrivals and holding verdicts back for :class:`TimestampingPool`."""

    def __init__(self, config: PoolConfig, pool: TimestampingPool) -> None:
        super().__init__(config)
        self._pool = pool
        self._unsent: dict[ConnectionState, list[int]] = {}
        """Nonces judged while recording whose verdict is not yet taken for sending, per connection."""

    def submit(self, connection: ConnectionState, submit: Submit, now: float) -> None:
        pool = self._pool
        received = time.monotonic()
        if pool.receipts is not None:
            pool.receipts[_nonce(submit)] = received
        if pool.delay > 0:
            pool.hold(received + pool.delay, connection, submit)
            return
        self._judge_now(connection, submit, now)

    def judge_held(self, connection: ConnectionState, submit: Submit, now: float) -> None:
        """Judge a submit :meth:`submit` held back.

        Outside :meth:`receive_data`, nothing else marks the connection as having
        output: without this the verdict waited for the connection's next job.
        """
        self._judge_now(connection, submit, now)
        self._mark_ready(connection)

    def _judge_now(self, connection: ConnectionState, submit: Submit, now: float) -> None:
        super().submit(connection, submit, now)
        if self._pool.answers is not None:
            self._unsent.setdefault(connection, []).append(_nonce(submit))

    def data_to_send(self, connection: ConnectionState) -> bytes:
        """The connection's bytes; the verdicts in them are the pool's answers, stamped now.

        The stamp is taken as the pool's writer hands the bytes to its stream (before
        TLS encrypts them on a TLS listener: the TLS record is part of that path's cost).
        """
        data = super().data_to_send(connection)
        nonces = self._unsent.pop(connection, None)
        answers = self._pool.answers
        if nonces and answers is not None:
            answered = time.monotonic()
            for nonce in nonces:
                answers[nonce] = answered
        return data

    def connection_lost(self, connection: ConnectionState, now: float) -> None:
        self._unsent.pop(connection, None)
        super().connection_lost(connection, now)


def _nonce(submit: Submit) -> int:
    nonce = submit.params.nonce
    return nonce if isinstance(nonce, int) else int(nonce, 16)


class TimestampingPool(ReferencePool):
    """The reference pool, noting when each ``mining.submit`` arrives (by nonce) while recording.

    The time is ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every
    process of the machine) when the pool starts handling the submit, right after
    the bytes were read from the socket.
    """

    def __init__(self, config: PoolConfig) -> None:
        self._timestamping = _TimestampingCore(config, self)
        super().__init__(core=self._timestamping)
        self.receipts: dict[int, float] | None = None
        self.answers: dict[int, float] | None = None
        """While recording: when each verdict was handed to the connection's stream, by nonce."""
        #: Seconds every verdict is held back (a slow pool); 0 answers at once.
        self.delay = 0.0
        self._delayed_send, self._delayed = trio.open_memory_channel[tuple[float, ConnectionState, Submit]](math.inf)

    def hold(self, due: float, connection: ConnectionState, submit: Submit) -> None:
        """Keep a submit until ``due`` (``time.monotonic()``); :meth:`answer_late` judges it."""
        self._delayed_send.send_nowait((due, connection, submit))

    async def answer_late(self) -> None:
        """Judge the held-back submits when they are due (run in the pool's nursery)."""
        async for due, connection, submit in self._delayed:
            wait = due - time.monotonic()
            if wait > 0:
                await trio.sleep(wait)
            self._timestamping.judge_held(connection, submit, self.clock())
            self.flush()


Handler = Callable[[dict[str, Any]], Any]
"""Answers one command: takes the command line's object, returns the ``ok`` value."""


async def _serve_commands(handlers: dict[str, Handler], ready: dict[str, Any]) -> None:
    """Write the ready line, then answer command lines until end of input.

    Every role also answers ``memory`` (:func:`bridge.bench.memory.census`) and
    ``waits`` (:func:`bridge.bench.memory.waits`).
    """
    handlers = {"memory": lambda _message: census(), "waits": lambda _message: waits(), **handlers}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect_garbage_periodically)  # as the roles' own commands do (run_role)
        await _answer_commands(handlers, ready)
        nursery.cancel_scope.cancel()


async def _answer_commands(handlers: dict[str, Handler], ready: dict[str, Any]) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    await stdout.send_all(_encode({"ready": ready}) + b"\n")
    buffer = bytearray()
    while True:
        data = await stdin.receive_some(65536)
        if not data:
            return
        buffer += data
        while b"\n" in buffer:
            end = buffer.index(b"\n")
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            try:
                message = _decode(line)
                handler = handlers[message["command"]]
                answer: dict[str, Any] = {"ok": handler(message)}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            data = _encode(answer) + b"\n"
            del answer, message  # a census held until the next command would count in the next one
            await stdout.send_all(data)


def _to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at info level (default: warnings only).")
@click.option(
    "--profile", "profile_path", type=click.Path(dir_okay=False), help="Run under cProfile; write the stats here on exit."
)
@click.pass_context
def roles(context: click.Context, verbose: bool, profile_path: str | None) -> None:
    """Roles of the benchmark chain, one per process (started by `stratumrm bench`)."""
    from bridge import logs

    logs.setup(0, quiet=not verbose)
    tune_garbage_collector()  # as the roles' own commands do (run_role)
    if profile_path is not None:
        profiler = cProfile.Profile()
        profiler.enable()

        def write_profile() -> None:
            profiler.disable()
            profiler.dump_stats(profile_path)

        context.call_on_close(write_profile)


@roles.command()
@click.option("--listener", "listeners", multiple=True, help="NAME of a plain Stratum V1 listener (repeatable).")
@click.option("--tls-listener", "tls_listeners", multiple=True, help="NAME of a Stratum V1 over TLS listener (repeatable).")
@click.option("--cert", type=click.Path(dir_okay=False), help="Pool certificate, for TLS listeners.")
@click.option("--key", type=click.Path(dir_okay=False), help="Its key.")
@click.option("--difficulty", type=float, default=1e-10, show_default=True)
@click.option("--notify-interval", type=float, default=3600.0, show_default=True)
@click.option("--block-interval", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option(
    "--max-merkle-branches",
    type=click.IntRange(0, 24),
    default=12,
    show_default=True,
    help="Jobs get 0 to this many merkle branches.",
)
def pool(
    listeners: tuple[str, ...],
    tls_listeners: tuple[str, ...],
    cert: str | None,
    key: str | None,
    difficulty: float,
    notify_interval: float,
    block_interval: float | None,
    seed: int | None,
    max_merkle_branches: int,
) -> None:
    """The reference pool, timestamping submits on request."""
    from bridge.pki.tls import public_server_context

    config = PoolConfig(
        difficulty=difficulty,
        notify_interval=notify_interval,
        block_interval=block_interval,
        seed=seed,
        max_merkle_branches=max_merkle_branches,
        max_records=1000,
    )
    reference_pool = TimestampingPool(config)
    if tls_listeners and cert is None:
        raise click.UsageError("TLS listeners need --cert and --key")
    tls_context = public_server_context(cert, key) if tls_listeners and cert is not None else None

    def record(message: dict[str, Any]) -> None:
        on = bool(message.get("on"))
        reference_pool.receipts = {} if on else None
        reference_pool.answers = {} if on else None

    def receipts(_message: dict[str, Any]) -> list[tuple[int, float]]:
        taken = reference_pool.receipts or {}
        if reference_pool.receipts is not None:
            reference_pool.receipts = {}
        return list(taken.items())

    def answers(_message: dict[str, Any]) -> list[tuple[int, float]]:
        taken = reference_pool.answers or {}
        if reference_pool.answers is not None:
            reference_pool.answers = {}
        return list(taken.items())

    def new_block(_message: dict[str, Any]) -> int:
        reference_pool.new_block()
        return reference_pool.height

    def stats(_message: dict[str, Any]) -> Any:
        return _to_builtins(reference_pool.statistics())

    def delay(message: dict[str, Any]) -> float:
        reference_pool.delay = float(message.get("seconds", 0.0))
        return reference_pool.delay

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reference_pool.answer_late)
            ports: dict[str, int] = {}
            for name in listeners:
                ports[name] = await nursery.start(reference_pool.serve, HOST, 0)
            for name in tls_listeners:
                ports[name] = await nursery.start(functools.partial(reference_pool.serve, HOST, 0, ssl_context=tls_context))
            handlers = {
                "stats": stats,
                "record": record,
                "receipts": receipts,
                "answers": answers,
                "new_block": new_block,
                "delay": delay,
            }
            await _serve_commands(handlers, {"ports": ports})
            nursery.cancel_scope.cancel()

    trio.run(main)


@roles.command()
@click.option("--upstream", required=True, help="stratum+tcp://, stratum+ssl:// or stratumrm:// URL.")
@click.option("--bundle", type=click.Path(dir_okay=False), help="Proxy certificate bundle (stratumrm://).")
@click.option("--upstream-ca", type=click.Path(dir_okay=False), help="CA of a stratum+ssl:// pool.")
@click.option("--share-batch-window", type=float, default=0.0, show_default=True)
def proxy(upstream: str, bundle: str | None, upstream_ca: str | None, share_batch_window: float) -> None:
    """The miner-side proxy."""
    from bridge.net.miner_proxy import MinerProxy
    from bridge.pki.tls import client_context_from_bundle, public_client_context

    url = parse_upstream_url(upstream)
    context: ssl.SSLContext | None
    if url.transport == "stratumrm":
        if bundle is None:
            raise click.UsageError("a stratumrm:// upstream needs --bundle")
        context = client_context_from_bundle(bundle)
    else:
        context = public_client_context(upstream_ca) if url.tls else None
    server = MinerProxy(url, upstream_ssl_context=context, share_batch_window=share_batch_window)

    def stats(_message: dict[str, Any]) -> Any:
        link = server.link
        connection = link.connection if link is not None else None
        return {
            "proxy": _to_builtins(server.statistics()),
            "link": _to_builtins(connection.statistics()) if connection is not None else None,
            "udp_send_drops": link.udp_send_drops if link is not None else 0,
        }

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, HOST, 0)
            await _serve_commands({"stats": stats}, {"port": port})
            nursery.cancel_scope.cancel()

    trio.run(main)


@roles.command()
@click.option("--pool", "pool_url", required=True, help="stratum+tcp:// URL of the pool.")
@click.option("--cert", type=click.Path(dir_okay=False), required=True)
@click.option("--key", type=click.Path(dir_okay=False), required=True)
@click.option("--ca", type=click.Path(dir_okay=False), required=True)
@click.option("--host", default=HOST, show_default=True, help="Address to listen on (TCP and UDP).")
@click.option("--udp-port", type=int, default=None, help="UDP port (default: the TCP port's number).")
@click.option("--advertise-port", type=int, default=None, help="UDP port to tell proxies (a lossy link in front).")
@click.option("--batch-window", type=float, default=None, help="Verdict and notify batching window, seconds.")
@click.option("--handshake-timeout", type=float, default=None, help="Seconds to finish the TLS handshake.")
@click.option("--max-pending", type=int, default=None, help="Connections in their TLS handshake, at most.")
@click.option("--max-pending-per-source", type=int, default=None, help="... from one address.")
def sidecar(
    pool_url: str,
    cert: str,
    key: str,
    ca: str,
    host: str,
    udp_port: int | None,
    advertise_port: int | None,
    batch_window: float | None,
    handshake_timeout: float | None,
    max_pending: int | None,
    max_pending_per_source: int | None,
) -> None:
    """The pool-side sidecar."""
    from bridge.net.admission import AdmissionLimits
    from bridge.net.sidecar import SidecarServer
    from bridge.pki.tls import server_context

    options: dict[str, Any] = {}
    if batch_window is not None:
        options["batch_window"] = batch_window
    if handshake_timeout is not None:
        options["handshake_timeout"] = handshake_timeout
    caps = {"max_pending": max_pending, "max_pending_per_source": max_pending_per_source}
    if any(value is not None for value in caps.values()):
        options["admission"] = AdmissionLimits(**{name: value for name, value in caps.items() if value is not None})
    server = SidecarServer(
        parse_upstream_url(pool_url),
        server_context(cert, key, ca),
        udp_port=udp_port,
        advertise_host=HOST if advertise_port else None,
        advertise_port=advertise_port,
        **options,
    )

    def stats(_message: dict[str, Any]) -> Any:
        sessions = [session.statistics() for session in server.sessions()]
        return {
            "sidecar": _to_builtins(server.statistics()),
            "udp_bytes_sent": sum(s.udp_bytes_sent for s in sessions),
            "udp_bytes_received": sum(s.udp_bytes_received for s in sessions),
            "udp_datagrams_sent": sum(s.udp_datagrams_sent for s in sessions),
            "ack_datagrams_sent": sum(s.ack_datagrams_sent for s in sessions),
            "verdict_datagrams_sent": sum(s.verdict_datagrams_sent for s in sessions),
            "udp_send_drops": server.udp_send_drops,
            "sessions": [_to_builtins(s) for s in sessions],
            "results_lines": sum(s.results_lines for s in sessions),
            "job_lines": sum(s.jobs_announced for s in sessions),
            "notify_lines": sum(s.notify_lines for s in sessions),
        }

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, host, 0)
            await _serve_commands({"stats": stats}, {"port": port, "udp_port": server.udp_port})
            nursery.cancel_scope.cancel()

    trio.run(main)


@roles.command("lossy-link")
@click.option("--port", type=int, required=True, help="UDP port to listen on.")
@click.option("--target-port", type=int, required=True, help="UDP port to relay to (on 127.0.0.1).")
@click.option("--loss", type=float, required=True, help="Percent of datagrams dropped, each direction.")
@click.option("--delay-ms", type=float, default=0.0, show_default=True, help="Delay of every datagram, each direction.")
@click.option("--seed", type=int, default=None)
def lossy_link(port: int, target_port: int, loss: float, delay_ms: float, seed: int | None) -> None:
    """A UDP relay that drops a share of the datagrams (and delays the rest)."""
    from bridge.testing.lossy_link import LossyLink

    link = LossyLink(HOST, port, (HOST, target_port), loss=loss, delay_ms=delay_ms, seed=seed)

    def stats(_message: dict[str, Any]) -> Any:
        return _to_builtins(link.statistics())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(link.serve)
            await _serve_commands({"stats": stats}, {"port": bound})
            nursery.cancel_scope.cancel()

    trio.run(main)


@roles.command("tun-link")
@click.option("--namespace-a", required=True, help="Namespace of side a (the miners').")
@click.option("--device-a", required=True, help="TUN device name for side a.")
@click.option("--namespace-b", required=True, help="Namespace of side b (the pool's).")
@click.option("--device-b", required=True, help="TUN device name for side b.")
@click.option("--loss", type=float, default=0.0, show_default=True, help="Percent of packets dropped, each direction.")
@click.option("--delay-ms", type=float, default=0.0, show_default=True, help="Delay of every packet, each direction.")
@click.option("--jitter-ms", type=float, default=0.0, show_default=True, help="Delay varies by up to this much.")
@click.option("--duplicate", type=float, default=0.0, show_default=True, help="Percent of packets sent twice.")
@click.option("--seed", type=int, default=None)
def tun_link(
    namespace_a: str,
    device_a: str,
    namespace_b: str,
    device_b: str,
    loss: float,
    delay_ms: float,
    jitter_ms: float,
    duplicate: float,
    seed: int | None,
) -> None:
    """The impaired TUN link between two namespaces (the lab's; it owns the TUN devices)."""
    from bridge.testing.lossy_link import Impairment
    from bridge.testing.tun_link import TunLinkCore, forward, open_link

    core = TunLinkCore(Impairment(loss=loss, delay_ms=delay_ms, jitter_ms=jitter_ms, duplicate=duplicate), seed=seed)
    fd_a, fd_b = open_link(namespace_a, device_a, namespace_b, device_b)

    def stats(_message: dict[str, Any]) -> Any:
        return _to_builtins(core.statistics())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward, core, fd_a, fd_b)
            await _serve_commands({"stats": stats}, {"a": namespace_a, "b": namespace_b})
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        os.close(fd_a)
        os.close(fd_b)


if __name__ == "__main__":
    roles(prog_name="python -m bridge.bench.roles")
