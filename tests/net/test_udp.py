"""The data channel drivers' UDP helpers: bigger buffers, batched receives."""

from __future__ import annotations

import socket

import trio

from bridge.net.udp import DatagramDrain, tune_udp


async def test_a_drain_takes_every_queued_datagram_in_one_batch_and_then_waits() -> None:
    receiver = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        tune_udp(receiver)
        await receiver.bind(("127.0.0.1", 0))
        address = receiver.getsockname()
        drain = DatagramDrain(receiver, 2048, limit=8)
        try:
            for number in range(10):
                await sender.sendto(b"datagram %d" % number, address)
            batches = []
            with trio.fail_after(5):
                while sum(len(batch) for batch in batches) < 10:
                    batches.append(await drain.receive())
            got = [data for batch in batches for data, _ in batch]
            assert got == [b"datagram %d" % number for number in range(10)]
            assert all(1 <= len(batch) <= 8 for batch in batches)  # the limit bounds one batch
            with trio.move_on_after(0.05) as scope:
                await drain.receive()
            assert scope.cancelled_caught  # nothing left: it waits
            # The drain has its own descriptor: closing it leaves the socket usable.
            drain.close()
            await sender.sendto(b"after", address)
            with trio.fail_after(5):
                data, _ = await receiver.recvfrom(2048)
            assert data == b"after"
        finally:
            drain.close()
