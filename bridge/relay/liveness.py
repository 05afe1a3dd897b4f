"""When a StratumRM peer counts as silent, on both sides of the control channel.

A peer is silent ``dead_after`` seconds after its last word, plus the time this
process's own loop ran late since then: a timer meant for ``due`` that runs at
``now`` had no turn to read the peer's bytes in between (the process was busy or
descheduled), so that time is not the peer's silence. The excuse is capped at
``dead_after``, so a loop that is always late still finds a dead peer within twice
``dead_after``.
"""

from __future__ import annotations


class PeerSilence:
    """The silence deadline of one peer: its last word, ``dead_after`` and this side's lateness."""

    __slots__ = ("_excused", "_excused_for", "dead_after", "last_heard")

    def __init__(self, dead_after: float, now: float = 0.0) -> None:
        self.dead_after = dead_after
        self.last_heard = now
        self._excused = 0.0  # seconds this process's loop was late since _excused_for
        self._excused_for = now  # the last_heard they count for

    def heard(self, now: float) -> None:
        """The peer said something (a line, a datagram, bytes waiting in the kernel)."""
        self.last_heard = max(self.last_heard, now)

    def deadline(self) -> float:
        """When the peer counts as silent unless something is heard from it."""
        excused = self._excused if self._excused_for == self.last_heard else 0.0
        return self.last_heard + self.dead_after + excused

    def timer_ran(self, due: float, now: float) -> None:
        """The timer meant for ``due`` ran at ``now``: the lateness since the peer's last word is excused."""
        if self._excused_for != self.last_heard:
            self._excused_for = self.last_heard
            self._excused = 0.0
        late = now - max(due, self.last_heard)
        if late > 0:
            self._excused = min(self._excused + late, self.dead_after)

    def silent(self, now: float) -> bool:
        return now >= self.deadline()
