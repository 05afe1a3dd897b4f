"""The anti-replay sliding window."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.wire.replay import Rejection, ReplayWindow


def test_fresh_window_accepts_zero_and_anything() -> None:
    window = ReplayWindow(64)
    assert window.highest == -1
    assert window.check(0) and window.check(10**12)


def test_replayed_packet_number_is_refused() -> None:
    window = ReplayWindow(64)
    window.commit(5)
    assert window.rejection(5) is Rejection.REPLAYED
    assert not window.check(5)


def test_reordered_within_window_is_accepted_once() -> None:
    window = ReplayWindow(64)
    for pn in (0, 3, 1, 2):
        assert window.check(pn)
        window.commit(pn)
    assert window.highest == 3
    for pn in range(4):
        assert window.rejection(pn) is Rejection.REPLAYED


def test_too_old_is_refused_at_exactly_window_size() -> None:
    window = ReplayWindow(64)
    window.commit(100)
    assert window.check(100 - 63)  # still tracked, never seen
    assert window.rejection(100 - 64) is Rejection.TOO_OLD
    assert window.rejection(0) is Rejection.TOO_OLD


def test_check_changes_nothing() -> None:
    window = ReplayWindow(64)
    for _ in range(3):
        assert window.check(7)
    assert window.highest == -1


def test_huge_jump_clears_the_bitmap_cheaply() -> None:
    window = ReplayWindow(1024)
    window.commit(1)
    window.commit(2**48 - 1)
    assert window.highest == 2**48 - 1
    assert window.rejection(1) is Rejection.TOO_OLD
    assert window.check(2**48 - 2)


def test_commit_of_a_refused_number_is_a_local_bug() -> None:
    window = ReplayWindow(64)
    window.commit(200)
    with pytest.raises(ValueError):
        window.commit(200)
    with pytest.raises(ValueError):
        window.commit(1)


def test_window_must_be_reasonable() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(8)


@given(st.lists(st.integers(0, 3000), max_size=300), st.sampled_from([32, 64, 1024]))
def test_window_matches_a_set_model(pns: list[int], size: int) -> None:
    """Against a naive model: seen set plus highest."""
    window = ReplayWindow(size)
    seen: set[int] = set()
    highest = -1
    for pn in pns:
        if pn in seen and pn > highest - size:
            expected: Rejection | None = Rejection.REPLAYED
        elif pn <= highest - size:
            expected = Rejection.TOO_OLD
        else:
            expected = None
        assert window.rejection(pn) is expected
        if expected is None:
            window.commit(pn)
            seen.add(pn)
            highest = max(highest, pn)
    assert window.highest == highest
