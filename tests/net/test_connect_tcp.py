"""connect_tcp: one address straight, several through trio's happy eyeballs, names cached."""

from __future__ import annotations

import socket

import pytest
import trio

from bridge.net import tcp
from bridge.net.tcp import connect_tcp, describe_error


async def _listener() -> tuple[trio.SocketListener, int]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    return listener, listener.socket.getsockname()[1]


async def test_one_address_is_connected_to_and_the_stream_tuned_as_trios() -> None:
    listener, port = await _listener()
    async with listener:
        stream = await connect_tcp("127.0.0.1", port)
        accepted = await listener.accept()
        async with stream, accepted:
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await stream.send_all(b"ping")
            assert await accepted.receive_some(4) == b"ping"


async def test_a_refused_connection_says_so_in_words() -> None:
    listener, port = await _listener()
    await listener.aclose()  # nothing listens on that port now
    with pytest.raises(OSError) as raised:
        await connect_tcp("127.0.0.1", port)
    assert describe_error(raised.value).startswith("connection refused")
    assert f"127.0.0.1:{port}" in str(raised.value)


async def test_a_name_is_resolved_once_within_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    listener, port = await _listener()
    calls: list[str] = []
    real = trio.socket.getaddrinfo

    async def counting(host: str, *args: object, **kwargs: object) -> object:
        calls.append(host)
        return await real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.socket, "getaddrinfo", counting)
    monkeypatch.setattr(tcp, "_resolved", {})
    async with listener:
        for _ in range(3):
            stream = await connect_tcp("127.0.0.1", port)
            await stream.aclose()
            await (await listener.accept()).aclose()
        assert calls == ["127.0.0.1"]
        monkeypatch.setattr(tcp, "RESOLVE_TTL", 0.0)
        await (await connect_tcp("127.0.0.1", port)).aclose()
        assert calls == ["127.0.0.1", "127.0.0.1"]


async def test_several_addresses_go_through_happy_eyeballs(monkeypatch: pytest.MonkeyPatch) -> None:
    listener, port = await _listener()
    used: list[tuple[str, int]] = []
    real = trio.open_tcp_stream

    async def recording(host: str, port: int, **kwargs: object) -> trio.SocketStream:
        used.append((host, port))
        return await real(host, port, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio, "open_tcp_stream", recording)

    async def two_addresses(host: str, port_: int) -> list[tuple[int, int, int, tuple[str, int]]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, ("127.0.0.1", port_))] * 2

    monkeypatch.setattr(tcp, "_addresses", two_addresses)
    async with listener:
        with pytest.raises(OSError):
            await connect_tcp("twice.example", port)  # trio resolves the name itself: it does not exist
        assert used == [("twice.example", port)]
