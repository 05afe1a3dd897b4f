"""The lossy UDP link: decisions without sockets, then the relay over real 127.0.0.1 sockets."""

from __future__ import annotations

import random

import pytest
import trio

from bridge.testing.lossy_link import Impairer, Impairment, LossyLink

LOCALHOST = "127.0.0.1"
COUNT = 200


# ------------------------------------------------------------------ the decisions, sans-IO


def test_impairer_passes_everything_when_unimpaired() -> None:
    impairer = Impairer(Impairment(), random.Random(1))
    assert [impairer.admit(bytes([i])) for i in range(5)] == [[bytes([i])] for i in range(5)]


def test_impairer_loss_is_seeded_and_independent_of_other_settings() -> None:
    def kept(impairment: Impairment) -> list[int]:
        impairer = Impairer(impairment, random.Random("seed"))
        return [i for i in range(1000) if impairer.admit(i.to_bytes(2, "big"))]

    plain = kept(Impairment(loss=30))
    assert 600 < len(plain) < 800
    assert plain == kept(Impairment(loss=30))
    assert plain == kept(Impairment(loss=30, duplicate=50))


def test_impairer_reorder_holds_one_and_releases_it_after_the_next() -> None:
    impairer = Impairer(Impairment(reorder=100), random.Random(0))
    assert impairer.admit(b"a") == []
    token = impairer.holding
    assert token is not None
    assert impairer.admit(b"b") == [b"b", b"a"]
    assert impairer.holding is None
    assert impairer.release(token) == []  # already released
    assert impairer.admit(b"c") == []
    assert impairer.release(impairer.holding or 0) == [b"c"]
    assert impairer.counters.released_by_timeout == 1


def test_impairer_duplicates() -> None:
    impairer = Impairer(Impairment(duplicate=100), random.Random(0))
    assert impairer.admit(b"x") == [b"x", b"x"]
    assert impairer.counters.duplicated == 1


def test_impairment_validation() -> None:
    with pytest.raises(ValueError):
        Impairment(loss=101)
    with pytest.raises(ValueError):
        Impairment(delay_ms=-1)


# ------------------------------------------------------------------ the relay, real sockets


async def bound_udp_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind((LOCALHOST, 0))
    return sock


async def echo(sock: trio.socket.SocketType) -> None:
    while True:
        data, source = await sock.recvfrom(2048)
        await sock.sendto(data, source)


async def collect(sock: trio.socket.SocketType, quiet: float = 0.25) -> list[int]:
    """Sequence numbers received until nothing arrives for ``quiet`` seconds."""
    seen = []
    while True:
        with trio.move_on_after(quiet):
            data, _ = await sock.recvfrom(2048)
            seen.append(int.from_bytes(data[:4], "big"))
            continue
        return seen


async def send_numbered(sock: trio.socket.SocketType, port: int, count: int = COUNT) -> None:
    for seq in range(count):
        await sock.sendto(seq.to_bytes(4, "big") + bytes(48), (LOCALHOST, port))
        await trio.sleep(0.0005)


async def run_through_link(link_options: dict[str, object], *, echo_back: bool) -> tuple[list[int], LossyLink]:
    """Numbered datagrams through a link. The tests run it on the autojump clock: the
    pacing and the quiet period that ends :func:`collect` cost no real time, and a
    datagram on loopback is readable as soon as it was sent."""
    target = await bound_udp_socket()
    client = await bound_udp_socket()
    with target, client:
        link = LossyLink(LOCALHOST, 0, (LOCALHOST, target.getsockname()[1]), **link_options)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            port = await nursery.start(link.serve)
            assert port == link.port and port > 0
            if echo_back:
                nursery.start_soon(echo, target)
                await send_numbered(client, port)
                seen = await collect(client)
            else:
                nursery.start_soon(send_numbered, client, port)
                seen = await collect(target)
            nursery.cancel_scope.cancel()
    return seen, link


