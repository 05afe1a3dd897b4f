"""What a role's memory is made of (``stratumrm bench scale --memory-profile``): tasks, objects, lines."""

from __future__ import annotations

import tracemalloc

import trio

from bridge.bench.memory import census, per_rig
from bridge.bench.roles import RoleLauncher
from bridge.sv1.framing import LineBuffer


class _Held:
    """Something a test keeps alive per "rig"."""


async def test_the_census_charges_tasks_objects_and_allocations_to_what_holds_them() -> None:
    tracemalloc.start(8)
    try:
        before = census()
        held = [_Held() for _ in range(100)]
        buffers = [LineBuffer() for _ in range(100)]
        for buffer in buffers:
            buffer.feed(b"x" * 40)
            buffer.feed(b"y")  # a partial line, joined in LineBuffer.feed: the buffer keeps it
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(trio.sleep_forever)
            await trio.sleep(0)
            after = census()
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert after["tasks"] - before["tasks"] == 100
    grown, size = after["objects"]["_Held"][0] - before["objects"].get("_Held", [0, 0])[0], after["objects"]["_Held"][1]
    assert grown == 100 and size > 0
    framing = {site: size for site, size in after["sites"].items() if site.startswith("sv1/framing.py:")}
    assert framing and sum(framing.values()) >= 100 * 40  # the partial lines, charged to the line that keeps them
    lines = per_rig(before, after, 100)
    assert lines[0].startswith("  tasks: 1.00 per rig")
    assert any(line.endswith("_Held") and " 1.00/rig" in line for line in lines)
    assert any("sv1/framing.py:" in line for line in lines)
    del held, buffers


async def test_every_role_answers_the_memory_command(tmp_path) -> None:
    pool = await RoleLauncher(tmp_path).start("pool", "pool", ["--listener", "sv1"])
    try:
        answer = await pool.request("memory")
    finally:
        await pool.stop()
    assert answer["tasks"] >= 2 and "list" in answer["objects"]
    assert answer["sites"] == {}  # not started under tracemalloc
