"""A stop does not cut a send in half (a TLS stream cut mid-record can no longer say goodbye)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bridge.net.tcp import WholeSends


class SlowStream(trio.abc.SendStream):
    """Puts one byte on the wire every 0.1 s, as a congested link would."""

    def __init__(self) -> None:
        self.wire = bytearray()

    async def send_all(self, data) -> None:
        for byte in bytes(data):
            await trio.sleep(0.1)
            self.wire.append(byte)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_send_under_way_when_the_work_is_cancelled_finishes_whole(autojump_clock) -> None:
    stream = SlowStream()
    sends = WholeSends(grace=5.0)
    async with trio.open_nursery() as work:
        work.start_soon(sends.send_all, stream, b"record")
        work.start_soon(sends.hurry_when_cancelled)
        await trio.sleep(0.25)
        work.cancel_scope.cancel()
    assert bytes(stream.wire) == b"record"


async def test_a_send_that_never_finishes_is_cut_after_the_grace(autojump_clock) -> None:
    sender, _receiver = trio.testing.lockstep_stream_pair()  # nobody ever reads
    sends = WholeSends(grace=2.0)
    outcome: list[BaseException] = []

    async def send() -> None:
        try:
            await sends.send_all(sender, b"record")
        except trio.BrokenResourceError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as work:
        work.start_soon(send)
        work.start_soon(sends.hurry_when_cancelled)
        await trio.sleep(1.0)
        started = trio.current_time()
        work.cancel_scope.cancel()
    assert trio.current_time() - started == pytest.approx(2.0)
    assert outcome and "unfinished 2 s after the stop" in str(outcome[0])
