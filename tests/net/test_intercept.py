"""Transparent interception: rules, routing by original destination, pass and refuse.

The kernel's redirect itself (SO_ORIGINAL_DST after an nftables rule) is exercised
in tests/netns/test_gateway.py; here the routing and the pass-through run on
127.0.0.1, where a connection has no NAT entry and counts as direct.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from bridge.errors import ConfigError
from bridge.net.intercept import InterceptServer, original_destination, parse_rules
from bridge.settings import InterceptSettings, load

LOCALHOST = "127.0.0.1"


async def test_rules_resolve_and_route_by_original_destination() -> None:
    rules = parse_rules(
        [
            InterceptSettings(match="localhost:3333", upstream="stratumrm://sidecar.example:3334"),
            InterceptSettings(match="192.0.2.10:4444", upstream="stratum+tcp://10.0.0.1:3333"),
        ]
    )
    for rule in rules:
        await rule.resolve()
    a, b = object(), object()
    server = InterceptServer(rules, {str(rules[0].upstream): a, str(rules[1].upstream): b}, None, default="refuse")
    local = ("10.1.0.1", 3335)
    assert server.route(("127.0.0.1", 3333), local) is a
    assert server.route(("192.0.2.10", 4444), local) is b
    assert server.route(("192.0.2.10", 4445), local) == "refuse"
    assert server.route(None, local) == "refuse"  # direct, and no regular upstream
    direct = object()
    passing = InterceptServer(rules, {str(r.upstream): a for r in rules}, direct, default="pass")
    assert passing.route(("198.51.100.1", 80), local) == "pass"
    assert passing.route(local, local) is direct and passing.route(None, local) is direct


def test_bad_rules_say_what_to_write(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_rules([InterceptSettings(match="pool.example.com", upstream="stratum+tcp://h:1")])
    with pytest.raises(ConfigError, match=r"pass.*refuse"):
        InterceptServer([], {}, None, default="drop")
    config = tmp_path / "proxy.toml"
    config.write_text(
        'intercept_default = "refuse"\n[[intercept]]\nmatch = "pool.example.com:3333"\n'
        'upstream = "stratumrm://sidecar.example.com:3334"\n'
    )
    loaded = load(config, "proxy")
    assert loaded.intercept_default == "refuse" and loaded.intercept[0].match == "pool.example.com:3333"


async def test_a_connection_without_nat_has_no_original_destination_but_its_own() -> None:
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await listener.bind((LOCALHOST, 0))
    listener.listen(1)
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await client.connect(listener.getsockname())
    accepted, _ = await listener.accept()
    found = original_destination(accepted)
    assert found is None or found == accepted.getsockname()
    for sock in (accepted, client, listener):
        sock.close()


async def test_unmatched_destinations_pass_through_untouched() -> None:
    """pass: the bytes reach the original destination and come back unchanged."""

    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(1024):
            await stream.send_all(data[::-1])

    async with trio.open_nursery() as nursery:
        echo_listeners = await nursery.start(trio.serve_tcp, echo, 0)
        echo_port = echo_listeners[0].socket.getsockname()[1]
        server = InterceptServer([], {}, None, default="pass")
        left, right = trio.socket.socketpair()
        stream_in = trio.SocketStream(right)
        nursery.start_soon(server._pass_through, stream_in, (LOCALHOST, echo_port), "test-rig")
        outer = trio.SocketStream(left)
        await outer.send_all(b"mining.subscribe\n")
        got = b""
        with trio.fail_after(10):
            while len(got) < 17:
                got += await outer.receive_some(1024)
        assert got == b"\nebircsbus.gninim"
        assert server.counts["passed"] == 0  # counted by the dispatcher, not the pipe
        nursery.cancel_scope.cancel()


def test_an_interception_proxy_refuses_a_management_port_it_would_not_serve(tmp_path: Path) -> None:
    """Not silently ignored: one line naming the option, exit status 2."""
    import subprocess
    import sys

    config = tmp_path / "proxy.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\nhttp_listen = "127.0.0.1:0"\n[[intercept]]\nmatch = "127.0.0.1:3333"\n'
        'upstream = "stratum+tcp://127.0.0.1:1"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "proxy", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "--http-listen" in done.stderr and "Traceback" not in done.stderr
