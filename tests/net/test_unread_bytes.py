"""``unread_bytes``: what the liveness checks ask the kernel before declaring a peer silent."""

from __future__ import annotations

import socket

import trio
import trio.testing

from bridge.net.tcp import unread_bytes


async def test_unread_bytes_counts_what_the_peer_sent_and_nobody_read() -> None:
    left, right = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    try:
        assert unread_bytes(stream) == 0
        right.sendall(b"rm.pong\n")
        await trio.testing.wait_all_tasks_blocked()
        assert unread_bytes(stream) == 8
        assert await stream.receive_some(100) == b"rm.pong\n"
        assert unread_bytes(stream) == 0
        assert unread_bytes(None) == 0
    finally:
        right.close()
        await stream.aclose()
