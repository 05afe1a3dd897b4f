"""A send to a peer that reads nothing: busy (its kernel still answers) or gone.

Real TCP on loopback with small buffers, so a peer that does not read closes its
window within a few kilobytes and this side's TCP probes it, as a proxy too busy to
read its control connection does to the sidecar.
"""

from __future__ import annotations

import socket
import struct

import trio

from bridge.net.tcp import StalledSends, peer_ack_age
from bridge.relay.liveness import BUSY_LIMIT_FACTOR

DEAD_AFTER = 0.3
PAYLOAD = b"x" * 200_000  # far more than both buffers hold


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted socket
    listener.listen()
    client = trio.socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return trio.SocketStream(client), trio.SocketStream(server)


async def _read_all(stream: trio.SocketStream, size: int) -> int:
    got = 0
    while got < size:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        got += len(chunk)
    return got


async def test_a_peer_that_reads_nothing_for_four_dead_afters_but_acknowledges_gets_the_whole_send() -> None:
    sender, receiver = await _pair()
    sends = StalledSends(sender, DEAD_AFTER)
    waited: list[float | None] = []
    async with sender, receiver, trio.open_nursery() as nursery:
        nursery.start_soon(sends.watch)

        async def send() -> None:
            waited.append(await sends.send_all(PAYLOAD))

        nursery.start_soon(send)
        await trio.sleep(4 * DEAD_AFTER)  # the peer is busy: its window is closed, its kernel answers probes
        assert not waited, "the send was cut while the peer's TCP still acknowledged"
        assert await _read_all(receiver, len(PAYLOAD)) == len(PAYLOAD)
        while not waited:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert waited == [None]


async def test_a_hung_peer_is_cut_at_the_busy_limit_and_a_plain_stall_without_the_watch_after_dead_after() -> None:
    sender, receiver = await _pair()
    sends = StalledSends(sender, DEAD_AFTER)
    async with sender, receiver, trio.open_nursery() as nursery:
        nursery.start_soon(sends.watch)
        waited = await sends.send_all(PAYLOAD)  # the peer never reads: a hung process
        nursery.cancel_scope.cancel()
    assert waited is not None
    assert 4 * DEAD_AFTER < waited <= BUSY_LIMIT_FACTOR * DEAD_AFTER + DEAD_AFTER / 2

    sender, receiver = await _pair()
    async with sender, receiver:
        waited = await StalledSends(sender, DEAD_AFTER).send_all(PAYLOAD)  # nobody watches: no excuse
    assert waited is not None and waited < 2 * DEAD_AFTER


async def test_a_closed_window_whose_probes_are_answered_counts_as_acknowledged_now() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    plain = socket.socket()
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    plain.connect(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    sender = trio.SocketStream(trio.socket.from_stdlib_socket(plain))  # non-blocking from here
    try:
        try:
            while True:
                plain.send(PAYLOAD)
        except BlockingIOError:
            pass
        # Window probes go out at 0.2, 0.6, 1.4 s ...; between them the last acknowledgement
        # ages. Wait until the sender probes and the last answer is older than dead_after / 2.
        with trio.fail_after(10):
            while True:
                await trio.sleep(0.05)
                info = plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
                if info[4] > 0 and struct.unpack_from("I", info, 56)[0] > 1000 * DEAD_AFTER / 2:
                    break  # probing a closed window, and the last answer is old...
        assert peer_ack_age(sender) == 0.0  # ...but nothing asked of the peer is unanswered
    finally:
        await sender.aclose()
        peer.close()
