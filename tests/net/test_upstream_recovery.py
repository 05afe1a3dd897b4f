"""Upstreams that go away and come back, against a pool as unkind as ckpool (issue 9, items 5 and 10).

The reference pool never answers a second ``mining.authorize`` on a connection
(ckpool's "trying to authorise twice"), so a health probe that re-authorizes as a
keepalive would hear nothing and flap. Every wait here is event-driven with a
generous bound; nothing asserts a duration. The in-process tests run on trio's
autojump clock with capped hash rates (:data:`HASHRATE` at :data:`DIFFICULTY`, a share
about every 0.17 s of that clock per rig): quiet periods, probe intervals and
reconnect delays cost no real time.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from bridge.relay.failover import FailoverConfig
from bridge.testing.chain import start_chain
from bridge.testing.failover import start_failover_bench
from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig

#: A share every ~8,600 hashes, so ~0.17 virtual seconds apart at :data:`HASHRATE`.
DIFFICULTY = 0.000002
HASHRATE = 50_000

FAST = {"silence_timeout": 1.0, "lag_delay": 0.5, "hold_down": 1.5, "no_upstream_grace": 0.5}


async def until(condition: Callable[[], bool], step: float = 0.05) -> None:
    while not condition():
        await trio.sleep(step)


async def test_rigs_mine_again_soon_after_the_pool_behind_the_sidecar_restarts(tmp_path, autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        # Jobs every 2 s leave the probe's sessions quiet between them, the case that flapped.
        chain = await start_chain(
            nursery, tmp_path, accounts=("back",), pool_config=PoolConfig(difficulty=DIFFICULTY, notify_interval=2.0)
        )
        pool = chain.pool
        pool_port = chain.sidecar.pool.port
        miner = Miner(chain.miner_url, "back.rig", profile="cgminer", reconnect_delay=0.2, hashrate=HASHRATE)
        nursery.start_soon(miner.run)
        with trio.fail_after(60):
            await until(lambda: len(miner.accepted) >= 2)
            await trio.sleep(3.0)  # quiet periods with only jobs: nothing may flap
            assert chain.proxy.statistics().failover.detections == {}
            pool.kill()
            await until(lambda: not chain.sidecar.pool_watch.up)
            await until(lambda: chain.proxy.policy.warnings(trio.current_time()) != [])
            before = len(miner.accepted)
            await nursery.start(pool.serve, "127.0.0.1", pool_port)
            await until(lambda: len(miner.accepted) >= before + 2)
        assert chain.sidecar.pool_watch.up and not any("is down" in w for w in chain.sidecar.warnings())
        stats = chain.proxy.statistics().failover
        assert stats.detections.get("silent", 0) == 0, "the probe must not mistake ckpool's silence for an outage"
        assert pool.statistics().unanswered.get("authorise twice", 0) == 0, "nothing made the pool log a warning"
        assert chain.proxy.policy.warnings(trio.current_time()) == []
        miner.stop()
        nursery.cancel_scope.cancel()


async def test_a_proxy_whose_only_upstream_is_down_when_the_first_rig_comes_recovers_by_itself(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        bench = await start_failover_bench(
            nursery, pools=1, failover=FailoverConfig(**FAST), pool_config=PoolConfig(difficulty=DIFFICULTY)
        )
        [pool] = bench.pools
        pool.kill()  # no probe user, no rig has ever authorized: the probe has no worker name
        miner = Miner(bench.miner_url(), "alice.early", profile="cgminer", reconnect_delay=0.2, hashrate=HASHRATE)
        nursery.start_soon(miner.run)
        with trio.fail_after(60):
            await until(lambda: miner.statistics().disconnects >= 1)  # released: nothing usable
            warnings = bench.proxy.policy.warnings(trio.current_time())
            assert any("upstream pool0 is down" in w for w in warnings)
            assert any(w.startswith("no usable upstream") for w in warnings)
            await bench.restore(0)
            await until(lambda: len(miner.accepted) >= 2)
        assert bench.proxy.policy.warnings(trio.current_time()) == []
        assert pool.statistics().unanswered.get("authorise twice", 0) == 0
        miner.stop()
        nursery.cancel_scope.cancel()


async def test_stratumrm_status_warns_and_exits_3_while_the_upstream_is_down() -> None:
    from functools import partial

    from click.testing import CliRunner

    from bridge.config import parse_upstream_url
    from bridge.net.miner_proxy import MinerProxy
    from bridge.net.proxy_service import ProxyService
    from bridge.status_command import WARNINGS_EXIT_STATUS, status
    from bridge.testing.pool import ReferencePool

    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig())
        pool_port = await nursery.start(pool.serve, "127.0.0.1", 0)
        pool.kill()  # down before the proxy starts
        proxy = MinerProxy(parse_upstream_url(f"stratum+tcp://127.0.0.1:{pool_port}"), failover=FailoverConfig(**FAST))
        service = ProxyService(proxy, http_listen=("127.0.0.1", 0))
        await nursery.start(service.run, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{service.web.port}"
        runner = CliRunner()
        with trio.fail_after(30):
            await until(lambda: proxy.policy.is_down(0))  # the probe runs with no rig and no worker name
            result = await trio.to_thread.run_sync(partial(runner.invoke, status, ["--url", url]))
            assert result.exit_code == WARNINGS_EXIT_STATUS, result.output
            assert "upstream " in result.output and "is down (connect failed" in result.output
            assert "no usable upstream" in result.output
            await nursery.start(pool.serve, "127.0.0.1", pool_port)
            await until(lambda: proxy.policy.usable(0))
            result = await trio.to_thread.run_sync(partial(runner.invoke, status, ["--url", url]))
            assert result.exit_code == 0 and "Warnings: none" in result.output, result.output
        nursery.cancel_scope.cancel()
