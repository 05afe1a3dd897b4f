"""The sidecar on real sockets: a hand-written proxy -> sidecar -> reference pool.

The proxy here is test code built from bridge/wire/control.py and bridge/wire/keys.py:
it speaks TLS 1.3 with a certificate from make_test_pki, reads rm.keys, seals share
datagrams with Role.PROXY keys, and hashes shares for real (bridge/mining/share.py)
so that the reference pool validates them for real.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel
from click.testing import CliRunner

from bridge.config import parse_upstream_url
from bridge.mining.share import Job, difficulty_to_target, scan_nonces
from bridge.net.sidecar import SidecarServer, disconnect_level
from bridge.net.sidecar_command import parse_advertise, sidecar
from bridge.pki.revocation import RevocationList
from bridge.sv1.framing import LineBuffer
from bridge.testing.pki import TestPKI, make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool
from bridge.wire.control import FEATURES, MAX_CONTROL_LINE
from bridge.wire.datagram import DatagramType, Probe, ProbeAck, Share, decode_body
from bridge.wire.keys import KeyMaterial, KeySet, Role

DIFFICULTY = 0.000002  # ~8,600 hashes per share: a few milliseconds of scan_nonces
LOCALHOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


async def start(nursery: trio.Nursery, pki: TestPKI, **options: Any) -> tuple[ReferencePool, SidecarServer]:
    pool = ReferencePool(PoolConfig(difficulty=DIFFICULTY, extranonce2_size=4, notify_interval=30.0))
    pool_port = await nursery.start(pool.serve, LOCALHOST, 0)
    url = options.pop("pool_url", f"stratum+tcp://{LOCALHOST}:{pool_port}")
    server = SidecarServer(parse_upstream_url(url), pki.server_context(), **options)
    await nursery.start(server.serve, LOCALHOST, 0)
    return pool, server


class Channel(msgspec.Struct):
    ch: int
    extranonce1: str = ""
    extranonce2_size: int = 0
    version_mask: int = 0
    notify: list[Any] = []
    handle: int = 0


class TestProxy:
    """A minimal StratumRM proxy: control lines over TLS, shares over UDP."""

    __test__ = False

    def __init__(self, stream: trio.SSLStream, server: SidecarServer) -> None:
        self.stream = stream
        self.server = server
        self.inbox: list[dict[str, Any]] = []
        self.arrived = trio.Event()
        self.closed = False
        self.keys: KeySet | None = None
        self.epoch = -1
        self.jobs: dict[int, list[Any]] = {}
        self.udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.datagrams_received: list[bytes] = []
        self.openers: dict[int, Any] = {}

    @classmethod
    async def connect(cls, nursery: trio.Nursery, server: SidecarServer, context: ssl.SSLContext) -> TestProxy:
        assert server.port is not None
        tcp = await trio.open_tcp_stream(LOCALHOST, server.port)
        stream = trio.SSLStream(tcp, context, server_hostname=LOCALHOST)
        await stream.do_handshake()
        proxy = cls(stream, server)
        await proxy.udp.bind((LOCALHOST, 0))
        nursery.start_soon(proxy._read)
        nursery.start_soon(proxy._read_udp)
        return proxy

    async def _read(self) -> None:
        lines = LineBuffer(MAX_CONTROL_LINE)
        try:
            while data := await self.stream.receive_some(65536):
                for raw in lines.feed(data):
                    message = json.loads(raw)
                    if message.get("method") == "rm.ping":
                        await self.send({"method": "rm.pong", "params": message["params"]})
                    if message.get("method") == "rm.keys":
                        params = message["params"]
                        material = KeyMaterial(int(params["conn_id"], 16), params["epoch"], bytes.fromhex(params["secret"]))
                        self.keys, self.epoch = KeySet.derive(material, Role.PROXY), params["epoch"]
                        self.openers[material.conn_id] = self.keys.opener
                    if message.get("method") == "rm.job":
                        self.jobs[message["params"]["job"]] = message["params"]["notify"]
                    self.inbox.append(message)
                    self.arrived.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.closed = True
        self.arrived.set()

    async def _read_udp(self) -> None:
        try:
            while True:
                data, _address = await self.udp.recvfrom(2048)
                self.datagrams_received.append(data)
                opener = self.openers.get(int.from_bytes(data[2:10], "big"))
                plaintext = None if opener is None else opener.open(data)
                if plaintext is not None and data[0] & 0x0F == DatagramType.VERDICT:
                    # Shown to the tests as the rm.results line it replaces (data channel v2).
                    entries = decode_body(DatagramType.VERDICT, plaintext).entries
                    v = [[opener.epoch, e.pn, e.index, 1 if e.detail is None else json.loads(e.detail)] for e in entries]
                    self.inbox.append({"method": "rm.results", "params": {"v": v}, "via": "udp"})
                    self.arrived.set()
        except (trio.ClosedResourceError, OSError):
            pass  # closed by aclose()

    async def send(self, *objects: Any) -> None:
        await self.stream.send_all(b"".join(json.dumps(o).encode() + b"\n" for o in objects))

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """The first received line matching ``predicate`` (taken from the inbox)."""
        with trio.fail_after(timeout):
            while True:
                for index, message in enumerate(self.inbox):
                    if predicate(message):
                        return self.inbox.pop(index)
                if self.closed:
                    raise ConnectionError(f"control connection closed; unmatched lines: {self.inbox}")
                self.arrived = trio.Event()
                await self.arrived.wait()

    async def hello(self, features: list[str] | None = None) -> dict[str, Any]:
        await self.send(
            {
                "id": 1,
                "method": "rm.hello",
                "params": {"version": 1, "features": features or list(FEATURES), "agent": "test-proxy"},
            }
        )
        answer = await self.wait_for(lambda m: m.get("id") == 1 and "result" in m)
        if answer["result"]["udp_port"] is not None:
            await self.wait_for(lambda m: m.get("method") == "rm.keys")
        return answer["result"]

    async def open(self, ch: int, worker: str = "alice.rig1", agent: str = "cgminer/4.11.1") -> Channel:
        await self.send(
            {"method": "rm.open", "params": {"ch": ch, "peer": "203.0.113.5:4028"}},
            {
                "ch": ch,
                "id": 1,
                "method": "mining.configure",
                "params": [["version-rolling"], {"version-rolling.mask": "ffffffff"}],
            },
            {"ch": ch, "id": 2, "method": "mining.subscribe", "params": [agent]},
            {"ch": ch, "id": 3, "method": "mining.authorize", "params": [worker, "x"]},
        )
        configured = await self.wait_for(lambda m: m.get("ch") == ch and m.get("id") == 1)
        subscribed = await self.wait_for(lambda m: m.get("ch") == ch and m.get("id") == 2)
        authorized = await self.wait_for(lambda m: m.get("ch") == ch and m.get("id") == 3)
        assert authorized["result"] is True, authorized
        delivered = await self.wait_for(lambda m: m.get("method") == "rm.notify" and ch in m["params"]["ch"])
        handle = delivered["params"]["job"]
        return Channel(
            ch=ch,
            extranonce1=subscribed["result"][1],
            extranonce2_size=subscribed["result"][2],
            version_mask=int(configured["result"]["version-rolling.mask"], 16),
            notify=self.jobs[handle],
            handle=handle,
        )

    def seal(self, body: Any) -> bytes:
        assert self.keys is not None
        return self.keys.sealer.seal(body).data

    async def send_datagram(self, data: bytes) -> None:
        assert self.server.udp_port is not None
        await self.udp.sendto(data, (LOCALHOST, self.server.udp_port))

    async def aclose(self) -> None:
        self.udp.close()
        await trio.aclose_forcefully(self.stream)


def find_share(channel: Channel, extranonce2: int = 1) -> Share:
    """Hash for real until a share meets DIFFICULTY on the channel's job."""
    job = Job.from_notify_fields(*channel.notify[:8])
    en2 = extranonce2.to_bytes(channel.extranonce2_size, "big")
    bits = 0x00C00000 & channel.version_mask
    header76 = job.header76(
        bytes.fromhex(channel.extranonce1), en2, job.ntime_int, job.rolled_version(bits, channel.version_mask)
    )
    target = difficulty_to_target(DIFFICULTY)
    start = 0
    while True:
        found = scan_nonces(header76, start, 1 << 12, target)
        if found:
            return Share(
                channel_id=channel.ch,
                job_handle=channel.handle,
                extranonce2=en2,
                ntime=job.ntime_int,
                nonce=found[0][0],
                version_bits=bits,
            )
        start += 1 << 12


