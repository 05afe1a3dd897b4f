"""The sidecar's duplicate table: compact keys, and a judged share held as its verdict alone."""

from __future__ import annotations

import tracemalloc
from typing import Any

from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.relay.sidecar.ledger import PLAIN_ACCEPT, Copy, ShareEntry, ShareLedger, share_key
from bridge.sv1.messages import NULL, TRUE, Response

BASE: dict[str, Any] = {
    "ch": 3,
    "job": 7,
    "extranonce2": bytes.fromhex("0000002a"),
    "ntime": 0x6554A2C1,
    "nonce": 0xB2957C02,
    "version_bits": 0xC00000,
}


def test_a_share_key_tells_every_field_apart() -> None:
    key = share_key(**BASE)
    assert key == share_key(**BASE) and isinstance(key, bytes)
    variants: list[dict[str, Any]] = [
        {"ch": 4},
        {"job": 8},
        {"job": "7"},  # a job id with no handle is not the handle of the same digits
        {"extranonce2": bytes.fromhex("0000002b")},
        {"extranonce2": bytes.fromhex("0000002a00")},
        {"ntime": BASE["ntime"] + 1},
        {"nonce": 0},
        {"version_bits": None},
        {"version_bits": 0},
    ]
    keys = {share_key(**{**BASE, **change}) for change in variants}
    assert len(keys) == len(variants) and key not in keys


def test_a_judged_share_is_its_verdict_alone_and_small() -> None:
    ledger = ShareLedger(SidecarSessionCounters(), size=20_000)
    accepted = Response(1, TRUE, NULL)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for nonce in range(10_000):
            entry = ShareEntry(3, share_key(**{**BASE, "nonce": nonce}))
            entry.wait((0, nonce, 0), None)
            ledger.forwarded_share(entry, now=1.0)
            verdict, reason = ledger.judge(entry, accepted)
            assert verdict is PLAIN_ACCEPT and reason is None
        per_share = (tracemalloc.get_traced_memory()[0] - before) / 10_000
    finally:
        tracemalloc.stop()
    assert per_share < 200, per_share  # about 110 B; a tuple key, the entry, its response and lists: about 760 B
    key = share_key(**{**BASE, "nonce": 5})
    assert ledger.find(key) is PLAIN_ACCEPT
    assert ledger.copy(PLAIN_ACCEPT, key, (1, 1, 0), None, urgent=False, now=2.0) is Copy.CACHED


def test_a_share_forgotten_while_with_the_pool_is_not_put_back_by_its_verdict() -> None:
    ledger = ShareLedger(SidecarSessionCounters(), size=2)  # generations of one share
    first = ShareEntry(3, share_key(**BASE))
    ledger.forwarded_share(first, now=1.0)
    for nonce in (1, 2):  # each fills the young generation: the first is forgotten
        ledger.forwarded_share(ShareEntry(3, share_key(**{**BASE, "nonce": nonce})), now=1.0)
    ledger.judge(first, Response(1, TRUE, NULL))
    assert len(ledger) == 2 and ledger.find(first.key) is None


def _forward(ledger: ShareLedger, nonce: int, now: float) -> bytes:
    entry = ShareEntry(3, share_key(**{**BASE, "nonce": nonce}))
    ledger.forwarded_share(entry, now)
    ledger.judge(entry, Response(1, TRUE, NULL))
    assert entry.key is not None
    return entry.key


def test_a_share_is_kept_half_the_horizon_after_it_was_last_seen_and_then_forgotten() -> None:
    ledger = ShareLedger(SidecarSessionCounters(), size=1000, horizon=120.0)
    old = [_forward(ledger, nonce, now=10.0) for nonce in range(5)]
    recent = [_forward(ledger, 100 + nonce, now=100.0) for nonce in range(3)]  # a new generation began at 100
    assert len(ledger) == 8 and ledger.find(old[4]) is PLAIN_ACCEPT
    assert ledger.copy(PLAIN_ACCEPT, old[0], (0, 1, 0), None, urgent=False, now=100.5) is Copy.CACHED  # seen again
    ledger.expire(159.0)
    assert len(ledger) == 8
    ledger.expire(160.0)  # 60 s after the last generation began: the shares of second 10 go
    assert [ledger.find(key) for key in old] == [PLAIN_ACCEPT, None, None, None, None]
    assert all(ledger.find(key) is PLAIN_ACCEPT for key in recent)
    ledger.expire(219.0)
    assert len(ledger) == 4
    ledger.expire(220.0)
    assert len(ledger) == 0


def test_a_busy_table_is_bounded_by_its_size_whatever_the_horizon() -> None:
    ledger = ShareLedger(SidecarSessionCounters(), size=100, horizon=120.0)
    keys = [_forward(ledger, nonce, now=5.0) for nonce in range(1000)]
    assert len(ledger) == 100
    assert all(ledger.find(key) is PLAIN_ACCEPT for key in keys[-50:])  # at least the newer half
