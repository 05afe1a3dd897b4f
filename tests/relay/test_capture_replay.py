"""Replay real miners talking to a real ckpool through the miner-side relay core.

Each capture (tests/data/captures, recorded from cpuminer 2.5.1, bfgminer 5.5 and
cgminer 4.11 against ckpool) is replayed in order through a
:class:`MinerChannel` whose upstream is a real :class:`ClientSession`:

- every line the miner sent must reach the pool with the same method and params
  (ids are the session's own);
- every line ckpool sent (with the id mapped to the upstream request it answers)
  must reach the miner as the same JSON object, its id the miner's own;
- nothing else reaches the miner, and the subscribe result comes first.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from pathlib import Path

import pytest

from bridge.relay.miner_channel import MinerChannel
from bridge.sv1.client import ClientSession

CAPTURES = Path(__file__).parent.parent / "data" / "captures"

REAL_MINER_CAPTURES = [
    "minerd-ckpool-basic.jsonl",
    "bfgminer-ckpool-basic.jsonl",
    "cgminer-ckpool-nodevices.jsonl",
    "minerd-ckpool-reconnect-2.jsonl",
    "minerd-ckpool-poolkill-2.jsonl",
    "minerd-ckpool-poolkill-3.jsonl",
    "minerd-ckpool-dupshare.jsonl",
    "minerd-ckpool-reconnect-1.jsonl",
]


def load(name: str) -> list[dict]:
    records = [json.loads(line) for line in (CAPTURES / name).read_text().splitlines() if line.strip()]
    return [r for r in records if "line" in r]


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().split("\n") if line]


class Replay:
    def __init__(self) -> None:
        self.channel = MinerChannel()
        self.upstream = ClientSession()
        self.channel.attach_upstream(self.upstream, 0.0)
        self.to_pool: list[dict] = []
        self.to_miner: list[dict] = []
        # miner id (as JSON text) -> upstream ids, in the order the requests went out
        self.upstream_ids: dict[str, deque[int]] = defaultdict(deque)
        self.miner_requests: deque[dict] = deque()

    def drain(self) -> None:
        for sent in lines(self.upstream.data_to_send()):
            self.to_pool.append(sent)
            if "method" in sent:
                # The oldest miner request with this method and params is the one relayed.
                for original in self.miner_requests:
                    if original["method"] == sent["method"] and original.get("params", []) == sent["params"]:
                        self.miner_requests.remove(original)
                        self.upstream_ids[json.dumps(original["id"])].append(sent["id"])
                        break
                else:
                    raise AssertionError(f"relay sent a request the miner never made: {sent}")
        self.to_miner.extend(lines(self.channel.miner.data_to_send()))

    def from_miner(self, line: str) -> None:
        message = json.loads(line)
        if "method" in message and message.get("id") is not None:
            self.miner_requests.append(message)
        self.channel.miner_data(line.encode() + b"\n", 1.0)
        self.drain()

    def from_pool(self, line: str) -> dict:
        message = json.loads(line)
        if "method" not in message and message.get("id") is not None:
            queue = self.upstream_ids[json.dumps(message["id"])]
            assert queue, f"pool answered {message['id']!r}, which the relay never sent upstream"
            message = dict(message, id=queue.popleft())
        self.channel.upstream_events(self.upstream.receive_data(json.dumps(message).encode() + b"\n"), 1.0)
        self.drain()
        return json.loads(line)


@pytest.mark.parametrize("name", REAL_MINER_CAPTURES)
def test_real_miner_capture_relays_transparently(name: str) -> None:
    replay = Replay()
    expected_to_miner: list[dict] = []
    miner_lines: list[dict] = []
    for record in load(name):
        if record.get("swallowed") or (record.get("injected") and record["dir"] == "miner>pool"):
            continue  # the recording relay's own duplicate and ckpool's answer to it
        if record["dir"] == "pool>miner" and "client.reconnect" in record["line"]:
            break  # the proxy answers a pool's reconnect its own way (tested below)
        if record["dir"] == "miner>pool":
            miner_lines.append(json.loads(record["line"]))
            replay.from_miner(record["line"])
        else:
            expected_to_miner.append(replay.from_pool(record["line"]))

    # Every miner request reached the pool with identical method and params.
    relayed = [m for m in replay.to_pool if "method" in m]
    original = [m for m in miner_lines if "method" in m]
    assert sorted(json.dumps([m["method"], m.get("params")]) for m in relayed) == sorted(
        json.dumps([m["method"], m.get("params")]) for m in original
    )
    # The miner got exactly what ckpool sent, ids included, in the same order.
    assert replay.to_miner == expected_to_miner
    assert replay.to_miner[0].get("result") is not None, "subscribe result must come first"
    stats = replay.channel.statistics()
    assert stats.violations == 0
    assert stats.pending == 0 or name == "cgminer-ckpool-nodevices.jsonl"


def test_bfgminer_tls_probe_is_closed_without_an_upstream() -> None:
    records = [json.loads(line) for line in (CAPTURES / "bfgminer-ckpool-tlsprobe.jsonl").read_text().splitlines()]
    raw = next(r for r in records if "hex" in r)
    channel = MinerChannel()
    channel.miner_data(bytes.fromhex(raw["hex"]), 0.0)
    assert channel.closed and "TLS ClientHello" in channel.close_reason
    assert not channel.wants_upstream


def test_pool_reconnect_brings_the_miner_back_to_the_proxy() -> None:
    replay = Replay()
    for record in load("minerd-ckpool-reconnect-1.jsonl"):
        if record["dir"] == "miner>pool":
            replay.from_miner(record["line"])
        elif "client.reconnect" in record["line"] and "127.0.0.1" in record["line"]:
            replay.from_pool(record["line"])
            break
        else:
            replay.from_pool(record["line"])
    last = replay.to_miner[-1]
    assert last["method"] == "client.reconnect" and last["params"] == []
    assert replay.channel.closed and "client.reconnect" in replay.channel.close_reason


def test_ckpool_share_rejects_reach_the_miner_in_ckpool_form() -> None:
    replay = Replay()
    for line in (
        '{"id": 1, "method": "mining.subscribe", "params": ["rejtest/0.1"]}',
        '{"id": 3, "method": "mining.authorize", "params": ["rej.w1", "x"]}',
    ):
        replay.from_miner(line)
    replay.from_pool('{"result":[[["mining.notify","6b05d75a"]],"5ad7056b",8],"id":1,"error":null}')
    replay.from_pool('{"result":true,"error":null,"id":3}')
    replay.from_miner(
        '{"id": 29, "method": "mining.submit", "params": ["rej.w1", "6b05d7570000006d", "0000000000000000", "6b05dafd", "be87b63e"]}'
    )
    replay.from_pool('{"reject-reason":"Stale","result":false,"error":null,"id":29}')
    assert replay.to_miner[-1] == {"reject-reason": "Stale", "result": False, "error": None, "id": 29}
