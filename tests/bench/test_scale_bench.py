"""``stratumrm bench scale`` runs end to end at a tiny size (50 rigs).

Nothing here checks a timing or a memory figure: they depend on the machine.
"""

from __future__ import annotations

import resource

import msgspec
import trio
import trio.testing
from click.testing import CliRunner

from bridge.bench.command import bench
from bridge.bench.memory import waits
from bridge.bench.scale import HANDSHAKE_TIMEOUT, Farm, Rig, raise_file_limit


def test_scale_benchmark_drives_rigs_through_a_real_proxy_and_sidecar_and_a_storm() -> None:
    result = CliRunner().invoke(
        bench,
        [
            "scale",
            "--rigs",
            "50",
            "--window",
            "0.5",
            "--share-interval",
            "0.5",
            "--storm-spread",
            "0.5",
            "--notify-interval",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "proxy KiB/rig" in table and "storm settle s" in table and "disconnects" in table
    row = next(line.split() for line in table.splitlines() if line.split()[:1] == ["50"])
    _rigs, _proxy_kib, _sidecar_kib, shares_per_second, _proxy_us, _sidecar_us, settle, _disconnects, retried = row
    assert float(shares_per_second) > 0  # rigs submitted and were answered in the window
    assert settle != "never" and float(settle) >= 0  # every rig came back after the storm
    assert int(retried) == 0  # no rig had to give up on a handshake at this size
    assert "[scale] 50 rigs: reconnect storm" in result.stderr  # progress lines while it runs
    # The storm's CPU per rig of every process on the machine, the farm of rigs included.
    storm_cpu = next(line for line in table.splitlines() if "CPU per returning rig in the storm" in line)
    assert all(f"{name} " in storm_cpu for name in ("proxy", "sidecar", "pool", "farm")), storm_cpu


def test_scale_benchmark_raises_its_own_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if soft == hard and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
        raised = raise_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert hard == resource.RLIM_INFINITY or raised == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_scale_benchmark_refuses_a_bad_rig_list() -> None:
    result = CliRunner().invoke(bench, ["scale", "--rigs", "ten"])
    assert result.exit_code != 0 and "rig counts" in result.output


async def _pool_side(
    answer: bytes | None, connections: list[float], enough: int, done: trio.Event, listeners: list[trio.SocketListener]
) -> None:
    """A rig port that answers every subscribe with ``answer`` (None: never answers)."""

    async def handle(stream: trio.SocketStream) -> None:
        connections.append(trio.current_time())
        if len(connections) >= enough:
            done.set()
        line = b""
        while b"\n" not in line:
            line += await stream.receive_some(4096)
        if answer is not None:
            await stream.send_all(answer)
        await trio.sleep_forever()

    await trio.serve_listeners(handle, listeners)


async def _rig_against(answer: bytes | None, connections_wanted: int) -> tuple[Farm, list[float]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    farm = Farm(listeners[0].socket.getsockname()[1], share_interval=5.0, seed=1)
    connections: list[float] = []
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pool_side, answer, connections, connections_wanted, done, listeners)
        nursery.start_soon(Rig(farm, 0).run)
        await done.wait()
        nursery.cancel_scope.cancel()
    return farm, connections


async def test_a_rig_whose_subscribe_is_refused_connects_again_as_cgminer_does() -> None:
    refusal = msgspec.json.encode({"id": 1, "result": None, "error": [20, "no pool", None]}) + b"\n"
    farm, _connections = await _rig_against(refusal, 2)
    assert farm.handshake_failures >= 1 and farm.disconnects == 0 and farm.working == 0


async def test_a_rig_whose_handshake_is_never_answered_gives_up_and_connects_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    autojump_clock.autojump_threshold = 0.2  # real loopback I/O in between: jump only when truly idle
    farm, connections = await _rig_against(None, 2)
    assert farm.handshake_failures >= 1
    assert connections[1] - connections[0] >= HANDSHAKE_TIMEOUT  # it waited the whole timeout first


async def test_waits_says_where_the_tasks_of_a_process_are_parked() -> None:
    async def parked_here() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(parked_here)
        await trio.testing.wait_all_tasks_blocked()
        places = waits()
        nursery.cancel_scope.cancel()
    place = next(place for place in places if "parked_here" in place)
    assert places[place] == 3 and place.startswith("sleep_forever <- parked_here (test_scale_bench.py:")
