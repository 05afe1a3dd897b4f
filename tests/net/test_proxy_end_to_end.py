"""The miner-side proxy on real sockets: reference miners -> proxy -> reference pool.

Every share is hashed for real by the miners and validated for real by the pool,
so "the pool's accepted set equals the miners' accepted set" proves the relay
carried job, extranonce, ntime, nonce and version bits intact, and that every
verdict went back to the right rig under the rig's own id.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio

from bridge.config import parse_upstream_url
from bridge.net.miner_proxy import MinerProxy
from bridge.pki.tls import public_client_context
from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig, ReferencePool

PROFILES = ["cgminer", "cpuminer", "bfgminer", "bmminer", "bitaxe"]
DIFFICULTY = 0.000005  # ~21k hashes per share: dozens of shares a second per miner


def share_keys(records) -> set:
    return {(r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits) for r in records}


async def start_chain(nursery, pool_config: PoolConfig | None = None, **proxy_options):
    pool = ReferencePool(pool_config or PoolConfig(difficulty=DIFFICULTY, notify_interval=5.0))
    pool_port = await nursery.start(pool.serve, "127.0.0.1", 0)
    proxy = MinerProxy(parse_upstream_url(f"stratum+tcp://127.0.0.1:{pool_port}"), **proxy_options)
    proxy_port = await nursery.start(proxy.serve, "127.0.0.1", 0)
    return pool, proxy, proxy_port


async def run_miners(miners: list[Miner], timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for miner in miners:
                nursery.start_soon(miner.run)


async def test_every_profile_through_the_relay_gets_the_pools_true_verdicts() -> None:
    async with trio.open_nursery() as nursery:
        # five miners hash in this one process: a fifth of the usual work per share
        pool, proxy, port = await start_chain(nursery, PoolConfig(difficulty=DIFFICULTY / 5, notify_interval=5.0))
        pool.reject_next(3, 23)  # the first three shares are rejected on purpose
        miners = [
            Miner(f"stratum+tcp://127.0.0.1:{port}", f"{profile}.rig1", profile=profile, max_shares=4, reconnect_delay=0.2)
            for profile in PROFILES
        ]
        await run_miners(miners)

        accepted = [share for miner in miners for share in miner.accepted]
        rejected = [share for miner in miners for share in miner.rejected]
        assert not [share for miner in miners for share in miner.unanswered()]
        assert share_keys(accepted) == share_keys(pool.accepted)
        assert len(accepted) == len(pool.accepted)  # no share reached the pool twice
        assert len(rejected) == 3 and {s.verdict.code for s in rejected} == {23}
        assert sorted(r.code for r in pool.rejected) == [23, 23, 23]
        for miner in miners:
            assert miner.statistics().submitted == 4
            assert miner.statistics().unmatched_replies == 0
        # The pool saw every rig's own worker name.
        assert set(pool.accepted_by_worker) <= {f"{p}.rig1" for p in PROFILES}
        stats = proxy.statistics()
        assert stats.submitted == 20 and stats.accepted == 17 and stats.rejected == 3
        nursery.cancel_scope.cancel()


async def test_user_agents_and_version_rolling_reach_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge.testing.pool")
    async with trio.open_nursery() as nursery:
        pool, _proxy, port = await start_chain(nursery)
        miners = [Miner(f"stratum+tcp://127.0.0.1:{port}", f"{p}.ua", profile=p, max_shares=2) for p in ("bmminer", "bitaxe")]
        await run_miners(miners)
        # The pool's log line of each subscribe names the user agent it received (the
        # connections themselves may be gone by now: each miner stops after two shares).
        subscribed = [r.getMessage() for r in caplog.records if ": subscribed (" in r.getMessage()]
        assert any("subscribed (bmminer" in m for m in subscribed) and any("subscribed (bitaxe" in m for m in subscribed)
        rolled = [r for r in pool.accepted if r.version_bits not in (None, "00000000")]
        assert rolled, "version-rolled shares must pass through and be accepted"
        nursery.cancel_scope.cancel()


async def test_stratum_ssl_upstream_with_certificate_verification(tmp_path) -> None:
    from bridge.testing.pki import make_test_pki, server_context_for_pool_tls

    paths = make_test_pki(tmp_path)
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig(difficulty=DIFFICULTY))
        pool_port = await nursery.start(
            lambda task_status: pool.serve(
                "127.0.0.1", 0, ssl_context=server_context_for_pool_tls(paths), task_status=task_status
            )
        )
        proxy = MinerProxy(
            parse_upstream_url(f"stratum+ssl://127.0.0.1:{pool_port}"),
            upstream_ssl_context=public_client_context(str(paths.ca_cert)),
        )
        port = await nursery.start(proxy.serve, "127.0.0.1", 0)
        miner = Miner(f"stratum+tcp://127.0.0.1:{port}", "tls.rig", profile="cgminer", max_shares=3)
        await run_miners([miner])
        assert len(miner.accepted) == 3 and share_keys(miner.accepted) == share_keys(pool.accepted)
        nursery.cancel_scope.cancel()


async def test_stratum_ssl_upstream_with_an_untrusted_certificate_is_refused(tmp_path) -> None:
    from bridge.testing.pki import make_test_pki, server_context_for_pool_tls

    ours = make_test_pki(tmp_path / "ours")
    theirs = make_test_pki(tmp_path / "theirs")
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig(difficulty=DIFFICULTY))
        pool_port = await nursery.start(
            lambda task_status: pool.serve(
                "127.0.0.1", 0, ssl_context=server_context_for_pool_tls(theirs), task_status=task_status
            )
        )
        proxy = MinerProxy(
            parse_upstream_url(f"stratum+ssl://127.0.0.1:{pool_port}"),
            upstream_ssl_context=public_client_context(str(ours.ca_cert)),
        )
        port = await nursery.start(proxy.serve, "127.0.0.1", 0)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b'{"id": 1, "method": "mining.subscribe", "params": ["cgminer/4.11.1"]}\n')
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
        reply = json.loads(data.splitlines()[0])
        assert reply["id"] == 1 and reply["error"][0] == 20 and "Upstream pool unavailable" in reply["error"][1]
        assert "CERTIFICATE_VERIFY_FAILED" in reply["error"][1] and pool.statistics().accepted == 0
        assert proxy.statistics().closed_by_reason.get("upstream lost") == 1
        nursery.cancel_scope.cancel()


async def test_non_stratum_connections_are_closed_and_counted_without_disturbing_rigs() -> None:
    async with trio.open_nursery() as nursery:
        _pool, proxy, port = await start_chain(nursery, opening_timeout=0.5)
        miner = Miner(f"stratum+tcp://127.0.0.1:{port}", "steady.rig", profile="cgminer", max_shares=3)

        async def intruders() -> None:
            hello = bytes.fromhex("160301020001") + b"\x00" * 64
            for opening in (hello, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b""):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                if opening:
                    await stream.send_all(opening)
                with trio.fail_after(3):
                    assert await stream.receive_some(100) == b""  # closed by the proxy
                await stream.aclose()

        async with trio.open_nursery() as inner:
            inner.start_soon(intruders)
            inner.start_soon(run_miners, [miner])
        assert len(miner.accepted) == 3
        reasons = proxy.statistics().closed_by_reason
        assert reasons.get("not a Stratum client") == 2 and reasons.get("idle") == 1
        nursery.cancel_scope.cancel()


async def test_a_stalled_pool_gets_rigs_an_explicit_error_not_silence(autojump_clock) -> None:
    # Virtual time (autojump): the 1 s submit timeout is 1 s of trio's clock however
    # loaded the machine is; the capped hash rate lets that clock run while the rig hashes.
    async with trio.open_nursery() as nursery:
        pool, proxy, port = await start_chain(nursery, submit_timeout=1.0)
        # No share limit: a rig that had found its few shares before the stall would submit
        # nothing more for the proxy to answer (about 10 shares a second at this difficulty).
        miner = Miner(f"stratum+tcp://127.0.0.1:{port}", "patient.rig", profile="cpuminer", hashrate=200_000)
        nursery.start_soon(miner.run)
        with trio.fail_after(20):
            while miner.statistics().jobs == 0:
                await trio.sleep(0.05)
            pool.stall(True)
            while not miner.rejected:
                await trio.sleep(0.05)
        share = miner.rejected[0]
        assert share.verdict.code == 20 and "not confirmed" in share.verdict.message
        assert proxy.statistics().accepted == 0 or pool.statistics().accepted >= proxy.statistics().accepted
        miner.stop()
        nursery.cancel_scope.cancel()


async def test_pool_connection_loss_answers_pending_shares_and_releases_the_rig(autojump_clock) -> None:
    # Virtual time (autojump): the reconnection delay costs no real time; the rig is capped.
    async with trio.open_nursery() as nursery:
        pool, proxy, port = await start_chain(nursery)
        miner = Miner(f"stratum+tcp://127.0.0.1:{port}", "orphan.rig", profile="cgminer", reconnect_delay=0.1, hashrate=200_000)
        nursery.start_soon(miner.run)
        with trio.fail_after(20):
            while miner.statistics().jobs == 0:
                await trio.sleep(0.05)
            pool.drop_connections(rst=True)
            while miner.statistics().disconnects == 0:
                await trio.sleep(0.05)
            # The rig reconnects through the proxy, which opens a fresh upstream.
            before = len(miner.accepted)
            while len(miner.accepted) < before + 2:
                await trio.sleep(0.05)
        miner.stop()
        assert share_keys(miner.accepted) <= share_keys(pool.accepted)
        # With the pool back at once, the rig is sent client.reconnect (cgminer ignores
        # set_extranonce) rather than dropped; either way it was let go of explicitly.
        reasons = proxy.statistics().closed_by_reason
        assert reasons.get("upstream lost", 0) + reasons.get("client.reconnect sent", 0) >= 1
        nursery.cancel_scope.cancel()
