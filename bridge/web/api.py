"""What the management port says, as msgspec Structs: the JSON API and the dashboard feed.

Every document is built from a role's ``statistics()`` snapshots by the role's view
(:mod:`bridge.web.roles`); nothing here reads a socket or a clock. Times are passed in.

The hashrate of a rig is estimated from the difficulty of its accepted shares::

    hashrate = sum(difficulty accepted in the window) * 2**32 / window seconds

:class:`HashrateMeter` keeps, per rig, a few samples of the cumulative accepted
difficulty (one per :meth:`HashrateMeter.observe`, at most one a second) and answers
with the growth over the last :data:`HASHRATE_WINDOW` seconds (or since the first
sample, while the rig is younger than that).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from datetime import datetime

import msgspec

from bridge.pki.rotation import CertificateStatus

__all__ = [
    "HASHRATE_WINDOW",
    "Certificate",
    "DashboardSnapshot",
    "FailoverEvent",
    "HashrateMeter",
    "Health",
    "Rig",
    "Session",
    "Totals",
    "Upstream",
]

HASHRATE_WINDOW = 60.0
"""Seconds of accepted difficulty a hashrate estimate covers."""
_SAMPLE_SPACING = 1.0
_SAMPLES = int(HASHRATE_WINDOW / _SAMPLE_SPACING) + 2


class HashrateMeter:
    """Hashrate per key from a growing sum of accepted difficulty (see the module docs)."""

    def __init__(self, window: float = HASHRATE_WINDOW) -> None:
        self.window = window
        self._samples: dict[Hashable, deque[tuple[float, float]]] = {}

    def observe(self, key: Hashable, accepted_difficulty: float, now: float) -> None:
        """Record ``key``'s cumulative accepted difficulty at ``now`` (one sample a second kept)."""
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=_SAMPLES)
        if samples and now - samples[-1][0] < _SAMPLE_SPACING:
            return
        samples.append((now, accepted_difficulty))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()

    def rate(self, key: Hashable) -> float:
        """Hashes per second over the samples kept; 0 with fewer than two."""
        samples = self._samples.get(key)
        if not samples or len(samples) < 2:
            return 0.0
        start_time, start = samples[0]
        end_time, end = samples[-1]
        return max(0.0, end - start) * 2**32 / (end_time - start_time)

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Forget every key not in ``keys`` (rigs that left)."""
        keep = set(keys)
        for key in [key for key in self._samples if key not in keep]:
            del self._samples[key]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """``/api/v1/health``."""

    role: str
    version: str
    started: datetime
    uptime: float
    ready: bool
    reason: str
    """Why the role is not ready ("" when it is)."""
    draining: bool
    warnings: list[str]


class Rig(msgspec.Struct, frozen=True, kw_only=True):
    """One rig: at the proxy a miner connection, at the sidecar a channel."""

    id: str
    peer: str
    workers: list[str]
    upstream: str | None
    difficulty: float | None
    submitted: int | None
    accepted: int
    rejected: int
    stale: int
    accepted_difficulty: float
    hashrate: float
    """Hashes per second, estimated from the accepted difficulty (see HASHRATE_WINDOW)."""
    connected_at: datetime | None = None


class Upstream(msgspec.Struct, frozen=True, kw_only=True):
    """Where shares go: the proxy's pools and sidecars, the sidecar's pool."""

    name: str
    state: str
    """up, down, starting or unknown."""
    active: bool
    reason: str | None = None
    priority: int | None = None
    weight: float | None = None
    rigs: int | None = None
    in_hold_down: bool = False
    healthy_for: float | None = None
    udp: bool | None = None
    """A StratumRM link with UDP up (None: not a StratumRM link)."""
    srtt_ms: float | None = None
    rto_ms: float | None = None
    retransmissions_udp: int | None = None
    retransmissions_tls: int | None = None
    tls_fallbacks: int | None = None
    datagrams_sent: int | None = None


class Session(msgspec.Struct, frozen=True, kw_only=True):
    """A StratumRM control connection: at the sidecar a proxy, at the proxy a sidecar."""

    peer: str
    certificate: str | None
    accounts: list[str]
    channels: int
    accepted: int | None  # None: not counted per session on this side (the proxy counts per rig)
    rejected: int | None
    shares_udp: int
    shares_tls: int
    datagrams: int
    datagram_drops: dict[str, int]
    connected_at: datetime | None = None


class Certificate(msgspec.Struct, frozen=True, kw_only=True):
    """A certificate the role presents, trusts or sees, with its expiry."""

    use: str
    """What it is to this role: this proxy, this sidecar, CA, connected proxy ..."""
    certificate: CertificateStatus


class FailoverEvent(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime
    kind: str
    message: str


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    rigs: int
    hashrate: float
    submitted: int | None
    accepted: int
    rejected: int
    stale: int
    rejected_by_reason: dict[str, int]
    block_candidates: int | None
    datagrams_sent: int | None
    datagrams_received: int | None
    datagrams_dropped: int | None
    udp_loss: float | None
    """Fraction of UDP datagrams lost or dropped (retransmitted at the proxy, dropped at the sidecar)."""
    retransmissions: int | None
    tls_fallbacks: int | None
    srtt_ms: float | None
    sessions: int
    channels: int
    handshakes_pending: int | None
    admission_refusals: dict[str, int]
    failovers: int | None
    active_upstream: str | None


class DashboardSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What the dashboard's WebSocket pushes every second."""

    health: Health
    totals: Totals
    rigs: list[Rig]
    rigs_shown: int
    """Rigs in ``rigs`` (the busiest first); ``totals.rigs`` counts them all."""
    upstreams: list[Upstream]
    failover_history: list[FailoverEvent]
    sessions: list[Session]
    certificates: list[Certificate]
