"""Admission control for listening ports: which new connection gets a file descriptor.

Theory of operation
===================

A connection is **pending** from the moment it is accepted until it has finished its
handshake (the TLS handshake on the sidecar's control port, the first Stratum request
on a proxy's rig port, the whole request on the status port). Pending connections are
what an unauthenticated flood is made of, so they are what is capped:

- at most ``max_pending`` pending connections on the port, and at most
  ``max_pending_per_source`` from one source address;
- each has a **handshake deadline** (``handshake_timeout`` after it was accepted): the
  driver cancels a connection still pending at its deadline;
- nothing new is admitted while the process has fewer than ``fd_reserve`` free file
  descriptors: the reserve is for what must keep working under a flood (pool
  connections, the status port, whose own reserve is smaller).

When the global cap is reached or descriptors are below the reserve, a newcomer is
not simply refused (that would let a flood from a few addresses lock everyone out
until its deadlines pass): the oldest pending connection of the source holding the
most pending connections is **evicted** to make room (freeing its descriptor),
unless the newcomer's own source holds nearly as many. So a flood only ever competes
with itself, and an honest client from an address of its own gets in.

Each refusal is counted by reason and produces one log line, but a reason that keeps
repeating is logged at most once per ``log_interval`` seconds, with the number of
refusals suppressed since its last line (as nginx and HAProxy do).

:meth:`Admission.rebind` moves a pending connection to another source address, for
a front end (PROXY protocol) that tells the real client address after the accept.

This module is sans-IO: time is an explicit ``now``, free file descriptors an explicit
number; bridge/net/listen.py is the trio driver.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

import msgspec

__all__ = [
    "DEFAULT_FD_RESERVE",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_PENDING_PER_SOURCE",
    "RIG_MAX_PENDING",
    "RIG_MAX_PENDING_PER_SOURCE",
    "Admission",
    "AdmissionLimits",
    "AdmissionStatistics",
    "Admitted",
    "Refusal",
    "Refused",
    "Ticket",
]

DEFAULT_MAX_PENDING: Final = 512
DEFAULT_MAX_PENDING_PER_SOURCE: Final = 32
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_FD_RESERVE: Final = 128
#: The rig port's caps are wider: a farm behind one NAT is one source address, and a
#: reconnect storm of thousands of rigs passes through "pending" within seconds.
RIG_MAX_PENDING: Final = 2048
RIG_MAX_PENDING_PER_SOURCE: Final = 512
DEFAULT_LOG_INTERVAL: Final = 10.0


class AdmissionLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The limits of one listening port (see the module docs)."""

    max_pending: int = DEFAULT_MAX_PENDING
    max_pending_per_source: int = DEFAULT_MAX_PENDING_PER_SOURCE
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    fd_reserve: int = DEFAULT_FD_RESERVE
    log_interval: float = DEFAULT_LOG_INTERVAL

    def __post_init__(self) -> None:
        if self.max_pending < 1 or self.max_pending_per_source < 1:
            raise ValueError("the pending-connection caps must be at least 1")
        if self.handshake_timeout <= 0:
            raise ValueError("the handshake timeout must be positive")
        if self.fd_reserve < 0 or self.log_interval < 0:
            raise ValueError("the file-descriptor reserve and the log interval must not be negative")


class Refusal(StrEnum):
    """Why a connection was refused (or ended) before its handshake."""

    SOURCE_CAP = "source over its pending cap"
    PENDING_CAP = "pending cap reached"
    FDS_LOW = "file descriptors low"
    HANDSHAKE_TIMEOUT = "handshake timeout"
    EVICTED = "evicted for a newcomer"


_ADVICE: Final[dict[Refusal, str]] = {
    Refusal.SOURCE_CAP: "one address holds {per_source} connections that have not finished their handshake "
    "(a flood, or a NAT with many clients: raise --max-pending-per-source)",
    Refusal.PENDING_CAP: "{pending} connections have not finished their handshake, the cap "
    "(--max-pending); a flood from many addresses, or raise the cap",
    Refusal.FDS_LOW: "only {free} file descriptors left, below the reserve of {reserve} kept for pool "
    "connections and the status port; raise LimitNOFILE / ulimit -n or lower the pending caps",
    Refusal.HANDSHAKE_TIMEOUT: "connected but did not finish the handshake within {timeout:g} s "
    "(a port scanner or a flood; a slow honest link needs a longer --handshake-timeout)",
    Refusal.EVICTED: "closed to make room for a newcomer: its address held the most connections "
    "that had not finished their handshake",
}


