"""The TUN link: its core with an explicit ``now``, then a real TCP connection between two namespaces through it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from bridge.bench.roles import RoleProcess
from bridge.testing.lossy_link import Impairment
from bridge.testing.tun_link import ADDRESS_B, TunLab, TunLinkCore, flow_key, unavailable

ROOT = Path(__file__).resolve().parents[2]


def _ipv4(protocol: int, source_port: int, destination_port: int, size: int = 60) -> bytes:
    header = bytes([0x45, 0, 0, size, 0, 0, 0, 0, 64, protocol, 0, 0, 10, 77, 1, 1, 10, 77, 2, 1])
    ports = source_port.to_bytes(2, "big") + destination_port.to_bytes(2, "big")
    return header + ports + bytes(size - 24)


# ------------------------------------------------------------------ the core, sans-IO


def test_delay_holds_each_packet_until_it_is_due() -> None:
    core = TunLinkCore(Impairment(delay_ms=10))
    core.a_to_b.admit(b"one", 0.0)
    core.a_to_b.admit(b"two", 0.002)
    assert core.next_due() == pytest.approx(0.010)
    assert core.a_to_b.take_due(0.0099) == []
    assert core.a_to_b.take_due(0.010) == [b"one"]
    assert core.a_to_b.take_due(0.0119) == []
    assert core.a_to_b.take_due(0.012) == [b"two"]
    assert core.next_due() is None


def test_loss_is_seeded_and_counted_per_direction() -> None:
    def run(seed: int) -> tuple[int, int]:
        core = TunLinkCore(Impairment(loss=20), seed=seed)
        for i in range(1000):
            core.a_to_b.admit(_ipv4(17, 40000, 3334), i * 0.001)
        delivered = len(core.a_to_b.take_due(10.0))
        stats = core.statistics().a_to_b
        assert stats.packets == 1000 and stats.dropped + stats.delivered == 1000
        assert stats.flows["udp:3334"].packets == 1000 and stats.flows["udp:3334"].bytes == 60_000
        assert core.statistics().b_to_a.packets == 0
        return delivered, stats.dropped

    delivered, dropped = run(5)
    assert 700 < delivered < 900
    assert run(5) == (delivered, dropped)


def test_duplication_and_jitter() -> None:
    core = TunLinkCore(Impairment(duplicate=100, delay_ms=10, jitter_ms=5), seed=1)
    for i in range(50):
        core.b_to_a.admit(bytes([i]), 0.0)
    assert core.b_to_a.take_due(0.0049) == []  # 10 ms ± 5
    out = core.b_to_a.take_due(0.015)
    assert len(out) == 100 and sorted(out) == sorted([bytes([i]) for i in range(50)] * 2)
    assert out != sorted(out)  # jitter reorders, as netem's does
    assert core.statistics().b_to_a.duplicated == 50


def test_reorder_hold_releases_after_the_next_packet_or_the_hold() -> None:
    core = TunLinkCore(Impairment(reorder=100), reorder_hold_ms=50)
    core.a_to_b.admit(b"a", 0.0)
    assert core.a_to_b.take_due(0.0) == []
    core.a_to_b.admit(b"b", 0.001)
    assert core.a_to_b.take_due(0.001) == [b"b", b"a"]
    core.a_to_b.admit(b"c", 0.002)
    assert core.a_to_b.take_due(0.051) == []
    assert core.a_to_b.take_due(0.053) == [b"c"]


def test_flow_keys_name_the_b_side_port() -> None:
    assert flow_key(_ipv4(6, 51000, 3333), b_port_is_destination=True) == "tcp:3333"
    assert flow_key(_ipv4(6, 3333, 51000), b_port_is_destination=False) == "tcp:3333"
    assert flow_key(b"\x60" + bytes(40), b_port_is_destination=True) == "other"


# ------------------------------------------------------------------ a real TCP connection through it

_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{host}", {port})); s.listen(); print("listening", flush=True)
c, _ = s.accept(); data = b""
while len(data) < {size}:
    chunk = c.recv(65536)
    if not chunk: break
    data += chunk
c.sendall(data[::-1]); c.close()
"""
_CLIENT = """
import socket
c = socket.create_connection(("{host}", {port}), timeout=30)
payload = bytes(range(256)) * ({size} // 256)
c.sendall(payload); data = b""
while len(data) < {size}:
    chunk = c.recv(65536)
    if not chunk: break
    data += chunk
print("ok" if data == payload[::-1] else "corrupt", len(data))
"""


def test_tcp_connection_through_a_lossy_delayed_link(tmp_path: Path) -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    port, size = 4555, 256 * 400

    async def main() -> None:
        with TunLab() as lab:
            link = await RoleProcess.start(
                "tun-link",
                "tun-link",
                [
                    *("--namespace-a", lab.a, "--device-a", lab.device_a, "--namespace-b", lab.b, "--device-b", lab.device_b),
                    *("--loss", "10", "--delay-ms", "5", "--seed", "3"),
                ],
                tmp_path,
            )
            try:
                env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
                server = subprocess.Popen(
                    [*lab.exec_prefix("b"), sys.executable, "-c", _SERVER.format(host=ADDRESS_B, port=port, size=size)],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                try:
                    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
                    client = await trio.run_process(
                        [*lab.exec_prefix("a"), sys.executable, "-c", _CLIENT.format(host=ADDRESS_B, port=port, size=size)],
                        capture_stdout=True,
                        env=env,
                    )
                    assert client.stdout.decode().split() == ["ok", str(size)]
                finally:
                    server.kill()
                    server.wait()
                # The link may still hold the connection's last packets for their delay.
                for _ in range(100):
                    stats = await link.request("stats")
                    if all(d["delivered"] == d["packets"] - d["dropped"] for d in (stats["a_to_b"], stats["b_to_a"])):
                        break
                    await trio.sleep(0.02)
            finally:
                await link.stop()
        up, down = stats["a_to_b"], stats["b_to_a"]
        # Every byte crossed the link: more IP bytes than payload each way, TCP's ACKs and
        # retransmissions of what the link dropped included; nothing else crossed it.
        for direction in (up, down):
            flow = direction["flows"][f"tcp:{port}"]
            assert flow["bytes"] > size and flow["packets"] > size // 1500
            assert direction["dropped"] > 0
            assert direction["delivered"] == direction["packets"] - direction["dropped"]
            assert set(direction["flows"]) == {f"tcp:{port}"}
        # Namespaces gone with the lab.
        listed = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
        assert lab.a not in listed and lab.b not in listed

    trio.run(main)
