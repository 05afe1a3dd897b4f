"""A lossy UDP relay for tests, the demo and the benchmark.

Theory of operation
===================

:class:`LossyLink` listens on a UDP port and relays datagrams between one *client*
(whoever sent to the listening port last: learned from the first datagram and
re-learned when a datagram arrives from another address, like a peer behind a NAT
that rebinds) and a fixed *target*. It talks to the target from a second,
ephemeral socket, so the target sees the link, not the client, as its peer.

Each direction has its own :class:`Impairment` and its own seeded random stream.
For every datagram the impairer draws exactly three numbers (loss, duplicate,
reorder), whatever the settings, so a given seed drops the same datagrams whether
or not duplication or reordering is switched on. Then, in order:

1. **loss**: drop it (``loss`` percent);
2. **duplicate**: send it twice (``duplicate`` percent);
3. **reorder**: hold it (``reorder`` percent, when nothing is held yet) and release
   it right after the next datagram that goes through in the same direction, or
   after ``reorder_hold_ms`` if none comes;
4. **delay**: every datagram leaves ``delay_ms`` after it arrived (FIFO, so a fixed
   delay alone never reorders).

The decision logic (:class:`Impairer`) is plain code with no I/O, so it is tested
without sockets; :meth:`LossyLink.serve` is the trio driver around it and reports the
bound port through ``task_status.started(port)``. Counters are read with
:meth:`LossyLink.statistics`.

This module is a test and demo tool: it is a driver, and it does use trio and the
clock.
"""

from __future__ import annotations

import random
import socket as _stdlib_socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import trio

__all__ = [
    "DirectionStatistics",
    "Impairer",
    "Impairment",
    "LossyLink",
    "LossyLinkStatistics",
    "direction_impairer",
]

Address = tuple[Any, ...]
_MAX_DATAGRAM = 65535


class _TaskStatus(Protocol):
    def started(self, value: Any = None) -> None: ...


class Impairment(msgspec.Struct, frozen=True, kw_only=True):
    """What one direction of the link does to datagrams (percentages 0..100)."""

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay_ms: float = 0.0
    #: Each datagram's delay varies uniformly within ``delay_ms ± jitter_ms`` (never below
    #: 0), drawn from a stream of its own (so jitter changes no loss decision). The UDP
    #: relay keeps its datagrams in order; the TUN link (:mod:`bridge.testing.tun_link`)
    #: lets jitter reorder them, as netem does.
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} is a percentage, 0..100, not {value}")
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must not be negative, not {self.delay_ms}")
        if self.jitter_ms < 0:
            raise ValueError(f"jitter_ms must not be negative, not {self.jitter_ms}")


class DirectionStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What one direction did, in datagrams."""

    received: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    released_by_timeout: int = 0
    forwarded: int = 0
    send_errors: int = 0
    overflow: int = 0


class LossyLinkStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a :class:`LossyLink`'s counters."""

    to_target: DirectionStatistics
    to_client: DirectionStatistics
    client: Address | None
    clients_learned: int
    #: Datagrams from the target that arrived before any client was known.
    no_client: int
    #: Datagrams on the target-side socket from somewhere other than the target.
    stray: int


@dataclass
class _Counters:
    received: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    released_by_timeout: int = 0
    forwarded: int = 0
    send_errors: int = 0
    overflow: int = 0

    def snapshot(self) -> DirectionStatistics:
        return DirectionStatistics(**self.__dict__)