class Ticket:
    """One admitted connection."""

    __slots__ = ("deadline", "number", "source", "started", "state")

    def __init__(self, number: int, source: str, started: float, deadline: float) -> None:
        self.number = number
        self.source = source
        self.started = started
        self.deadline = deadline
        #: "pending", "established" or "done".
        self.state = "pending"

    @property
    def pending(self) -> bool:
        return self.state == "pending"

    def __repr__(self) -> str:
        return f"<Ticket #{self.number} {self.source} {self.state}>"


class Admitted(msgspec.Struct, frozen=True):
    """Serve the connection; first end ``evict`` (another pending connection) if given."""

    ticket: Ticket
    evict: Ticket | None = None
    #: A rate-limited log line for the eviction, or None.
    log: str | None = None


class Refused(msgspec.Struct, frozen=True):
    """Close the connection at once."""

    reason: Refusal
    #: The log line, or None when this reason was logged less than ``log_interval`` ago.
    log: str | None


class AdmissionStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one port's admission counters."""

    pending: int
    """Connections accepted that have not finished their handshake."""
    pending_sources: int
    """Source addresses holding pending connections."""
    established: int
    """Connections past their handshake, still open."""
    admitted: int
    completed: int
    """Handshakes finished (connections that became established)."""
    abandoned: int
    """Pending connections that ended before their handshake (refused by the handshake, closed by the peer ...)."""
    refused: dict[str, int]
    """Connections refused or ended early by admission, by reason."""
    max_pending: int
    max_pending_per_source: int
    handshake_timeout: float
    fd_reserve: int


