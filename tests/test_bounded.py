"""BoundedMap: never more than its capacity, the oldest dropped first, dict semantics otherwise."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.bounded import SMALL_CAPACITY, BoundedMap


def test_inserting_past_the_capacity_drops_the_oldest() -> None:
    m: BoundedMap[str, int] = BoundedMap(2)
    m["a"] = 1
    m["b"] = 2
    m["c"] = 3
    assert list(m.items()) == [("b", 2), ("c", 3)] and "a" not in m and len(m) == 2


def test_assignment_keeps_an_existing_keys_place_and_put_moves_it() -> None:
    m: BoundedMap[str, int] = BoundedMap(3)
    for key, value in (("a", 1), ("b", 2), ("c", 3)):
        m[key] = value
    m["a"] = 10  # updated in place: still the oldest
    assert m.oldest() == ("a", 10)
    assert m.put("a", 11) == []  # written: now the newest
    assert list(m) == ["b", "c", "a"]
    assert m.put("d", 4) == [("b", 2)]


def test_refresh_makes_a_key_the_newest_and_pop_oldest_takes_from_the_front() -> None:
    m: BoundedMap[int, str] = BoundedMap(3)
    for key in (1, 2, 3):
        m[key] = str(key)
    m.refresh(1)
    assert m.pop_oldest() == (2, "2") and list(m) == [3, 1]
    with pytest.raises(KeyError):
        m.refresh(99)
    m.clear()
    with pytest.raises(KeyError):
        m.pop_oldest()
    with pytest.raises(KeyError):
        m.oldest()


def test_a_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BoundedMap(0)


def _apply(m: BoundedMap[int, int], reference: dict[int, int], operation: str, key: int, step: int) -> None:
    """One operation on ``m`` and by hand on ``reference``, a plain dict kept oldest first."""
    if operation == "set":
        m[key] = step
        reference[key] = step
    elif operation == "put":
        m.put(key, step)
        reference.pop(key, None)
        reference[key] = step
    elif operation == "del" and key in reference:
        del m[key]
        del reference[key]
    elif operation == "refresh" and key in reference:
        m.refresh(key)
        reference[key] = reference.pop(key)
    elif operation == "pop" and reference:
        oldest = next(iter(reference))
        assert m.pop_oldest() == (oldest, reference.pop(oldest))
    while len(reference) > m.capacity:
        del reference[next(iter(reference))]


@given(st.integers(1, 8), st.lists(st.tuples(st.sampled_from(["set", "put", "del", "refresh", "pop"]), st.integers(0, 12))))
def test_it_is_the_last_written_keys_of_a_reference_dict(capacity: int, operations: list[tuple[str, int]]) -> None:
    """Against a plain dict kept in the same order by hand: same contents, never over capacity."""
    m: BoundedMap[int, int] = BoundedMap(capacity)
    reference: dict[int, int] = {}
    for step, (operation, key) in enumerate(operations):
        _apply(m, reference, operation, key, step)
        assert list(m.items()) == list(reference.items())
        assert len(m) <= capacity


@given(st.lists(st.tuples(st.sampled_from(["set", "put", "del", "refresh", "pop"]), st.integers(0, 40)), max_size=200))
def test_a_large_map_keeps_the_same_order_as_a_small_one(operations: list[tuple[str, int]]) -> None:
    """Past SMALL_CAPACITY the entries live in an OrderedDict: the behaviour is the same."""
    large: BoundedMap[int, int] = BoundedMap(SMALL_CAPACITY + 1)
    reference: dict[int, int] = {}
    for key in range(SMALL_CAPACITY + 1):  # full from the start: every new key drops the oldest
        _apply(large, reference, "set", -key - 2, key)
    for step, (operation, key) in enumerate(operations):
        _apply(large, reference, operation, key, step)
    assert list(large.items()) == list(reference.items())
    assert large.get(-1) is None and large.get(-1, 5) == 5


def test_recent_keys_keeps_the_last_keys_put_newest_last() -> None:
    from bridge.bounded import RecentKeys

    recent: RecentKeys[str, int] = RecentKeys(3)
    dropped = [recent.put(key, n) for n, key in enumerate("abcd")]
    assert dropped == [[], [], [], [("a", 0)]]  # what went past the capacity, for a caller's bookkeeping
    assert list(recent) == ["b", "c", "d"] and "a" not in recent and recent.get("a") is None
    assert recent.entries() == [("b", 1), ("c", 2), ("d", 3)]
    recent.put("b", 9)  # put again: the newest, with its new value
    recent["e"] = 4
    assert list(recent) == ["d", "b", "e"] and recent["b"] == 9 and len(recent) == 3
    del recent["d"]
    assert list(recent) == ["b", "e"]
    with pytest.raises(KeyError):
        recent["d"]
    with pytest.raises(ValueError):
        RecentKeys(0)
    recent.clear()
    assert len(recent) == 0 and recent.entries() == []
    keys_only: RecentKeys[str, None] = RecentKeys(2)
    keys_only.put("x", None)
    assert keys_only.put("y", None) == [] and keys_only.put("z", None) == [("x", None)] and keys_only["z"] is None


def test_recent_keys_is_smaller_than_a_churned_dict() -> None:
    import tracemalloc

    from bridge.bounded import BoundedMap, RecentKeys

    jobs = [f"{n:x}" for n in range(400)]
    sizes = {}
    for kind in (BoundedMap, RecentKeys):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = []
            for _ in range(200):
                table: BoundedMap[str, None] | RecentKeys[str, None] = kind(8)
                for job in jobs:
                    table.put(job, None)
                kept.append(table)
            sizes[kind.__name__] = (tracemalloc.get_traced_memory()[0] - before) / 200
        finally:
            tracemalloc.stop()
    assert sizes["RecentKeys"] < sizes["BoundedMap"] / 2, sizes
