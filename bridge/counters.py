"""One counters type per core: live counts declared once, a frozen snapshot, sums for free.

It sits in the lowest layer (next to :mod:`bridge.bounded`), so every package may use it.

A core declares its counters once, as a subclass of :class:`Counters` whose fields are
``int`` (or ``dict[str, int]`` for counts by reason) and default to zero. It keeps one
instance, and the parts of the core add to that same instance. Its statistics Struct
subclasses the counters with ``frozen=True`` and adds the gauges (things that are, not
things that happened), so a snapshot is::

    class SessionCounters(Counters, kw_only=True):
        shares: int = 0
        rejected_by_reason: dict[str, int] = {}

    class SessionStatistics(SessionCounters, frozen=True, kw_only=True):
        channels_open: int = 0

    SessionStatistics(**counters.values(), channels_open=len(channels))

A role that outlives its sessions sums them with :meth:`Counters.add` (the finished ones
into one running total, the live ones on top) and never lists the names again.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct

__all__ = ["Counters"]


class Counters(Struct, kw_only=True):
    """Base of a core's live counters: ``int`` and ``dict[str, int]`` fields, all starting at zero."""

    def values(self) -> dict[str, Any]:
        """Every counter by name, the dicts copied: the keyword arguments of a frozen snapshot."""
        return {name: _copied(getattr(self, name)) for name in self.__struct_fields__}

    def add(self, other: Counters) -> None:
        """Add every counter of ``other`` (this type, or a snapshot subclassing it) to this one."""
        for name in self.__struct_fields__:
            mine = getattr(self, name)
            theirs = getattr(other, name)
            if isinstance(mine, dict):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(self, name, mine + theirs)


def _copied(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value
