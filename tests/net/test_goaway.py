"""rm.goaway: a draining sidecar hands its proxy to another sidecar behind the same balancer.

Two sidecars sit behind a minimal TCP balancer (test code that, like HAProxy with
``option redispatch``, forwards each connection to the first sidecar that accepts
it); each advertises its own UDP address. Sidecar A drains: it closes its listener,
sends rm.goaway, and returns once the proxy has moved every rig to sidecar B.
The tally: every rig keeps mining (a new accepted share after the drain), the
#xnsub rig without reconnecting, nothing told accepted that the pool lacks,
nothing twice at the pool.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio

from bridge.config import parse_upstream_url
from bridge.net.miner_proxy import MinerProxy
from bridge.net.sidecar import SidecarServer
from bridge.testing.miner import Miner
from bridge.testing.pki import make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool

LOCALHOST = "127.0.0.1"


class FirstUpBalancer:
    """Forwards each TCP connection to the first backend that accepts it."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.routed: list[int] = []

    async def handle(self, client: trio.SocketStream) -> None:
        for port in self.backends:
            try:
                server = await trio.open_tcp_stream(LOCALHOST, port)
            except OSError:
                continue
            self.routed.append(port)
            async with client, server, trio.open_nursery() as nursery:

                async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
                    try:
                        while data := await source.receive_some(65536):
                            await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pipe, client, server)
                nursery.start_soon(pipe, server, client)
            return
        await client.aclose()


async def until(condition: Callable[[], bool], step: float = 0.05) -> None:
    while not condition():
        await trio.sleep(step)


def share_keys(records) -> set:
    return {(r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits) for r in records}


async def test_a_draining_sidecar_moves_its_rigs_to_another_without_dropping_one(tmp_path) -> None:
    pki = make_test_pki(tmp_path, accounts=("alice",))
    async with trio.open_nursery() as nursery:
        # No session resumption: a rig that reconnects (client.reconnect) gets a fresh
        # extranonce1, so the pool's duplicate count measures the bridge alone (a resumed
        # cgminer-profile rig re-submits its last shares, which the pool rightly rejects).
        pool = ReferencePool(PoolConfig(difficulty=0.000002, session_resume_seconds=0))
        pool_port = await nursery.start(pool.serve, LOCALHOST, 0)
        url = parse_upstream_url(f"stratum+tcp://{LOCALHOST}:{pool_port}")
        sidecars = [SidecarServer(url, pki.server_context(), advertise_host=LOCALHOST) for _ in range(2)]
        ports = [await nursery.start(sidecar.serve, LOCALHOST, 0) for sidecar in sidecars]
        balancer = FirstUpBalancer(ports)
        listeners = await nursery.start(functools.partial(trio.serve_tcp, balancer.handle, 0, host=LOCALHOST))
        balancer_port = listeners[0].socket.getsockname()[1]
        proxy = MinerProxy(
            parse_upstream_url(f"stratumrm://{LOCALHOST}:{balancer_port}"),
            upstream_ssl_context=pki.client_context(),
            drain_timeout=0.5,
        )
        proxy_port = await nursery.start(proxy.serve, LOCALHOST, 0)
        miner_url = f"stratum+tcp://{LOCALHOST}:{proxy_port}"
        miners = [
            # ~12 shares/s each (8,600 hashes a share at 100 kH/s)
            Miner(miner_url + "#xnsub", "alice.xnsub", profile="bmminer", reconnect_delay=0.2, hashrate=100_000),
            Miner(miner_url, "alice.cgminer", profile="cgminer", reconnect_delay=0.2, hashrate=100_000),
        ]
        for miner in miners:
            nursery.start_soon(miner.run)
        a, b = sidecars
        with trio.fail_after(60):
            await until(lambda: all(len(m.accepted) >= 2 for m in miners))
            assert a.statistics().sessions_active == 1 and b.statistics().sessions_active == 0
            await a.drain(30.0, "test drain")  # returns once the proxy left
            assert a.draining and a.statistics().sessions_active == 0
            # From here on every verdict comes through B (A holds no proxy any more).
            before = {m.name: len(m.accepted) for m in miners}
            await until(lambda: all(len(m.accepted) >= before[m.name] + 2 for m in miners))
        assert b.statistics().sessions_active == 1 and b.statistics().shares_forwarded >= 2
        xnsub = miners[0]
        assert xnsub.statistics().disconnects == 0, "an #xnsub rig moves with set_extranonce, no reconnect"
        assert proxy.statistics().reconnects_sent >= 1  # the cgminer rig: an orderly client.reconnect
        for miner in miners:
            miner.finish()
        with trio.fail_after(30):
            await until(lambda: all(m.statistics().pending == 0 for m in miners))
        for miner in miners:
            miner.stop()
        assert not xnsub.unanswered()
        # The cgminer rig closes as soon as it reads client.reconnect, so shares it sent
        # just before go unanswered (how many depends on its share rate). The proxy still
        # relays them (it lingers for them), and the pool credits every one: none is lost.
        unanswered = share_keys(s for m in miners for s in m.unanswered())
        with trio.fail_after(10):
            await until(lambda: unanswered <= share_keys(pool.accepted))
        pool_keys = share_keys(pool.accepted)
        assert len(pool_keys) == len(pool.accepted) and pool.statistics().duplicates == 0
        assert share_keys(s for m in miners for s in m.accepted) <= pool_keys
        nursery.cancel_scope.cancel()


async def test_a_proxy_that_says_hello_during_the_drain_is_told_too(tmp_path) -> None:
    import json

    pki = make_test_pki(tmp_path, accounts=("alice",))
    async with trio.open_nursery() as nursery:
        url = parse_upstream_url(f"stratum+tcp://{LOCALHOST}:9")
        sidecar = SidecarServer(url, pki.server_context(), udp=False)
        port = await nursery.start(sidecar.serve, LOCALHOST, 0)
        stream = trio.SSLStream(await trio.open_tcp_stream(LOCALHOST, port), pki.client_context(), server_hostname=LOCALHOST)
        await stream.do_handshake()
        with trio.fail_after(30):
            await until(lambda: len(sidecar.sessions()) == 1)
        nursery.start_soon(sidecar.drain, 60.0, "late hello")
        await until(lambda: sidecar.draining)
        await stream.send_all(b'{"id":1,"method":"rm.hello","params":{"version":1,"features":["goaway"]}}\n')
        data = b""
        with trio.fail_after(30):
            while b"rm.goaway" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk
                data += chunk
        goaway = next(json.loads(line) for line in data.splitlines() if b"rm.goaway" in line)
        assert goaway["params"]["reason"] == "late hello" and 0 < goaway["params"]["deadline"] <= 60.0
        await stream.aclose()
        with trio.fail_after(30):
            await until(lambda: not sidecar.sessions())
        nursery.cancel_scope.cancel()