def submit_params(share: Share, channel: Channel, worker: str = "alice.rig1") -> list[str]:
    return [
        worker,
        channel.notify[0],
        share.extranonce2.hex(),
        f"{share.ntime:08x}",
        f"{share.nonce:08x}",
        f"{share.version_bits:08x}",
    ]


def results_for(proxy: TestProxy, pn: int) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("method") == "rm.results" and any(entry[1] == pn for entry in m["params"]["v"])


# ------------------------------------------------------------------ session and channels


async def test_hello_keys_and_the_channel_handshake_reach_the_pool(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        pool, server = await start(nursery, pki)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        result = await proxy.hello()
        assert result["version"] == 1 and result["udp_port"] == server.udp_port == server.port
        assert set(result["features"]) == set(FEATURES) and proxy.keys is not None
        channel = await proxy.open(5, worker="alice.rig7", agent="bmminer/2.0.0")
        assert channel.extranonce2_size == 4 and channel.version_mask == 0x1FFFE000
        [connection] = pool.connections
        assert connection.session.user_agent == "bmminer/2.0.0" and connection.workers == ("alice.rig7",)
        # Accounts the certificate does not name are refused before the pool.
        await proxy.send({"ch": 5, "id": 9, "method": "mining.authorize", "params": ["mallory.rig", "x"]})
        refused = await proxy.wait_for(lambda m: m.get("ch") == 5 and m.get("id") == 9)
        assert refused["error"][0] == 24 and connection.workers == ("alice.rig7",)
        stats = server.statistics()
        assert stats.sessions_active == 1 and stats.channels_open == 1
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_a_real_share_over_udp_is_accepted_and_its_copies_answered_from_cache(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        pool, server = await start(nursery, pki)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        await proxy.hello()
        channel = await proxy.open(3)
        share = find_share(channel)

        started = trio.current_time()
        await proxy.send_datagram(proxy.seal(share))  # pn 0
        verdicts = await proxy.wait_for(results_for(proxy, 0))
        latency = trio.current_time() - started
        assert verdicts["params"]["v"] == [[proxy.epoch, 0, 0, 1]]
        assert pool.statistics().accepted == 1, f"accepted in {latency * 1e3:.1f} ms"  # no wall-clock bound: tests run loaded
        record = pool.accepted[0]
        assert (record.worker, record.nonce, record.version_bits) == ("alice.rig1", f"{share.nonce:08x}", "00c00000")

        await proxy.send_datagram(proxy.seal(share))  # a retransmission with a new pn
        again = await proxy.wait_for(results_for(proxy, 1))
        assert again["params"]["v"] == [[proxy.epoch, 1, 0, 1]]
        await proxy.send({"ch": 3, "id": 44, "method": "mining.submit", "params": submit_params(share, channel)})
        over_tls = await proxy.wait_for(lambda m: m.get("ch") == 3 and m.get("id") == 44)
        assert over_tls["result"] is True and over_tls["error"] is None

        pool_stats = pool.statistics()
        assert pool_stats.accepted == 1 and pool_stats.duplicates == 0 and not pool_stats.rejected
        stats = server.statistics()
        assert stats.shares_forwarded == 1 and stats.duplicates_from_cache == 2
        assert stats.shares_udp == 2 and stats.shares_tls == 1 and stats.verdicts_udp == 2
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_rekeying_over_the_network(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        _pool, server = await start(nursery, pki, rekey_interval=0.3)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        await proxy.hello()
        channel = await proxy.open(3)
        first_keys = proxy.keys
        await proxy.wait_for(lambda m: m.get("method") == "rm.keys" and m["params"]["epoch"] == 1)
        assert proxy.keys is not first_keys and proxy.epoch == 1
        await proxy.send_datagram(proxy.seal(find_share(channel)))
        verdicts = await proxy.wait_for(lambda m: m.get("method") == "rm.results")
        assert verdicts["params"]["v"][0][0] == 1 and verdicts["params"]["v"][0][3] == 1
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_pool_connection_loss_and_an_unreachable_pool_close_the_channel(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        pool, server = await start(nursery, pki)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        await proxy.hello()
        await proxy.open(3)
        pool.drop_connections(rst=True)
        close = await proxy.wait_for(lambda m: m.get("method") == "rm.close")
        assert close["params"]["ch"] == 3 and "pool" in close["params"]["reason"]
        await proxy.aclose()

        with socket.socket() as unused:
            unused.bind((LOCALHOST, 0))
            dead_port = unused.getsockname()[1]
        _pool2, lonely = await start(nursery, pki, pool_url=f"stratum+tcp://{LOCALHOST}:{dead_port}")
        proxy = await TestProxy.connect(nursery, lonely, pki.client_context())
        await proxy.hello()
        await proxy.send(
            {"method": "rm.open", "params": {"ch": 8}},
            {"ch": 8, "id": 1, "method": "mining.subscribe", "params": ["cgminer/4.11.1"]},
        )
        close = await proxy.wait_for(lambda m: m.get("method") == "rm.close")
        assert close["params"]["ch"] == 8 and "cannot connect to pool" in close["params"]["reason"]
        assert lonely.statistics().pool_connect_failures == 1
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_each_channel_costs_the_sidecar_one_task_and_its_bytes_still_flow_both_ways(pki: TestPKI) -> None:
    """A pool connection is one task (no reader/writer pair, no nursery): the per-rig memory of issue 9.6."""
    async with trio.open_nursery() as nursery:
        pool, server = await start(nursery, pki)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        await proxy.hello()
        [connection] = server._connections.values()
        assert connection._nursery is not None
        before = len(connection._nursery.child_tasks)
        channels = [await proxy.open(ch, worker=f"alice.rig{ch}") for ch in range(1, 6)]
        pool_tasks = connection._nursery.child_tasks
        assert len(pool_tasks) == before + 5
        assert all(not task.child_nurseries for task in pool_tasks)
        # Written to the pool while its task waits to read, read from it while nothing is queued.
        for channel in channels:
            share = find_share(channel)
            await proxy.send(
                {
                    "ch": channel.ch,
                    "id": 40,
                    "method": "mining.submit",
                    "params": submit_params(share, channel, f"alice.rig{channel.ch}"),
                }
            )
            answer = await proxy.wait_for(lambda m, ch=channel.ch: m.get("ch") == ch and m.get("id") == 40)
            assert answer["result"] is True
        assert pool.statistics().accepted == 5
        await proxy.aclose()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ hostile input


async def test_hostile_datagrams_are_dropped_counted_by_reason_and_never_answered(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        pool, server = await start(nursery, pki)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        await proxy.hello()
        channel = await proxy.open(3)
        assert proxy.keys is not None and server.udp_port is not None
        share = find_share(channel)
        attacker = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await attacker.bind((LOCALHOST, 0))
        heard: list[bytes] = []

        async def listen() -> None:
            with pytest.raises(trio.ClosedResourceError):
                while True:
                    heard.append((await attacker.recvfrom(2048))[0])

        nursery.start_soon(listen)
        # What the proxy really sends: a PROBE_ACK (accepted, never answered) and,
        # 1100 packet numbers later, a share; the attacker kept a copy of both.
        held_back = proxy.seal(ProbeAck(probe_id=1))
        for number in range(1100):
            proxy.keys.sealer.seal(Probe(probe_id=number))  # pns the sidecar never sees
        good = proxy.seal(share)
        await proxy.send_datagram(good)
        stranger = KeySet.derive(KeyMaterial(0xBAD5EED, 0, bytes(32)), Role.PROXY).sealer.seal(share).data
        flipped = bytearray(proxy.seal(share))
        flipped[-3] ^= 0x40
        cases = {
            "truncated": good[:24],
            "oversized": bytes(1201),
            "bad version": bytes([0x31]) + good[1:],
            "unknown type": bytes([0x2C]) + good[1:],
            "unexpected type": bytes([0x25]) + good[1:],  # ACK is for proxies
            "bad flags": good[:1] + bytes([good[1] | 0x80]) + good[2:],
            "unknown conn_id": stranger,
            "wrong key phase": good[:1] + bytes([good[1] ^ 0x01]) + good[2:],
            "bad tag": bytes(flipped),
            "replayed": good,
            "too old": held_back,  # reordered beyond the 1024-packet window
        }
        for data in cases.values():
            await attacker.sendto(data, (LOCALHOST, server.udp_port))
        with trio.fail_after(3):
            while sum(server.statistics().datagram_drops.values()) < len(cases):
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        drops = server.statistics().datagram_drops
        assert {reason: drops[reason] for reason in cases} == dict.fromkeys(cases, 1)
        assert sum(drops.values()) == len(cases)
        # The share reached the pool once, and nothing went back over UDP but its
        # acknowledgement and verdict, to the proxy.
        assert pool.statistics().accepted == 1
        assert heard == []
        kinds = [data[0] & 0x0F for data in proxy.datagrams_received]
        assert DatagramType.VERDICT in kinds and set(kinds) <= {DatagramType.ACK, DatagramType.VERDICT}
        attacker.close()
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_the_sidecar_never_sends_udp_to_an_unauthenticated_address(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        _pool, server = await start(nursery, pki)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        await proxy.hello()
        await proxy.open(3)
        stranger = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await stranger.bind((LOCALHOST, 0))
        probe = proxy.seal(Probe(probe_id=7, padding=64))
        await proxy.send_datagram(probe)  # authenticated: learned, answered
        with trio.fail_after(2):
            while not proxy.datagrams_received:
                await trio.sleep(0.01)
        # The same probe replayed from elsewhere, a forged one, and garbage: no answer.
        await stranger.sendto(probe, (LOCALHOST, server.udp_port))
        forged = bytearray(probe)
        forged[20] ^= 1
        await stranger.sendto(bytes(forged), (LOCALHOST, server.udp_port))
        await stranger.sendto(os.urandom(100), (LOCALHOST, server.udp_port))
        with trio.move_on_after(0.3):
            data, _ = await stranger.recvfrom(2048)
            pytest.fail(f"the sidecar answered an unauthenticated address with {data!r}")
        assert len(proxy.datagrams_received) == 1
        assert proxy.keys is not None
        plaintext = proxy.keys.opener.open(proxy.datagrams_received[0])
        assert plaintext is not None and decode_body(DatagramType.PROBE_ACK, plaintext).probe_id == 7
        stranger.close()
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_a_garbage_flood_does_not_hold_up_honest_shares(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        pool, server = await start(nursery, pki)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        await proxy.hello()
        channel = await proxy.open(3)
        shares = [find_share(channel, extranonce2=n) for n in range(1, 9)]
        flooder = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rng = random.Random(1)
        flooded = 0
        stop = trio.Event()

        async def flood() -> None:
            nonlocal flooded
            while not stop.is_set():
                size = rng.choice((rng.randrange(1, 40), rng.randrange(32, 1300)))
                data = bytearray(rng.randbytes(size))
                if size > 16 and rng.random() < 0.5:
                    data[0], data[1] = 0x21, 0  # a plausible header (version 2, SHARE), random conn_id
                await flooder.sendto(bytes(data), (LOCALHOST, server.udp_port))
                flooded += 1
                if flooded % 20 == 0:
                    await trio.lowlevel.checkpoint()

        async def verdict_latency(pn: int, share: Share) -> float:
            started = trio.current_time()
            await proxy.send_datagram(proxy.seal(share))
            verdict = await proxy.wait_for(results_for(proxy, pn))
            assert verdict["params"]["v"][0][3] == 1
            return trio.current_time() - started

        quiet = [await verdict_latency(pn, share) for pn, share in enumerate(shares[:3])]
        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            with trio.fail_after(5):
                while flooded < 1000:
                    await trio.sleep(0.001)
            flooded_latencies = []
            for pn, share in enumerate(shares[3:], start=3):
                flooded_latencies.append(await verdict_latency(pn, share))
                await trio.sleep(0.02)
            with trio.fail_after(10):
                while flooded < 5000:
                    await trio.sleep(0.01)
            stop.set()
        await trio.sleep(0.1)
        stats = server.statistics()
        assert pool.statistics().accepted == len(shares)
        assert stats.datagrams_received >= 5000 and stats.datagrams_accepted == len(shares)
        assert sum(stats.datagram_drops.values()) == stats.datagrams_received - len(shares)
        print(
            f"\nverdict latency quiet {max(quiet) * 1e3:.1f} ms, under a flood of {flooded} datagrams "
            f"{max(flooded_latencies) * 1e3:.1f} ms (max)"
        )
        # The latency itself is the benchmark's to measure (a wall-clock bound flakes on a loaded
        # machine); here every honest share got its verdict during the flood, in order.
        assert len(flooded_latencies) == len(shares) - 3
        flooder.close()
        await proxy.aclose()
        nursery.cancel_scope.cancel()


async def test_tls_clients_without_a_certificate_of_our_ca_never_get_past_the_handshake(pki: TestPKI, tmp_path: Path) -> None:
    other = make_test_pki(tmp_path / "other")
    no_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_certificate.load_verify_locations(pki.ca_certificate)
    foreign_certificate = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign_certificate.load_verify_locations(pki.ca_certificate)  # trusts our sidecar ...
    foreign_certificate.load_cert_chain(other.miner_bundle)  # ... but is another CA's miner
    async with trio.open_nursery() as nursery:
        _pool, server = await start(nursery, pki)
        for context in (no_certificate, foreign_certificate):
            tcp = await trio.open_tcp_stream(LOCALHOST, server.port)
            stream = trio.SSLStream(tcp, context, server_hostname=LOCALHOST)
            with trio.fail_after(5):
                with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                    # TLS 1.3: the client's side may finish before the server refuses it,
                    # so the refusal shows on the first exchange.
                    await stream.do_handshake()
                    await stream.send_all(b'{"id":1,"method":"rm.hello","params":{"version":1}}\n')
                    if not await stream.receive_some(100):
                        raise trio.BrokenResourceError("closed")
            await trio.aclose_forcefully(stream)
        with trio.fail_after(2):
            while server.statistics().handshake_failures < 2:
                await trio.sleep(0.01)
        stats = server.statistics()
        assert stats.sessions_total == 0 and stats.handshake_failures == 2
        nursery.cancel_scope.cancel()


async def test_a_revoked_certificate_is_refused_and_its_live_session_closed(tmp_path: Path) -> None:
    own = make_test_pki(tmp_path / "revoking")
    async with trio.open_nursery() as nursery:
        # The list is looked at every 0.1 s (the default, 2 s, is for production).
        _pool, server = await start(
            nursery, own, revocations=RevocationList(own.revocations, own.ca_certificate), reload_interval=0.1
        )
        proxy = await TestProxy.connect(nursery, server, own.client_context())
        await proxy.hello()
        await proxy.open(3)
        own.authority.revoke(own.miner_name)
        error = await proxy.wait_for(lambda m: m.get("method") == "rm.error", timeout=5)
        assert "revoked" in error["params"]["reason"]
        await proxy.aclose()
        late = await TestProxy.connect(nursery, server, own.client_context())  # TLS itself succeeds ...
        with pytest.raises(ConnectionError):
            await late.hello()  # ... but the sidecar closes before any session exists
        assert server.statistics().certificate_refusals == 1 and server.statistics().sessions_total == 1
        await late.aclose()
        nursery.cancel_scope.cancel()


async def test_a_malformed_control_line_closes_only_that_connection(pki: TestPKI, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sidecar")
    async with trio.open_nursery() as nursery:
        _pool, server = await start(nursery, pki)
        steady = await TestProxy.connect(nursery, server, pki.client_context())
        await steady.hello()
        channel = await steady.open(3)
        rogue = await TestProxy.connect(nursery, server, pki.client_context())
        await rogue.hello()
        await rogue.open(3)
        await rogue.stream.send_all(b'{"ch": 3, "id": 1, "method": 42}\n')
        error = await rogue.wait_for(lambda m: m.get("method") == "rm.error")
        assert "malformed control line" in error["params"]["reason"]
        with trio.fail_after(5):
            while not rogue.closed:
                await trio.sleep(0.01)
        # The other proxy's session goes on: a share and a channel request still work.
        await steady.send_datagram(steady.seal(find_share(channel)))
        verdict = await steady.wait_for(results_for(steady, 0))
        assert verdict["params"]["v"][0][3] == 1
        await steady.send({"ch": 3, "id": 30, "method": "mining.suggest_difficulty", "params": [0.001]})
        assert (await steady.wait_for(lambda m: m.get("id") == 30))["result"] is True
        stats = server.statistics()
        assert stats.sessions_active == 1 and stats.closed_by_reason == {"protocol error": 1}
        assert any(
            r.levelno == logging.WARNING
            and "malformed control line" in r.getMessage()
            and "other proxies are not affected" in r.getMessage()
            for r in caplog.records
        )
        assert any("connected: miner certificate 'test-miner'" in r.getMessage() for r in caplog.records)
        await steady.aclose()
        await rogue.aclose()
        nursery.cancel_scope.cancel()


async def test_without_udp_shares_travel_over_tls(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        pool, server = await start(nursery, pki, udp=False)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        result = await proxy.hello()
        assert result["udp_port"] is None and "udp-shares" not in result["features"] and server.udp_port is None
        channel = await proxy.open(3)
        share = find_share(channel)
        await proxy.send({"ch": 3, "id": 5, "method": "mining.submit", "params": submit_params(share, channel)})
        assert (await proxy.wait_for(lambda m: m.get("id") == 5))["result"] is True
        assert pool.statistics().accepted == 1
        await proxy.aclose()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ command line


def test_the_command_refuses_to_run_without_certificates(pki: TestPKI) -> None:
    runner = CliRunner()
    done = runner.invoke(sidecar, ["--pool", "stratum+tcp://127.0.0.1:3333"])
    assert done.exit_code == 2
    assert "does not run without certificates" in done.output and "--cert, --key, --ca are missing" in done.output
    assert "stratumrm pki init" in done.output and "issue-pool" in done.output
    done = runner.invoke(
        sidecar, ["--pool", "stratum+tcp://127.0.0.1:3333", "--cert", str(pki.pool_certificate), "--ca", str(pki.ca_certificate)]
    )
    assert done.exit_code == 2 and "--key is missing" in done.output
    done = runner.invoke(
        sidecar,
        [
            "--pool",
            "stratum+tcp://127.0.0.1:3333",
            "--cert",
            "/nonexistent/pool.pem",
            "--key",
            str(pki.pool_key),
            "--ca",
            str(pki.ca_certificate),
        ],
    )
    assert done.exit_code == 2 and "certificate file not found" in done.output
    swapped = ["--pool", "stratum+tcp://127.0.0.1:3333", "--cert", str(pki.pool_key), "--key", str(pki.pool_certificate)]
    done = runner.invoke(sidecar, [*swapped, "--ca", str(pki.ca_certificate)])
    assert done.exit_code == 2 and "does not hold a PEM certificate" in done.output
    assert "not its private key" in done.output and "Traceback" not in done.output
    done = runner.invoke(
        sidecar,
        [
            "--cert",
            str(pki.pool_certificate),
            "--key",
            str(pki.pool_key),
            "--ca",
            str(pki.ca_certificate),
            "--pool",
            "stratumrm://x:1",
        ],
    )
    assert done.exit_code == 2 and "stratum+tcp://" in done.output


@pytest.mark.parametrize(
    "text, expected",
    [
        ("203.0.113.9", ("203.0.113.9", None)),
        ("pool.example.com:4444", ("pool.example.com", 4444)),
        ("[2001:db8::1]:4444", ("2001:db8::1", 4444)),
        ("2001:db8::1", ("2001:db8::1", None)),
        (":4444", (None, 4444)),
    ],
)
def test_advertised_addresses(text: str, expected: tuple[str | None, int | None]) -> None:
    assert parse_advertise(text) == expected


async def test_the_advertised_address_is_what_the_hello_says(pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        _pool, server = await start(nursery, pki, advertise_host="203.0.113.9", advertise_port=4444)
        proxy = await TestProxy.connect(nursery, server, pki.client_context())
        result = await proxy.hello()
        assert (result["udp_host"], result["udp_port"]) == ("203.0.113.9", 4444)
        await proxy.aclose()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ admission under a connection flood


def _admission_decisions(server: SidecarServer) -> tuple[int, int]:
    """How many connections the sidecar's admission admitted and refused at their accept."""
    from bridge.net.admission import Refusal

    admission = server.statistics().admission
    at_accept = (Refusal.FDS_LOW, Refusal.PENDING_CAP, Refusal.SOURCE_CAP)
    return admission.admitted, sum(admission.refused.get(reason, 0) for reason in at_accept)


async def _connect_silently(source: str, server: SidecarServer) -> trio.socket.SocketType | None:
    """A TCP connection from ``source`` that never says anything; None if the sidecar refused it.

    Waits for the sidecar's admission to decide on it (its counters), then, if refused,
    for the close the refusal is.
    """
    assert server.port is not None
    admitted, refused = _admission_decisions(server)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    try:
        await sock.connect((LOCALHOST, server.port))
    except ConnectionResetError:
        sock.close()
        return None
    with trio.move_on_after(30) as waited:
        while _admission_decisions(server) == (admitted, refused):
            await trio.sleep(0.001)
    assert not waited.cancelled_caught, "the sidecar neither admitted nor refused a connection in 30 s (stopped accepting?)"
    with trio.fail_after(30):
        if _admission_decisions(server)[1] == refused:
            return sock
        try:
            while await sock.recv(1):
                pass
        except OSError:
            pass  # a reset is a close too
    sock.close()
    return None


async def test_a_connection_flood_leaves_room_for_an_honest_proxy_the_status_port_and_the_pool_check(
    pki: TestPKI,
) -> None:
    """Silent connections until the descriptors run short: an honest proxy still mines over UDP,
    the status port answers, and the pool check still says up (issue 9, item 2)."""
    import resource

    from bridge.net.admission import AdmissionLimits
    from bridge.net.listen import fd_gauge, raise_fd_limit
    from bridge.web.app import ManagementApp
    from bridge.web.roles import SidecarView

    raise_fd_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    gauge = fd_gauge()
    interval, gauge.sample_interval = gauge.sample_interval, 0.0  # count every accept exactly
    flood: list[trio.socket.SocketType] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 240, hard))
    try:
        async with trio.open_nursery() as nursery:
            limits = AdmissionLimits(max_pending=10_000, max_pending_per_source=10_000, fd_reserve=80)
            pool, server = await start(nursery, pki, admission=limits, handshake_timeout=120.0)
            status = ManagementApp(SidecarView(server))
            status_port = await nursery.start(status.serve, LOCALHOST, 0)
            assert server.port is not None
            sources = [f"127.0.0.{n}" for n in range(2, 6)]
            refused = 0
            for attempt in range(400):
                sock = await _connect_silently(sources[attempt % len(sources)], server)
                if sock is None:
                    refused += 1
                    if refused >= 3:
                        break
                else:
                    flood.append(sock)
            assert refused >= 3, f"{len(flood)} silent connections and the sidecar never refused one"
            print(f"\n{len(flood)} silent connections held, {refused} refused")
            admission = server.statistics().admission
            assert admission.refused.get("file descriptors low", 0) >= 3 and admission.pending >= 40

            proxy = await TestProxy.connect(nursery, server, pki.client_context())
            await proxy.hello()
            channel = await proxy.open(3)
            await proxy.send_datagram(proxy.seal(find_share(channel)))
            verdicts = await proxy.wait_for(results_for(proxy, 0), timeout=30.0)
            assert verdicts["params"]["v"] == [[proxy.epoch, 0, 0, 1]]  # accepted, over UDP
            assert pool.statistics().accepted == 1

            stream = await trio.open_tcp_stream(LOCALHOST, status_port)
            await stream.send_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            with trio.fail_after(30):
                while data := await stream.receive_some(65536):
                    answer += data
            assert answer.startswith(b"HTTP/1.1 200")
            await stream.aclose()

            assert await server.pool_watch.check() == (True, "")
            assert server.pool_watch.up and server.pool_watch.outages == 0
            assert server.statistics().admission.refused.get("evicted for a newcomer", 0) >= 1
            await proxy.aclose()
            nursery.cancel_scope.cancel()
    finally:
        for sock in flood:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        gauge.sample_interval = interval


@pytest.mark.parametrize(
    ("reason", "level"),
    [
        ("proxy silent for 5 s (no line, no rm.pong)", logging.WARNING),
        ("proxy did not read 16777216 bytes of control data", logging.WARNING),
        ("proxy took no control data for 30 s", logging.WARNING),
        ("control connection error: connection reset by the peer", logging.WARNING),
        ("internal error", logging.WARNING),
        ("proxy closed the control connection", logging.INFO),
        ("proxy closed the connection: rigs moved to another sidecar", logging.INFO),
        ("sidecar shutting down", logging.INFO),
    ],
)
def test_a_proxy_cut_off_is_logged_as_a_warning_and_a_goodbye_as_info(reason: str, level: int) -> None:
    assert disconnect_level(reason) == level