@dataclass
class Impairer:
    """The per-direction decisions: datagrams in, datagrams to send now out."""

    impairment: Impairment
    rng: random.Random
    counters: _Counters = field(default_factory=_Counters)
    #: Draws the jitter (a stream of its own: switching jitter on changes no other decision).
    jitter_rng: random.Random = field(default_factory=random.Random)
    _held: list[bytes] | None = field(default=None, init=False)
    _held_token: int = field(default=0, init=False)

    def admit(self, data: bytes) -> list[bytes]:
        """Decide the fate of one arriving datagram; return what to send now, in order."""
        self.counters.received += 1
        lose = self.rng.random() * 100.0 < self.impairment.loss
        duplicate = self.rng.random() * 100.0 < self.impairment.duplicate
        reorder = self.rng.random() * 100.0 < self.impairment.reorder
        if lose:
            self.counters.dropped += 1
            return []
        out = [data]
        if duplicate:
            self.counters.duplicated += 1
            out.append(data)
        if reorder and self._held is None:
            self.counters.reordered += 1
            self._held = out
            self._held_token += 1
            return []
        if self._held is not None:
            out.extend(self._held)
            self._held = None
        return out

    def delay(self) -> float:
        """Seconds the next datagram spends on the link: ``delay_ms``, ± ``jitter_ms`` if set."""
        impairment = self.impairment
        delay = impairment.delay_ms
        if impairment.jitter_ms:
            delay += self.jitter_rng.uniform(-impairment.jitter_ms, impairment.jitter_ms)
        return max(0.0, delay) / 1000.0

    @property
    def holding(self) -> int | None:
        """A token naming the datagram held for reordering, or None."""
        return self._held_token if self._held is not None else None

    def release(self, token: int) -> list[bytes]:
        """Release the held datagram if it is still the one named by ``token``."""
        if self._held is None or token != self._held_token:
            return []
        out, self._held = self._held, None
        self.counters.released_by_timeout += 1
        return out


def _direction_rng(seed: int | str | None, direction: str) -> random.Random:
    """One independent stream per direction: reproducible with a seed, random without."""
    if seed is None:
        return random.Random()
    return random.Random(f"{seed}/{direction}")


def direction_impairer(impairment: Impairment, seed: int | str | None, direction: str) -> Impairer:
    """The :class:`Impairer` of one direction, its decisions and its jitter seeded from ``seed``."""
    return Impairer(impairment, _direction_rng(seed, direction), jitter_rng=_direction_rng(seed, f"{direction}/jitter"))


