"""What a role's memory is made of (``stratumrm bench scale --memory-profile``): tasks, objects, lines."""

from __future__ import annotations

import tracemalloc

import trio

from bridge.bench.memory import _allocations, census, per_rig
from bridge.bench.roles import RoleLauncher
from bridge.sv1.framing import LineBuffer


class _Held:
    """Something a test keeps alive per "rig"."""


async def test_the_census_counts_tasks_and_objects_per_rig() -> None:
    before = census()
    held = [_Held() for _ in range(100)]
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(trio.sleep_forever)
        await trio.sleep(0)
        after = census()
        nursery.cancel_scope.cancel()
    assert after["tasks"] - before["tasks"] == 100
    grown = after["objects"]["_Held"][0] - before["objects"].get("_Held", [0, 0])[0]
    assert grown == 100 and after["objects"]["_Held"][1] > 0
    assert after["sites"] == {}  # not tracing
    lines = per_rig(before, after, 100)
    assert lines[0].startswith("  tasks: 1.00 per rig")
    assert any(line.endswith("_Held") and " 1.00/rig" in line for line in lines)
    del held


def test_allocations_are_charged_to_the_bridge_line_that_keeps_them() -> None:
    tracemalloc.start(8)
    try:
        buffers = [LineBuffer() for _ in range(100)]
        for buffer in buffers:
            buffer.feed(b"x" * 40)
            buffer.feed(b"y")  # a partial line, joined in LineBuffer.feed: the buffer keeps it
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    sites, lines = _allocations(snapshot)
    framing = {site: size for site, size in sites.items() if site.startswith("sv1/framing.py:")}
    assert framing and sum(framing.values()) >= 100 * 40  # charged to the line in LineBuffer.feed
    assert any(site.startswith("sv1/framing.py:") for site in lines)
    lines_per_rig = per_rig({**census_like(), "sites": {}, "lines": {}}, {**census_like(), "sites": sites, "lines": lines}, 100)
    assert any("sv1/framing.py:" in line for line in lines_per_rig)
    del buffers


def census_like() -> dict[str, object]:
    return {"tasks": 1, "objects": {}}


async def test_every_role_answers_the_memory_command(tmp_path) -> None:
    pool = await RoleLauncher(tmp_path).start("pool", "pool", ["--listener", "sv1"])
    try:
        answer = await pool.request("memory")
    finally:
        await pool.stop()
    assert answer["tasks"] >= 2 and "list" in answer["objects"]
    assert answer["sites"] == {}  # not started under tracemalloc
