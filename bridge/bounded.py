"""One bounded map for every "remember the last N": a dict that drops its oldest entries.

It sits in the lowest layer (next to :mod:`bridge.errors`), so every package may use it.

Peers are hostile, so whatever a core remembers per job, per request or per share is
bounded. :class:`BoundedMap` is a mapping with a ``capacity``: inserting past it drops
the oldest entries first.

- ``m[key] = value`` behaves as a dict does: a new key becomes the newest entry, an
  existing key keeps its place with the new value (a record updated in place).
- :meth:`~BoundedMap.put` stores ``key`` as the newest entry, moving it if it was
  there (least recently *written* goes first), and returns what it dropped.
- :meth:`~BoundedMap.refresh` makes an existing key the newest (least recently *used*).

Iteration is oldest first. Up to ``SMALL_CAPACITY`` entries live in a plain dict, which
keeps insertion order at about a third of an OrderedDict's size (maps like these are
kept per rig and per job); finding its oldest entry walks past the slots of entries
deleted since the dict last resized, at most about a thousand. Larger maps use an
OrderedDict, whose every operation is O(1).

:class:`RecentKeys` is the same "last N" for a handful of keys kept per rig (a channel's
recent jobs): two lists that never outgrow N, where a dict that has churned keeps its
grown table. Its lookups walk the list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import TypeVar, overload

__all__ = ["SMALL_CAPACITY", "BoundedMap", "RecentKeys"]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


#: Capacities up to this keep their entries in a plain dict (see the module docs).
SMALL_CAPACITY = 1024


class BoundedMap(MutableMapping[K, V]):
    """A mapping of at most ``capacity`` entries, oldest dropped first (see the module docs)."""

    __slots__ = ("_capacity", "_entries")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._entries: dict[K, V] = {} if capacity <= SMALL_CAPACITY else OrderedDict()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __getitem__(self, key: K) -> V:
        return self._entries[key]

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | T, /) -> V | T: ...
    def get(self, key: K, default: object = None, /) -> object:
        return self._entries.get(key, default)

    def __setitem__(self, key: K, value: V) -> None:
        entries = self._entries
        entries[key] = value
        if len(entries) > self._capacity:
            self._drop_excess()

    def __delitem__(self, key: K) -> None:
        del self._entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"BoundedMap(capacity={self._capacity}, {dict(self._entries)!r})"

    def clear(self) -> None:
        self._entries.clear()

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Store ``key`` as the newest entry (moving it if present); return the dropped entries, oldest first."""
        entries = self._entries
        entries.pop(key, None)
        entries[key] = value
        return self._drop_excess() if len(entries) > self._capacity else []

    def refresh(self, key: K) -> None:
        """Make ``key`` the newest entry; ``KeyError`` if it is not there."""
        entries = self._entries
        entries[key] = entries.pop(key)

    def oldest(self) -> tuple[K, V]:
        """The entry that would be dropped next; ``KeyError`` when empty."""
        if not self._entries:
            raise KeyError("oldest(): the map is empty")
        key = next(iter(self._entries))
        return key, self._entries[key]

    def pop_oldest(self) -> tuple[K, V]:
        """Remove and return the oldest entry; ``KeyError`` when empty."""
        if not self._entries:
            raise KeyError("pop_oldest(): the map is empty")
        key = next(iter(self._entries))
        return key, self._entries.pop(key)

    def _drop_excess(self) -> list[tuple[K, V]]:
        entries = self._entries
        dropped: list[tuple[K, V]] = []
        while len(entries) > self._capacity:
            key = next(iter(entries))
            dropped.append((key, entries.pop(key)))
        return dropped


class RecentKeys(MutableMapping[K, V]):
    """The last ``capacity`` keys put (a few, kept per rig: a channel's jobs), with their
    values, in a list of keys and a list of values (none while every value is None):
    under half a dict's size once it has churned (a dict's table does not shrink).
    Lookups walk the list, so keep ``capacity`` small.

    :meth:`put` stores ``key`` as the newest (moving it if it was there), dropping the
    oldest past ``capacity``; ``m[key] = value`` does the same. Iteration is oldest first.
    """

    __slots__ = ("_capacity", "_keys", "_values")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("RecentKeys capacity must be at least 1")
        self._capacity = capacity
        self._keys: list[K] = []
        self._values: list[V] | None = None

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Store ``key`` as the newest; return the entry dropped past ``capacity`` (or none)."""
        keys = self._keys
        values = self._values
        if values is None and value is not None:
            values = self._values = [None] * len(keys)  # type: ignore[list-item]
        dropped: list[tuple[K, V]] = []
        try:
            index = keys.index(key)
        except ValueError:
            if len(keys) >= self._capacity:  # drop before adding: the lists never outgrow capacity
                dropped.append((keys.pop(0), None if values is None else values.pop(0)))  # type: ignore[arg-type]
        else:
            del keys[index]
            if values is not None:
                del values[index]
        keys.append(key)
        if values is not None:
            values.append(value)
        return dropped

    def entries(self) -> list[tuple[K, V]]:
        """Every (key, value), oldest first."""
        if self._values is None:
            return [(key, None) for key in self._keys]  # type: ignore[misc]
        return list(zip(self._keys, self._values, strict=True))

    def clear(self) -> None:
        self._keys = []
        self._values = None

    def __setitem__(self, key: K, value: V) -> None:
        self.put(key, value)

    def __getitem__(self, key: K) -> V:
        try:
            index = self._keys.index(key)
        except ValueError:
            raise KeyError(key) from None
        return None if self._values is None else self._values[index]  # type: ignore[return-value]

    def __delitem__(self, key: K) -> None:
        try:
            index = self._keys.index(key)
        except ValueError:
            raise KeyError(key) from None
        del self._keys[index]
        if self._values is not None:
            del self._values[index]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"RecentKeys(capacity={self._capacity}, {dict(self.entries())!r})"
