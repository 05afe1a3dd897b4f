"""The sidecar's duplicate table: compact keys, and a judged share held as its verdict alone."""

from __future__ import annotations

import tracemalloc

from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.relay.sidecar.ledger import PLAIN_ACCEPT, Copy, ShareEntry, ShareLedger, share_key
from bridge.sv1.messages import NULL, TRUE, Response

BASE = {
    "ch": 3,
    "job": 7,
    "extranonce2": bytes.fromhex("0000002a"),
    "ntime": 0x6554A2C1,
    "nonce": 0xB2957C02,
    "version_bits": 0xC00000,
}


def test_a_share_key_tells_every_field_apart() -> None:
    key = share_key(**BASE)  # type: ignore[arg-type]
    assert key == share_key(**BASE) and isinstance(key, bytes)  # type: ignore[arg-type]
    variants = [
        {"ch": 4},
        {"job": 8},
        {"job": "7"},  # a job id with no handle is not the handle of the same digits
        {"extranonce2": bytes.fromhex("0000002b")},
        {"extranonce2": bytes.fromhex("0000002a00")},
        {"ntime": BASE["ntime"] + 1},  # type: ignore[operator]
        {"nonce": 0},
        {"version_bits": None},
        {"version_bits": 0},
    ]
    keys = {share_key(**{**BASE, **change}) for change in variants}  # type: ignore[arg-type]
    assert len(keys) == len(variants) and key not in keys


def test_a_judged_share_is_its_verdict_alone_and_small() -> None:
    ledger = ShareLedger(SidecarSessionCounters(), size=20_000)
    accepted = Response(1, TRUE, NULL)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for nonce in range(10_000):
            entry = ShareEntry(3, share_key(**{**BASE, "nonce": nonce}))  # type: ignore[arg-type]
            entry.wait((0, nonce, 0), None)
            ledger.forwarded_share(entry)
            verdict, reason = ledger.judge(entry, accepted)
            assert verdict is PLAIN_ACCEPT and reason is None
        per_share = (tracemalloc.get_traced_memory()[0] - before) / 10_000
    finally:
        tracemalloc.stop()
    assert per_share < 200, per_share  # about 160 B; a tuple key, the entry, its response and lists: about 760 B
    key = share_key(**{**BASE, "nonce": 5})  # type: ignore[arg-type]
    assert ledger.find(key) is PLAIN_ACCEPT
    assert ledger.copy(PLAIN_ACCEPT, key, (1, 1, 0), None, urgent=False) is Copy.CACHED


def test_a_share_evicted_while_with_the_pool_is_not_put_back_by_its_verdict() -> None:
    ledger = ShareLedger(SidecarSessionCounters(), size=1)
    first = ShareEntry(3, share_key(**BASE))  # type: ignore[arg-type]
    ledger.forwarded_share(first)
    second = ShareEntry(3, share_key(**{**BASE, "nonce": 1}))  # type: ignore[arg-type]
    ledger.forwarded_share(second)  # the table holds one: the first is gone
    ledger.judge(first, Response(1, TRUE, NULL))
    assert len(ledger) == 1 and ledger.find(first.key) is None and ledger.find(second.key) is second
