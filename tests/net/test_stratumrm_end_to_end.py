"""The whole StratumRM chain on real sockets: rigs -> proxy => (lossy UDP) => sidecar -> pool.

Shares are hashed for real by the reference miners and validated for real by the
reference pool; the tally (pool's accepted set == miners' accepted set, nothing
twice at the pool, every submit answered) is what proves delivery.
"""

from __future__ import annotations

import pytest
import trio

from bridge.testing.chain import start_chain
from bridge.testing.lossy_link import Impairment
from bridge.testing.miner import Miner
from bridge.testing.pool import PoolConfig

PROFILES = ["cgminer", "cpuminer", "bfgminer", "bmminer", "bitaxe"]
#: ~8,600 hashes per share: the shares a test waits for come within milliseconds.
DIFFICULTY = 0.000002


def share_keys(records) -> set:
    return {(r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits) for r in records}


def assert_tally(miners: list[Miner], pool) -> None:
    assert not [share for miner in miners for share in miner.unanswered()], "every submit must be answered"
    accepted = [share for miner in miners for share in miner.accepted]
    assert share_keys(accepted) == share_keys(pool.accepted)
    assert len(pool.accepted) == len(share_keys(pool.accepted)), "a share reached the pool twice"
    assert pool.statistics().duplicates == 0


async def run_miners(miners: list[Miner], timeout: float) -> None:
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for miner in miners:
                nursery.start_soon(miner.run)


async def test_every_profile_over_stratumrm_gets_true_verdicts(tmp_path) -> None:
    async with trio.open_nursery() as nursery:
        chain = await start_chain(nursery, tmp_path, accounts=tuple(PROFILES), pool_config=PoolConfig(difficulty=DIFFICULTY))
        chain.pool.reject_next(2, 23)
        miners = [Miner(chain.miner_url, f"{p}.rig1", profile=p, max_shares=4) for p in PROFILES]
        await run_miners(miners, 60)
        assert_tally(miners, chain.pool)
        rejected = [s for m in miners for s in m.rejected]
        assert len(rejected) == 2 and {s.verdict.code for s in rejected} == {23}
        link = chain.proxy.link.connection.statistics()
        assert link.udp_up and link.shares == 20 and link.shares_udp >= 10  # the first may beat the UDP probe
        assert chain.sidecar.statistics().shares_forwarded == 20
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("shares_per_miner", "udp_shares_over"),
    [
        # 600 shares: at 20 % loss still dozens of dropped batches, retransmissions and duplicates
        (120, 400),
        pytest.param(600, 2000, marks=pytest.mark.slow, id="3000"),
    ],
)
async def test_thousands_of_shares_through_a_lossy_duplicating_reordering_link(
    tmp_path, autojump_clock, shares_per_miner: int, udp_shares_over: int
) -> None:
    async with trio.open_nursery() as nursery:
        chain = await start_chain(
            nursery,
            tmp_path,
            accounts=tuple(PROFILES),
            pool_config=PoolConfig(difficulty=2e-7),
            loss=20,
            duplicate=5,
            reorder=5,
            seed=7,
        )
        # Small hashing chunks, so shares leave one by one rather than in batches.
        miners = [
            Miner(chain.miner_url, f"{p}.rig1", profile=p, max_shares=shares_per_miner, hashrate=150_000, chunk_size=256)
            for p in PROFILES
        ]
        await run_miners(miners, 150)
        assert_tally(miners, chain.pool)
        assert len(chain.pool.accepted) == shares_per_miner * len(PROFILES)
        link_stats = chain.link.statistics().to_target
        # Shares leave in batches of up to 32, so a few dozen datagrams carry them all.
        assert link_stats.dropped >= 5 and link_stats.duplicated + link_stats.reordered >= 1
        proxy = chain.proxy.link.connection.statistics()
        assert proxy.retransmissions_udp > 0 and proxy.shares_udp > udp_shares_over
        sidecar = chain.sidecar.statistics()
        assert sidecar.duplicates_from_cache + sidecar.duplicates_joined + sidecar.datagram_drops.get("replayed", 0) > 0
        nursery.cancel_scope.cancel()


