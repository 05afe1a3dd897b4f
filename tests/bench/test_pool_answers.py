"""The benchmark pool stamps when it answers each share, so the way back is timed from there.

``answer -> rig`` (issue 11 item 3: the verdict at the rig within 0.5 ms of the pool's
answer) starts when the pool hands its verdict to the connection's stream, the same
point on every path, after the pool's own work on the share.
"""

from __future__ import annotations

import json

from bridge.bench.roles import TimestampingPool
from bridge.testing.pool_core import PoolConfig

NOW = 1_750_000_000.0


def _line(request_id: int, method: str, params: list) -> bytes:
    return json.dumps({"id": request_id, "method": method, "params": params}).encode() + b"\n"


def test_a_verdict_is_stamped_when_the_pool_hands_it_to_its_stream() -> None:
    pool = TimestampingPool(PoolConfig(difficulty=1e-10, seed=7, max_merkle_branches=0))
    core = pool.core
    connection = core.connection_made("192.0.2.1:4000", NOW)
    core.receive_data(connection, _line(1, "mining.subscribe", ["m/1"]), NOW)
    lines = [json.loads(line) for line in core.data_to_send(connection).splitlines()]
    notify = next(line["params"] for line in lines if line.get("method") == "mining.notify")
    core.receive_data(connection, _line(2, "mining.authorize", ["w1", "x"]), NOW)
    core.data_to_send(connection)

    pool.receipts, pool.answers = {}, {}  # the "record" command
    share = ["w1", notify[0], "00" * 8, notify[7], "0000002a"]
    core.receive_data(connection, _line(3, "mining.submit", share), NOW)
    assert set(pool.receipts) == {0x2A}
    assert pool.answers == {}  # judged, not yet handed to the stream
    assert json.loads(core.data_to_send(connection)) == {"id": 3, "result": True, "error": None}
    assert set(pool.answers) == {0x2A}
    assert pool.answers[0x2A] >= pool.receipts[0x2A]

    pool.receipts = pool.answers = None  # recording off: nothing stamped
    core.receive_data(connection, _line(4, "mining.submit", [*share[:4], "0000002b"]), NOW)
    core.data_to_send(connection)
    assert pool.answers is None
