"""The sidecar's pool check on real sockets: a fresh connection's subscribe, never a warning at the pool."""

from __future__ import annotations

from collections.abc import Callable

import trio

from bridge.config import parse_upstream_url
from bridge.net.pool_watch import PoolWatch
from bridge.testing.pool import PoolConfig, ReferencePool


async def until(condition: Callable[[], bool], step: float = 0.02) -> None:
    while not condition():
        await trio.sleep(step)


async def test_a_stalled_pool_is_found_down_by_quiet_and_up_again_when_it_answers(autojump_clock) -> None:
    # Virtual time (autojump): the check intervals and timeouts cost no real time.
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig())
        port = await nursery.start(pool.serve, "127.0.0.1", 0)
        changes: list[tuple[bool, str]] = []
        watch = PoolWatch(
            parse_upstream_url(f"stratum+tcp://127.0.0.1:{port}"),
            None,
            lambda up, why: changes.append((up, why)),
            quiet_after=0.2,
            check_timeout=0.5,
        )
        nursery.start_soon(watch.run)
        with trio.fail_after(30):
            await until(lambda: watch.checks >= 3)  # quiet: checks that succeed change nothing
            assert watch.up and changes == []
            pool.stall(True)  # sockets stay open, nothing is answered
            await until(lambda: not watch.up)
            assert "did not answer mining.subscribe" in watch.reason
            pool.stall(False)
            await until(lambda: watch.up)
        assert [up for up, _ in changes] == [False, True] and watch.outages == 1
        assert pool.statistics().unanswered == {}, "the checks made the pool log nothing"
        nursery.cancel_scope.cancel()


async def test_jobs_arriving_bring_a_pool_back_before_the_next_check() -> None:
    async with trio.open_nursery() as nursery:
        pool = ReferencePool(PoolConfig())
        port = await nursery.start(pool.serve, "127.0.0.1", 0)
        pool.kill()
        watch = PoolWatch(parse_upstream_url(f"stratum+tcp://127.0.0.1:{port}"), None, lambda up, why: None)
        nursery.start_soon(watch.run)
        with trio.fail_after(30):
            watch.suspect("pool connection error: reset")
            await until(lambda: not watch.up)
            assert "cannot connect" in watch.reason
            watch.alive()  # a channel's pool connection read a line
            assert watch.up
        nursery.cancel_scope.cancel()
