"""When a StratumRM peer counts as silent, on both sides of the control channel.

A peer is silent ``dead_after`` seconds after its last word, plus the time this
process's own loop ran late since then: a timer meant for ``due`` that runs at
``now`` had no turn to read the peer's bytes in between (the process was busy or
descheduled), so that time is not the peer's silence. The excuse is capped at
``dead_after``, so a loop that is always late still finds a dead peer within twice
``dead_after``.

A peer that is silent but whose transport still acknowledges this side's bytes within
``dead_after`` (its host is up, the path works: :meth:`PeerSilence.reachable`) is busy,
not gone: it gets up to ``busy_limit`` after its last word. A killed process resets
the connection and a dead host or path stops acknowledging, so only a peer process
that is alive but hung waits for ``busy_limit``; a busy but healthy one never fails.
"""

from __future__ import annotations

BUSY_LIMIT_FACTOR = 6
"""A silent peer whose transport still answers gets this many ``dead_after`` after its last word."""


class PeerSilence:
    """The silence deadline of one peer: its last word, ``dead_after`` and this side's lateness."""

    __slots__ = ("_excused", "_excused_for", "_reachable_until", "dead_after", "last_heard")

    def __init__(self, dead_after: float, now: float = 0.0) -> None:
        self.dead_after = dead_after
        self.last_heard = now
        self._excused = 0.0  # seconds this process's loop was late since _excused_for
        self._excused_for = now  # the last_heard they count for
        self._reachable_until = now  # a silent peer whose transport answers: busy until then

    @property
    def busy_limit(self) -> float:
        """Seconds after its last word that a busy peer (:meth:`reachable`) may stay silent."""
        return BUSY_LIMIT_FACTOR * self.dead_after

    def heard(self, now: float) -> None:
        """The peer said something (a line, a datagram, bytes waiting in the kernel)."""
        self.last_heard = max(self.last_heard, now)

    def deadline(self) -> float:
        """When the peer counts as silent unless something is heard from it."""
        excused = self._excused if self._excused_for == self.last_heard else 0.0
        return max(self.last_heard + self.dead_after + excused, self._reachable_until)

    def acknowledged(self, age: float, now: float) -> None:
        """The peer's transport last acknowledged this side's bytes ``age`` seconds ago. Both
        sides send at least a heartbeat a second, so within ``dead_after / 2`` means the path
        and host work (:meth:`reachable`); a blackholed path is still found within one and a
        half ``dead_after``."""
        if age <= self.dead_after / 2:
            self.reachable(now)

    def reachable(self, now: float) -> None:
        """The peer's transport acknowledges this side's bytes (:meth:`acknowledged`): its
        process is busy, not gone. Silence is judged again ``dead_after`` from now, and
        ends at ``busy_limit`` after its last word at the latest."""
        self._reachable_until = max(self._reachable_until, min(now + self.dead_after, self.last_heard + self.busy_limit))

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