class LossyLink:
    """A UDP relay between one (re-learnable) client and a fixed target, with impairments.

    ``loss``, ``duplicate``, ``reorder`` (percent) and ``delay_ms`` apply to both
    directions unless ``to_target`` or ``to_client`` give a direction its own
    :class:`Impairment`. ``seed`` makes every decision reproducible. ``rewrite``
    (an on-path attacker, :mod:`bridge.testing.tamper`) sees every datagram first,
    with its direction (``"to_target"`` or ``"to_client"``), and returns the bytes
    to relay instead.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target: tuple[str, int],
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay_ms: float = 0.0,
        seed: int | str | None = None,
        to_target: Impairment | None = None,
        to_client: Impairment | None = None,
        reorder_hold_ms: float = 50.0,
        queue_size: int = 4096,
        rewrite: Callable[[str, bytes], bytes] | None = None,
    ) -> None:
        self.rewrite = rewrite
        both = Impairment(loss=loss, duplicate=duplicate, reorder=reorder, delay_ms=delay_ms)
        self._listen = (listen_host, listen_port)
        self._target_name = target
        self._reorder_hold = reorder_hold_ms / 1000.0
        self._queue_size = queue_size
        self._up = direction_impairer(to_target or both, seed, "to_target")
        self._down = direction_impairer(to_client or both, seed, "to_client")
        self._client: Address | None = None
        self._clients_learned = 0
        self._no_client = 0
        self._stray = 0
        self._port: int | None = None
        self._upstream_port: int | None = None

    def set_impairment(self, *, to_target: Impairment | None = None, to_client: Impairment | None = None) -> None:
        """Change what either direction does from now on (e.g. block UDP, then unblock it)."""
        if to_target is not None:
            self._up.impairment = to_target
        if to_client is not None:
            self._down.impairment = to_client

    @property
    def port(self) -> int | None:
        """The bound listening port, once :meth:`serve` has started."""
        return self._port

    @property
    def upstream_port(self) -> int | None:
        """The local port the link uses toward the target (what the target sees)."""
        return self._upstream_port

    def statistics(self) -> LossyLinkStatistics:
        """A frozen snapshot of the counters."""
        return LossyLinkStatistics(
            to_target=self._up.counters.snapshot(),
            to_client=self._down.counters.snapshot(),
            client=self._client,
            clients_learned=self._clients_learned,
            no_client=self._no_client,
            stray=self._stray,
        )

    async def serve(self, *, task_status: _TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled; ``task_status.started(port)`` once listening."""
        listen_info = await trio.socket.getaddrinfo(
            self._listen[0], self._listen[1], type=trio.socket.SOCK_DGRAM, flags=trio.socket.AI_PASSIVE
        )
        target_info = await trio.socket.getaddrinfo(self._target_name[0], self._target_name[1], type=trio.socket.SOCK_DGRAM)
        listen_family, *_, listen_addr = listen_info[0]
        target_family, *_, target_addr = target_info[0]
        listener = trio.socket.socket(listen_family, trio.socket.SOCK_DGRAM)
        upstream = trio.socket.socket(target_family, trio.socket.SOCK_DGRAM)
        with listener, upstream:
            await listener.bind(listen_addr)
            await upstream.bind(("::", 0) if target_family == _stdlib_socket.AF_INET6 else ("0.0.0.0", 0))
            self._port = listener.getsockname()[1]
            self._upstream_port = upstream.getsockname()[1]
            to_target_in, to_target_out = trio.open_memory_channel[tuple[float, bytes, Address]](self._queue_size)
            to_client_in, to_client_out = trio.open_memory_channel[tuple[float, bytes, Address]](self._queue_size)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, to_target_out, upstream, self._up)
                nursery.start_soon(self._send_loop, to_client_out, listener, self._down)
                nursery.start_soon(self._client_loop, listener, to_target_in, target_addr, nursery)
                nursery.start_soon(self._target_loop, upstream, to_client_in, target_addr, nursery)
                task_status.started(self._port)

    def _enqueue(
        self,
        impairer: Impairer,
        queue: trio.MemorySendChannel[tuple[float, bytes, Address]],
        datagrams: list[bytes],
        destination: Address,
    ) -> None:
        now = trio.current_time()
        for data in datagrams:
            try:
                queue.send_nowait((now + impairer.delay(), data, destination))
            except trio.WouldBlock:
                impairer.counters.overflow += 1

    def _admit(
        self,
        impairer: Impairer,
        queue: trio.MemorySendChannel[tuple[float, bytes, Address]],
        data: bytes,
        destination: Address,
        nursery: trio.Nursery,
    ) -> None:
        was_holding = impairer.holding
        self._enqueue(impairer, queue, impairer.admit(data), destination)
        token = impairer.holding
        if token is not None and token != was_holding:
            nursery.start_soon(self._release_later, impairer, queue, token, destination)

    async def _release_later(
        self,
        impairer: Impairer,
        queue: trio.MemorySendChannel[tuple[float, bytes, Address]],
        token: int,
        destination: Address,
    ) -> None:
        await trio.sleep(self._reorder_hold)
        self._enqueue(impairer, queue, impairer.release(token), destination)

    async def _client_loop(
        self,
        listener: trio.socket.SocketType,
        queue: trio.MemorySendChannel[tuple[float, bytes, Address]],
        target: Address,
        nursery: trio.Nursery,
    ) -> None:
        while True:
            try:
                data, source = await listener.recvfrom(_MAX_DATAGRAM)
            except OSError:
                continue  # e.g. an ICMP error surfacing on the socket; keep relaying
            if source != self._client:
                self._client = source
                self._clients_learned += 1
            if self.rewrite is not None:
                data = self.rewrite("to_target", data)
            self._admit(self._up, queue, data, target, nursery)

    async def _target_loop(
        self,
        upstream: trio.socket.SocketType,
        queue: trio.MemorySendChannel[tuple[float, bytes, Address]],
        target: Address,
        nursery: trio.Nursery,
    ) -> None:
        while True:
            try:
                data, source = await upstream.recvfrom(_MAX_DATAGRAM)
            except OSError:
                continue
            if source[:2] != target[:2]:
                self._stray += 1
                continue
            client = self._client
            if client is None:
                self._no_client += 1
                continue
            if self.rewrite is not None:
                data = self.rewrite("to_client", data)
            self._admit(self._down, queue, data, client, nursery)

    async def _send_loop(
        self,
        queue: trio.MemoryReceiveChannel[tuple[float, bytes, Address]],
        sock: trio.socket.SocketType,
        impairer: Impairer,
    ) -> None:
        async for due, data, destination in queue:
            delay = due - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)
            try:
                await sock.sendto(data, destination)
            except OSError:
                impairer.counters.send_errors += 1
            else:
                impairer.counters.forwarded += 1
