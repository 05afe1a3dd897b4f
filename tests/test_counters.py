"""Counters: declared once, summed by field, snapshotted into a frozen Struct that extends them."""

from __future__ import annotations

import msgspec
import pytest
from msgspec import field

from bridge.counters import Counters
from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.relay.sidecar.session import SidecarSessionStatistics


class _Counts(Counters, kw_only=True):
    shares: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class _Snapshot(_Counts, frozen=True, kw_only=True):  # type: ignore[misc]
    open_now: int = 0


def test_add_sums_every_int_and_every_count_by_reason() -> None:
    total = _Counts(shares=1, by_reason={"stale": 1})
    total.add(_Counts(shares=2, by_reason={"stale": 2, "duplicate": 1}))
    total.add(_Snapshot(shares=4, by_reason={"duplicate": 1}, open_now=7))  # a snapshot adds as its counters
    assert total == _Counts(shares=7, by_reason={"stale": 3, "duplicate": 2})


def test_a_snapshot_is_frozen_and_does_not_share_the_live_dicts() -> None:
    live = _Counts(shares=3, by_reason={"stale": 1})
    snapshot = _Snapshot(**live.values(), open_now=2)
    live.shares += 1
    live.by_reason["stale"] += 1
    assert snapshot.shares == 3 and snapshot.by_reason == {"stale": 1}
    with pytest.raises(AttributeError):
        snapshot.shares = 5  # type: ignore[misc]


def test_the_sidecar_session_snapshot_carries_every_counter_under_its_own_name() -> None:
    counters = SidecarSessionCounters()
    for number, name in enumerate(counters.__struct_fields__, start=1):
        value = getattr(counters, name)
        setattr(counters, name, {"x": number} if isinstance(value, dict) else number)
    snapshot = SidecarSessionStatistics(**counters.values(), channels_open=1, key_epoch=0)
    encoded = msgspec.to_builtins(snapshot)
    assert {name: encoded[name] for name in counters.__struct_fields__} == msgspec.to_builtins(counters)