async def test_without_loss_everything_arrives_in_order_both_ways(autojump_clock) -> None:
    seen, link = await run_through_link({}, echo_back=True)
    assert seen == list(range(COUNT))
    stats = link.statistics()
    assert stats.to_target.forwarded == stats.to_client.forwarded == COUNT
    assert stats.to_target.dropped == stats.to_client.dropped == 0
    assert stats.clients_learned == 1 and stats.client is not None


async def test_half_loss_with_a_seed_drops_about_half_reproducibly(autojump_clock) -> None:
    seen, link = await run_through_link({"loss": 50, "seed": 42}, echo_back=False)
    stats = link.statistics()
    assert 0.35 * COUNT < len(seen) < 0.65 * COUNT
    assert len(seen) == COUNT - stats.to_target.dropped == stats.to_target.forwarded
    again, _ = await run_through_link({"loss": 50, "seed": 42}, echo_back=False)
    assert again == seen


async def test_duplicates_appear(autojump_clock) -> None:
    seen, link = await run_through_link({"duplicate": 30, "seed": 1}, echo_back=False)
    stats = link.statistics()
    assert stats.to_target.duplicated > 0
    assert len(seen) == COUNT + stats.to_target.duplicated
    assert set(seen) == set(range(COUNT))


async def test_reordering_happens_and_loses_nothing(autojump_clock) -> None:
    seen, link = await run_through_link({"reorder": 20, "seed": 3}, echo_back=False)
    assert sorted(seen) == list(range(COUNT))
    assert seen != sorted(seen)
    assert link.statistics().to_target.reordered > 0


async def test_per_direction_impairment(autojump_clock) -> None:
    seen, link = await run_through_link({"seed": 5, "to_target": Impairment(), "to_client": Impairment(loss=100)}, echo_back=True)
    stats = link.statistics()
    assert seen == []
    assert stats.to_target.forwarded == COUNT and stats.to_client.dropped == COUNT


async def test_fixed_delay_applies_each_way(autojump_clock) -> None:
    # Virtual time: the link's 40 ms each way is exactly what trio's clock shows, however loaded the machine.
    target = await bound_udp_socket()
    client = await bound_udp_socket()
    with target, client:
        link = LossyLink(LOCALHOST, 0, (LOCALHOST, target.getsockname()[1]), delay_ms=40)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(link.serve)
            nursery.start_soon(echo, target)
            started = trio.current_time()
            await client.sendto(b"ping", (LOCALHOST, port))
            data, _ = await client.recvfrom(64)
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
    assert data == b"ping"
    assert 0.080 <= elapsed < 1.0


async def test_client_address_is_relearned_when_it_changes() -> None:
    target = await bound_udp_socket()
    first = await bound_udp_socket()
    second = await bound_udp_socket()
    with target, first, second:
        link = LossyLink(LOCALHOST, 0, (LOCALHOST, target.getsockname()[1]))
        second_address = second.getsockname()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(link.serve)
            nursery.start_soon(echo, target)
            await first.sendto(b"one", (LOCALHOST, port))
            assert (await first.recvfrom(64))[0] == b"one"
            await second.sendto(b"two", (LOCALHOST, port))
            assert (await second.recvfrom(64))[0] == b"two"
            with trio.move_on_after(0.1):
                await first.recvfrom(64)
                pytest.fail("the old client still receives")
            stats = link.statistics()
            nursery.cancel_scope.cancel()
    assert stats.clients_learned == 2
    assert stats.client == second_address


async def test_upstream_socket_ignores_strangers_and_waits_for_a_client() -> None:
    target = await bound_udp_socket()
    stranger = await bound_udp_socket()
    with target, stranger:
        link = LossyLink(LOCALHOST, 0, (LOCALHOST, target.getsockname()[1]))
        async with trio.open_nursery() as nursery:
            await nursery.start(link.serve)
            upstream = (LOCALHOST, link.upstream_port or 0)
            await target.sendto(b"too early", upstream)
            await stranger.sendto(b"not the target", upstream)
            await trio.sleep(0.05)
            stats = link.statistics()
            nursery.cancel_scope.cancel()
    assert stats.no_client == 1 and stats.stray == 1
    assert stats.to_client.received == 0 and stats.client is None