class Admission:
    """The admission state of one listening port; see the module docs."""

    def __init__(self, name: str, limits: AdmissionLimits | None = None) -> None:
        self.name = name
        self.limits = limits or AdmissionLimits()
        self._by_source: dict[str, dict[Ticket, None]] = {}
        self._pending = 0
        self._established = 0
        self._numbers = 0
        self._admitted = 0
        self._completed = 0
        self._abandoned = 0
        self._refused: dict[Refusal, int] = dict.fromkeys(Refusal, 0)
        self._last_logged: dict[Refusal, float] = {}
        self._suppressed: dict[Refusal, int] = dict.fromkeys(Refusal, 0)

    @property
    def pending(self) -> int:
        return self._pending

    def pending_from(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    # ------------------------------------------------------------------ decisions

    def offer(self, source: str, now: float, free_fds: int | None = None) -> Admitted | Refused:
        """A connection from ``source`` was accepted at ``now``: admit it or refuse it.

        ``free_fds`` is how many file descriptors the process has left (None: unknown).
        """
        limits = self.limits
        mine = len(self._by_source.get(source, ()))
        if mine >= limits.max_pending_per_source:
            return self._refuse(Refusal.SOURCE_CAP, source, now)
        full: Refusal | None = None
        if free_fds is not None and free_fds < limits.fd_reserve:
            full = Refusal.FDS_LOW
        elif self._pending >= limits.max_pending:
            full = Refusal.PENDING_CAP
        evict: Ticket | None = None
        log: str | None = None
        if full is not None:
            # Make room by evicting from the source holding the most pending connections
            # (its descriptor is freed too), unless the newcomer's source holds as many.
            heaviest = max(self._by_source, key=lambda s: len(self._by_source[s]), default=None)
            if heaviest is None or len(self._by_source[heaviest]) <= mine + 1:
                return self._refuse(full, source, now, free=free_fds or 0)
            evict = next(iter(self._by_source[heaviest]))
            self._forget_pending(evict)  # its driver sees the state "done" and closes it
            self._abandoned += 1
            self._refused[Refusal.EVICTED] += 1
            log = self._log_line(Refusal.EVICTED, heaviest, now)
        self._numbers += 1
        ticket = Ticket(self._numbers, source, now, now + limits.handshake_timeout)
        self._by_source.setdefault(source, {})[ticket] = None
        self._pending += 1
        self._admitted += 1
        return Admitted(ticket, evict, log)

    def established(self, ticket: Ticket) -> None:
        """``ticket``'s connection finished its handshake: it is no longer pending."""
        if self._forget_pending(ticket):
            ticket.state = "established"
            self._completed += 1
            self._established += 1

    def rebind(self, ticket: Ticket, source: str, now: float) -> Refused | None:
        """The connection's real source is ``source`` (PROXY protocol): count it there.

        Returns a refusal (close the connection) when ``source`` is over its cap; the
        ticket is then released.
        """
        if not ticket.pending or source == ticket.source:
            ticket.source = source
            return None
        self._forget_pending(ticket)
        ticket.source = source
        if len(self._by_source.get(source, ())) >= self.limits.max_pending_per_source:
            ticket.state = "done"
            self._abandoned += 1
            return self._refuse(Refusal.SOURCE_CAP, source, now)
        ticket.state = "pending"
        self._by_source.setdefault(source, {})[ticket] = None
        self._pending += 1
        return None

    def release(self, ticket: Ticket) -> None:
        """``ticket``'s connection ended (whatever the reason; idempotent)."""
        if ticket.state == "established":
            self._established -= 1
        elif self._forget_pending(ticket):
            self._abandoned += 1
        ticket.state = "done"

    def timed_out(self, ticket: Ticket, now: float) -> str | None:
        """The driver ended ``ticket``'s connection at its deadline: count it, maybe log it."""
        if not self._forget_pending(ticket):
            return None
        ticket.state = "done"
        self._abandoned += 1
        self._refused[Refusal.HANDSHAKE_TIMEOUT] += 1
        return self._log_line(Refusal.HANDSHAKE_TIMEOUT, ticket.source, now)

    def _forget_pending(self, ticket: Ticket) -> bool:
        """Take ``ticket`` out of the pending set; False if it was not in it."""
        if ticket.state != "pending":
            return False
        ticket.state = "done"
        tickets = self._by_source.get(ticket.source)
        if tickets is None or ticket not in tickets:
            return False
        del tickets[ticket]
        if not tickets:
            del self._by_source[ticket.source]
        self._pending -= 1
        return True

    # ------------------------------------------------------------------ refusals and logging

    def _refuse(self, reason: Refusal, source: str, now: float, *, free: int = 0) -> Refused:
        self._refused[reason] += 1
        return Refused(reason, self._log_line(reason, source, now, free=free))

    def _log_line(self, reason: Refusal, source: str, now: float, *, free: int = 0) -> str | None:
        last = self._last_logged.get(reason)
        if last is not None and now - last < self.limits.log_interval:
            self._suppressed[reason] += 1
            return None
        self._last_logged[reason] = now
        suppressed, self._suppressed[reason] = self._suppressed[reason], 0
        limits = self.limits
        advice = _ADVICE[reason].format(
            per_source=limits.max_pending_per_source,
            pending=self._pending,
            free=free,
            reserve=limits.fd_reserve,
            timeout=limits.handshake_timeout,
        )
        verb = "ended" if reason in (Refusal.HANDSHAKE_TIMEOUT, Refusal.EVICTED) else "refused"
        line = f"{self.name}: {verb} a connection from {source} ({reason.value}): {advice}"
        if suppressed and last is not None:
            line += f"; {suppressed} more like it in the last {now - last:.0f} s not logged"
        return line

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> AdmissionStatistics:
        limits = self.limits
        return AdmissionStatistics(
            pending=self._pending,
            pending_sources=len(self._by_source),
            established=self._established,
            admitted=self._admitted,
            completed=self._completed,
            abandoned=self._abandoned,
            refused={reason.value: count for reason, count in self._refused.items() if count},
            max_pending=limits.max_pending,
            max_pending_per_source=limits.max_pending_per_source,
            handshake_timeout=limits.handshake_timeout,
            fd_reserve=limits.fd_reserve,
        )
