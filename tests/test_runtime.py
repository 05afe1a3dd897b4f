"""bridge.runtime: Ctrl-C and SIGTERM stop a role cleanly whenever they arrive.

Each case runs a tiny role in a child process (as a command would) that signals
itself between two lines of its own code: the moment an operator's Ctrl-C can land
while a role is busy (closing a connection, say). The role must stop at a checkpoint,
with its cleanup run, exit status 0 and no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

ROOT = Path(__file__).resolve().parents[1]

ROLE = """
import os, signal, sys
import trio
from bridge.runtime import run_role, run_until_interrupted

signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, even if the test runs in the background
open_connections = set()

async def role():
    try:
        open_connections.add("rig1")
        os.kill(os.getpid(), signal.{signal})  # the signal lands here, between two lines of the role
        open_connections.discard("rig1")
        await trio.sleep_forever()
    finally:
        assert not open_connections, "the signal interrupted the role between two lines"

{runner}(role)
print("summary: stopped cleanly", flush=True)
"""


def _run_python(source: str) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """Run ``source`` in a child Python from the repository; the result and its output."""
    result = subprocess.run(
        [sys.executable, "-c", source], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, check=False
    )
    return result, result.stdout.decode()


@pytest.mark.parametrize("runner", ["run_until_interrupted", "run_role"])
@pytest.mark.parametrize("signal", ["SIGINT", "SIGTERM"])
def test_a_signal_in_the_middle_of_the_roles_code_stops_it_at_a_checkpoint(runner: str, signal: str) -> None:
    result, output = _run_python(ROLE.format(runner=runner, signal=signal))
    assert result.returncode == 0, output
    assert "summary: stopped cleanly" in output
    assert "Traceback" not in output, output


GC_ROLE = """
import gc
import trio
from bridge.runtime import GC_THRESHOLDS, {runner}

before = gc.get_freeze_count()
loaded = object()  # alive at start: frozen with the rest

async def role():
    assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()
    assert gc.get_freeze_count() > before
    print("summary: thresholds", gc.get_threshold(), flush=True)

{runner}(role)
"""


@pytest.mark.parametrize("runner", ["run_until_interrupted", "run_role"])
def test_a_role_collects_garbage_with_the_serving_thresholds(runner: str) -> None:
    result, output = _run_python(GC_ROLE.format(runner=runner))
    assert result.returncode == 0 and "summary: thresholds (10000, 20, 100)" in output, output


async def test_a_role_runs_a_full_collection_every_interval(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    import gc

    from bridge.runtime import FULL_COLLECTION_INTERVAL, collect_garbage_periodically

    collected: list[float] = []

    def collect(*_generation: int) -> int:
        collected.append(trio.current_time())
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    with trio.move_on_after(FULL_COLLECTION_INTERVAL * 3.5):
        await collect_garbage_periodically()
    assert collected == [FULL_COLLECTION_INTERVAL * n for n in (1, 2, 3)]