async def test_blocked_udp_falls_back_to_tls_and_comes_back(tmp_path, autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        chain = await start_chain(
            nursery, tmp_path, accounts=("rig",), loss=0.001, seed=3, pool_config=PoolConfig(difficulty=DIFFICULTY)
        )
        blocked = Impairment(loss=100)
        miner = Miner(chain.miner_url, "rig.one", profile="cgminer", hashrate=50_000)
        nursery.start_soon(miner.run)
        connection = None
        with trio.fail_after(60):
            while len(miner.accepted) < 3:
                await trio.sleep(0.05)
            connection = chain.proxy.link.connection
            assert connection.udp_up
            chain.link.set_impairment(to_target=blocked, to_client=blocked)
            before = len(miner.accepted)
            while connection.udp_up or len(miner.accepted) < before + 10:
                await trio.sleep(0.05)
            assert connection.statistics().udp_fallbacks == 1
            chain.link.set_impairment(to_target=Impairment(), to_client=Impairment())
            connection.probe_interval = 0.2
            connection.probe(trio.current_time())
            chain.proxy.link.kick()
            while not connection.udp_up:
                await trio.sleep(0.05)
            udp_before = connection.statistics().shares_udp
            while connection.statistics().shares_udp < udp_before + 3:
                await trio.sleep(0.05)
        miner.finish()
        with trio.fail_after(10):
            while miner.statistics().pending:
                await trio.sleep(0.05)
        miner.stop()
        assert_tally([miner], chain.pool)
        nursery.cancel_scope.cancel()


async def test_block_candidates_travel_both_ways_and_reach_the_pool_once(tmp_path) -> None:
    async with trio.open_nursery() as nursery:
        config = PoolConfig(difficulty=DIFFICULTY, nbits="207fffff", new_block_on_solve=False)
        chain = await start_chain(nursery, tmp_path, accounts=("solo",), pool_config=config)
        miner = Miner(chain.miner_url, "solo.rig", profile="bmminer", max_shares=6)
        await run_miners([miner], 60)
        assert_tally([miner], chain.pool)
        proxy = chain.proxy.link.connection.statistics()
        assert proxy.block_candidates >= 1
        assert chain.pool.statistics().blocks == proxy.block_candidates
        nursery.cancel_scope.cancel()


async def test_a_stalled_pool_behind_the_sidecar_gets_rigs_an_explicit_error(tmp_path, autojump_clock) -> None:
    # Virtual time (autojump): the 1.5 s submit timeout costs no real time; the capped
    # rig lets that clock run while it hashes.
    async with trio.open_nursery() as nursery:
        chain = await start_chain(
            nursery, tmp_path, accounts=("wait",), submit_timeout=1.5, pool_config=PoolConfig(difficulty=DIFFICULTY)
        )
        miner = Miner(chain.miner_url, "wait.rig", profile="cpuminer", hashrate=50_000)
        nursery.start_soon(miner.run)
        with trio.fail_after(30):
            while miner.statistics().jobs == 0:
                await trio.sleep(0.05)
            chain.pool.stall(True)
            while not miner.rejected:
                await trio.sleep(0.05)
        verdict = miner.rejected[0].verdict
        assert verdict.code == 20 and "not confirmed" in verdict.message
        miner.stop()
        nursery.cancel_scope.cancel()


async def test_pool_loss_behind_the_sidecar_releases_the_rig_which_comes_back(tmp_path, autojump_clock) -> None:
    # Virtual time (autojump): reconnection delays cost no real time; the rig is capped.
    async with trio.open_nursery() as nursery:
        chain = await start_chain(nursery, tmp_path, accounts=("back",), pool_config=PoolConfig(difficulty=DIFFICULTY))
        miner = Miner(chain.miner_url, "back.rig", profile="cgminer", reconnect_delay=0.2, hashrate=50_000)
        nursery.start_soon(miner.run)
        with trio.fail_after(40):
            while miner.statistics().jobs == 0:
                await trio.sleep(0.05)
            chain.pool.drop_connections(rst=True)
            while miner.statistics().disconnects == 0:
                await trio.sleep(0.05)
            before = len(miner.accepted)
            while len(miner.accepted) < before + 2:
                await trio.sleep(0.05)
        miner.finish()
        with trio.fail_after(10):
            while miner.statistics().pending:
                await trio.sleep(0.05)
        miner.stop()
        # A share in flight when the pool died may have been accepted by the pool
        # while the rig was told it is not confirmed; nothing else may differ.
        unconfirmed = share_keys(s for s in miner.rejected if "not confirmed" in s.verdict.message)
        assert share_keys(miner.accepted) <= share_keys(chain.pool.accepted)
        assert share_keys(chain.pool.accepted) - share_keys(miner.accepted) <= unconfirmed
        nursery.cancel_scope.cancel()


def _tasks_under(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found.extend(_tasks_under(child))
    return found


async def test_a_working_rig_costs_the_proxy_one_task(tmp_path) -> None:
    """Issue 9.6 (memory per rig): the rig's connection task reads, writes and flushes; a
    StratumRM session needs no task of its own (the link's reader hands its events over)."""
    async with trio.open_nursery() as nursery:
        chain = await start_chain(nursery, tmp_path, accounts=("one",), pool_config=PoolConfig(difficulty=DIFFICULTY))
        miners = [Miner(chain.miner_url, f"one.rig{n}", profile="cgminer") for n in range(4)]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(60):
            while any(not miner.accepted for miner in miners):
                await trio.sleep(0.05)
        assert chain.proxy._nursery is not None
        tasks = _tasks_under(chain.proxy._nursery.parent_task)
        # serve_admitted's handler_owns_connection: the rig's task is the proxy's handler itself.
        rig_tasks = [task for task in tasks if task.name.endswith("MinerProxy._handle")]
        assert len(rig_tasks) == 4
        assert all(not task.child_nurseries for task in rig_tasks)
        # Past its handshake, a rig's task holds no cancel scope of its own (admission's was
        # left with the handshake): it runs under its nursery's cancel status.
        assert all(task._cancel_status is task.parent_nursery._cancel_status for task in rig_tasks)
        assert [task.name for task in tasks if "_RigConnection" in task.name] == []
        # A rig waiting to read (nearly always) waits on its socket with no cancel scope of
        # its own (with its cancel status, about 1 KiB) under a short await chain.
        by_rig = {id(task.coro): task for task in rig_tasks}
        seen = 0
        while seen < 20:
            await trio.sleep(0.01)
            for rig in chain.proxy._rigs.values():
                if rig._reading:
                    seen += 1
                    assert rig._scope is None
        # The handler awaits the socket itself: no wrapper coroutine around it or between
        # (looked at until every rig is idle at once: one may be answering a share).
        for _ in range(500):
            chains = [[frame.f_code.co_name for frame, _ in task.iter_await_frames()][:2] for task in by_rig.values()]
            if all(chain == ["_handle", "wait_readable"] for chain in chains):
                break
            await trio.sleep(0.01)
        assert all(chain == ["_handle", "wait_readable"] for chain in chains), chains
        for miner in miners:
            miner.stop()
        nursery.cancel_scope.cancel()


async def test_a_closed_rig_leaves_no_reference_cycle_at_the_proxy(tmp_path) -> None:
    """Issue 9.6: what a rig's StratumRM channel leaves when it closes is freed by reference
    counting, not left for a full garbage collection (which a serving role runs rarely)."""
    import gc

    from bridge.net.rm_upstream import RMUpstreamHandle

    def handles() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is RMUpstreamHandle)

    async with trio.open_nursery() as nursery:
        chain = await start_chain(nursery, tmp_path, accounts=("one",), pool_config=PoolConfig(difficulty=DIFFICULTY))
        gc.collect()
        gc.disable()  # what is left in a cycle stays in gc.get_objects() until collected
        try:
            miners = [Miner(chain.miner_url, f"one.rig{n}", profile="cgminer") for n in range(4)]
            async with trio.open_nursery() as rigs:
                for miner in miners:
                    rigs.start_soon(miner.run)
                with trio.fail_after(60):
                    while any(not miner.accepted for miner in miners):
                        await trio.sleep(0.05)
                working = handles()  # the rigs' and the proxy's probe's
                assert working >= 4
                for miner in miners:
                    miner.stop()
            with trio.fail_after(30):
                while chain.proxy._rigs:
                    await trio.sleep(0.05)
            await trio.sleep(0.2)  # the links' closes of the channels
            assert handles() == working - 4
        finally:
            gc.enable()
        nursery.cancel_scope.cancel()


async def test_a_rig_s_pool_connection_waits_without_a_cancel_scope_at_the_sidecar(tmp_path) -> None:
    """Issue 9.6 (memory per rig): the sidecar's task per channel waits on its pool socket
    itself (os.read, wait_readable), with no cancel scope and no receive_some chain; a write
    to the pool or a close wakes it. Shares and verdicts still flow both ways."""
    async with trio.open_nursery() as nursery:
        chain = await start_chain(nursery, tmp_path, accounts=("one",), pool_config=PoolConfig(difficulty=0.00001))
        miners = [Miner(chain.miner_url, f"one.rig{n}", profile="cgminer") for n in range(3)]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(60):
            while any(len(miner.accepted) < 3 for miner in miners):
                await trio.sleep(0.05)
        links = [link for c in chain.sidecar._connections.values() for link in c._links.values()]
        assert len(links) >= 3 and all(link.sock is not None for link in links)  # and the probe's
        seen = 0
        while seen < 20:
            await trio.sleep(0.01)
            for link in links:
                if link.reading:
                    seen += 1
                    assert link.scope is None
        for miner in miners:
            miner.stop()
        nursery.cancel_scope.cancel()


async def test_the_sidecar_does_not_copy_its_channel_table_for_each_read_from_a_pool(tmp_path, monkeypatch) -> None:
    """Issue 9.6 (reconnect storm): after every read from a channel's pool connection the
    sidecar asked whether the channel was still open by copying the set of every open
    channel, O(channels) per job and verdict: at 10,000 rigs, seconds of CPU per round of
    jobs. It now asks about the one channel."""
    from bridge.relay.sidecar.session import SidecarSession

    copies = 0
    channels = SidecarSession.channels

    def counted(self: SidecarSession) -> frozenset[int]:
        nonlocal copies
        copies += 1
        return channels.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(SidecarSession, "channels", property(counted))
    async with trio.open_nursery() as nursery:
        chain = await start_chain(nursery, tmp_path, accounts=("one",), pool_config=PoolConfig(difficulty=0.00001))
        miners = [Miner(chain.miner_url, f"one.rig{n}", profile="cgminer") for n in range(2)]
        for miner in miners:
            nursery.start_soon(miner.run)
        with trio.fail_after(60):
            while any(len(miner.accepted) < 2 for miner in miners):
                await trio.sleep(0.05)
        for miner in miners:
            miner.stop()
        nursery.cancel_scope.cancel()
    assert copies == 0
