"""The data channel drivers' UDP helpers: bigger buffers and sends that never wait."""

from __future__ import annotations

import socket

import trio

from bridge.net.udp import DatagramSender, receive_datagrams, tune_udp


async def test_sends_that_never_wait_arrive_and_a_batch_delivers_them() -> None:
    receiver = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender_socket = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender_socket:
        tune_udp(receiver)
        tune_udp(sender_socket)
        await receiver.bind(("127.0.0.1", 0))
        address = receiver.getsockname()
        sender = DatagramSender(sender_socket)
        got: list[bytes] = []
        try:
            assert all(sender.send(b"datagram %d" % n, address) for n in range(10))
            assert sender.dropped == 0
            async with trio.open_nursery() as nursery:

                def on_datagram(data: bytes, _address: object, _now: float) -> None:
                    got.append(data)
                    return None

                def after_batch(_touched: set) -> None:
                    pass

                nursery.start_soon(receive_datagrams, receiver, on_datagram, 2048, after_batch)
                with trio.fail_after(5):
                    while len(got) < 10:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert got == [b"datagram %d" % n for n in range(10)]
        finally:
            sender.close()
        # The sender had its own descriptor: the socket is still usable.
        await sender_socket.sendto(b"after", address)
        with trio.fail_after(5):
            data, _ = await receiver.recvfrom(2048)
        assert data == b"after"
