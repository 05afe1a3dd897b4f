"""Receiving datagrams in batches: one trio wake-up, then every datagram already queued.

``await sock.recvfrom()`` per datagram costs a trip through trio's scheduler each
time, which under a flood is most of the CPU a dropped datagram costs. After one
wait for readability, :func:`receive_datagrams` reads what the kernel holds with
non-blocking ``recvfrom`` calls (at most ``batch``, then it yields so other tasks
run), and hands each datagram to a synchronous callback with the batch's ``now``;
what must follow the input (writing a session's output) runs once per batch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Hashable
from typing import Any

import trio

__all__ = ["BUFFER_SIZE", "DatagramSender", "nonblocking_twin", "read_pending", "receive_datagrams", "tune_udp"]


async def receive_datagrams(
    udp_socket: trio.socket.SocketType,
    on_datagram: Callable[[bytes, Any, float], Hashable | None],
    size: int,
    after_batch: Callable[[set[Hashable]], None],
    *,
    batch: int = 256,
) -> None:
    """Feed every datagram ``udp_socket`` receives to ``on_datagram(data, address, now)``.

    What ``on_datagram`` returns, when not None (e.g. the session that now has output),
    is collected, and ``after_batch`` gets the set once per batch, so that work is done
    once per batch and not once per datagram. Runs until cancelled.
    """
    # A second descriptor for the same socket, so plain non-blocking calls can drain it
    # while trio keeps using its own object for sending.
    raw = nonblocking_twin(udp_socket)
    current_time = trio.current_time
    try:
        while True:
            await trio.lowlevel.wait_readable(raw)
            touched: set[Hashable] = set()
            drained = read_pending(raw, on_datagram, size, current_time(), touched, batch)
            if touched:
                after_batch(touched)
            if not drained:
                await trio.lowlevel.checkpoint()
    finally:
        raw.close()


def nonblocking_twin(udp_socket: Any) -> socket.socket:
    """A second, non-blocking descriptor for ``udp_socket`` (plain calls, no trio)."""
    raw = socket.socket(fileno=os.dup(udp_socket.fileno()))
    raw.setblocking(False)
    return raw


def read_pending(
    raw: socket.socket,
    on_datagram: Callable[[bytes, Any, float], Hashable | None],
    size: int,
    now: float,
    touched: set[Hashable],
    limit: int = 256,
) -> bool:
    """Feed the datagrams the kernel already holds (at most ``limit``) to ``on_datagram``.

    Never waits. What ``on_datagram`` returns, when not None, is added to ``touched``.
    Returns True when the socket was left empty, False when ``limit`` stopped it.
    A timer about to call a datagram late uses it first: after the process was
    descheduled, the acknowledgement may already be waiting in the kernel.
    """
    recvfrom = raw.recvfrom
    for _ in range(limit):
        try:
            data, address = recvfrom(size)
        except BlockingIOError:
            return True
        except OSError:
            continue  # e.g. ICMP port unreachable reported on a later receive
        result = on_datagram(data, address, now)
        if result is not None:
            touched.add(result)
    return False


#: Bytes asked for each direction's kernel buffer (the kernel may cap it, net.core.rmem_max).
BUFFER_SIZE = 4 * 1024 * 1024


def tune_udp(sock: Any) -> None:
    """Ask for :data:`BUFFER_SIZE` receive and send buffers (best effort).

    A burst of datagrams (a pool answering a batch of shares, many rigs at once) then
    waits in the kernel instead of being dropped while the event loop serves others.
    """
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_SIZE)
        except OSError:
            pass


class DatagramSender:
    """Sends on one trio UDP socket that never wait (through a duplicate of its descriptor).

    A datagram the kernel cannot take right now (the send buffer is full: on loopback
    a datagram stays charged to it until the peer reads it) is dropped and counted,
    as the network would drop it; the data channel's retransmission recovers it.
    Waiting instead would hold up whatever else the sending task writes, the control
    connection included.
    """

    def __init__(self, udp_socket: trio.socket.SocketType) -> None:
        self._raw = socket.socket(fileno=os.dup(udp_socket.fileno()))
        self._raw.setblocking(False)
        self.dropped = 0
        """Datagrams the kernel had no room for (not sent)."""

    def close(self) -> None:
        self._raw.close()

    def send(self, data: bytes, address: Any = None) -> bool:
        """Send ``data`` (to ``address`` unless the socket is connected); False if it was dropped.

        ``OSError`` other than a full buffer (e.g. an ICMP error reported now) is raised.
        """
        try:
            if address is None:
                self._raw.send(data)
            else:
                self._raw.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
            return False
        return True
