"""Round-trip time estimation and the retransmission timeout (RFC 6298), tuned for shares.

Theory of operation
===================

RFC 6298 keeps a smoothed RTT and its mean deviation::

    first sample R:     SRTT = R;  RTTVAR = R / 2
    later samples R:    RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|
                        SRTT   = 7/8 SRTT   + 1/8 R        (RTTVAR first, with the old SRTT)
    RTO = clamp(SRTT + max(G, 4 RTTVAR), min_rto, max_rto)

``G`` is the clock granularity. Before any sample the RTO is ``initial_rto``. Each
expiry of the timer doubles the RTO (exponential backoff, capped at ``max_rto``)
until a new sample arrives.

The RFC's bounds (min 1 s, initial 1 s) were chosen for TCP on the 1990s Internet.
Shares are small, idempotent (the sidecar caches verdicts) and time-critical, so
the defaults here are: min 20 ms (loopback-ish LANs still see scheduler jitter),
initial 200 ms, max 2 s. A spurious retransmission costs one ~51-byte datagram.

Karn's rule: a sample is taken only when it is unambiguous which transmission the
answer belongs to. On the data channel every (re)transmission gets a fresh packet
number, so a UDP ACK of a packet number always gives an unambiguous sample; a
*verdict* refers to a share, which may have been sent several times, so a verdict
for a retransmitted share gives no sample (:meth:`RttEstimator.on_answer` with
``transmissions > 1``). An ACK may also report how long the peer held it
(``ack_delay``); as in QUIC, that delay is subtracted only when doing so does not
take the sample below the smallest RTT seen.

Sans-IO: every time is a ``float`` in seconds passed in by the caller.
"""

from __future__ import annotations

import math
from typing import Final

import msgspec

__all__ = [
    "DEFAULT_INITIAL_RTO",
    "DEFAULT_MAX_RTO",
    "DEFAULT_MIN_RTO",
    "RttEstimator",
    "RttStatistics",
    "karn_allows_sample",
]

DEFAULT_MIN_RTO: Final = 0.020
DEFAULT_MAX_RTO: Final = 2.0
DEFAULT_INITIAL_RTO: Final = 0.200
DEFAULT_GRANULARITY: Final = 0.001
_ALPHA: Final = 1 / 8
_BETA: Final = 1 / 4
_K: Final = 4


def karn_allows_sample(transmissions: int) -> bool:
    """Karn's rule: only an answer to something sent exactly once measures the RTT."""
    return transmissions == 1


class RttStatistics(msgspec.Struct, frozen=True):
    """A snapshot of an :class:`RttEstimator` (seconds; None before the first sample)."""

    srtt: float | None
    rttvar: float | None
    min_rtt: float | None
    latest_rtt: float | None
    rto: float
    samples: int
    backoffs: int


class RttEstimator:
    """SRTT/RTTVAR/RTO per RFC 6298 with exponential backoff and Karn's rule."""

    __slots__ = (
        "_backoff",
        "_backoff_due",
        "_base_rto",
        "_granularity",
        "_latest",
        "_max_rto",
        "_min_rto",
        "_min_rtt",
        "_rttvar",
        "_samples",
        "_srtt",
        "_total_backoffs",
    )

    def __init__(
        self,
        *,
        min_rto: float = DEFAULT_MIN_RTO,
        max_rto: float = DEFAULT_MAX_RTO,
        initial_rto: float = DEFAULT_INITIAL_RTO,
        granularity: float = DEFAULT_GRANULARITY,
    ) -> None:
        if not 0 < min_rto <= max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        if granularity < 0:
            raise ValueError("granularity must not be negative")
        self._min_rto = min_rto
        self._max_rto = max_rto
        self._granularity = granularity
        self._base_rto = min(max(initial_rto, min_rto), max_rto)
        self._srtt: float | None = None
        self._rttvar: float | None = None
        self._min_rtt: float | None = None
        self._latest: float | None = None
        self._backoff = 0
        self._backoff_due = -math.inf  # no second back-off before then (see on_timeout)
        self._samples = 0
        self._total_backoffs = 0

    @property
    def srtt(self) -> float | None:
        """Smoothed RTT, or None before the first sample."""
        return self._srtt

    @property
    def rttvar(self) -> float | None:
        """RTT mean deviation, or None before the first sample."""
        return self._rttvar

    @property
    def min_rtt(self) -> float | None:
        """The smallest raw sample seen."""
        return self._min_rtt

    @property
    def max_rto(self) -> float:
        """The cap of the RTO, backoff included."""
        return self._max_rto

    @property
    def rto(self) -> float:
        """The retransmission timeout to arm now, backoff included."""
        return min(self._base_rto * (1 << self._backoff), self._max_rto)

    def observe(self, rtt: float, ack_delay: float = 0.0) -> None:
        """Feed one unambiguous RTT sample (seconds) and reset the backoff.

        ``ack_delay`` is the time the peer reports it held the acknowledgement.
        Negative or zero samples (clock weirdness) are ignored.
        """
        if rtt <= 0:
            return
        self._latest = rtt
        if self._min_rtt is None or rtt < self._min_rtt:
            self._min_rtt = rtt
        adjusted = rtt
        if ack_delay > 0 and rtt - ack_delay >= self._min_rtt:
            adjusted = rtt - ack_delay
        if self._srtt is None or self._rttvar is None:
            self._srtt = adjusted
            self._rttvar = adjusted / 2
        else:
            self._rttvar = (1 - _BETA) * self._rttvar + _BETA * abs(self._srtt - adjusted)
            self._srtt = (1 - _ALPHA) * self._srtt + _ALPHA * adjusted
        self._samples += 1
        self._backoff = 0
        self._backoff_due = -math.inf
        raw = self._srtt + max(self._granularity, _K * self._rttvar)
        self._base_rto = min(max(raw, self._min_rto), self._max_rto)

    def on_answer(self, sent_at: float, now: float, *, transmissions: int = 1, ack_delay: float = 0.0) -> bool:
        """An answer arrived at ``now`` for something last sent at ``sent_at``.

        Applies Karn's rule (no sample if it was sent more than once). Returns True
        if a sample was taken.
        """
        if not karn_allows_sample(transmissions):
            return False
        rtt = now - sent_at
        if rtt <= 0:
            return False
        self.observe(rtt, ack_delay)
        return True

    def answered(self) -> None:
        """An answer came for something sent once that gives no sample of its own (a
        verdict that arrived with its own acknowledgement waited nothing after it): the
        path answers again, so the backed-off RTO returns to the estimate, as a sample
        would reset it (RFC 6298 5.7 keeps the back-off only until the path answers)."""
        self._backoff = 0
        self._backoff_due = -math.inf

    def on_timeout(self, now: float) -> None:
        """The retransmission timer expired at ``now``: double the RTO (up to ``max_rto``),
        at most once per (backed-off) RTO. A user with a deadline per item (one per share)
        sees items lost together expire one after another; as with TCP's single timer,
        that is one expiry, not one per item."""
        if now < self._backoff_due:
            return
        if self._base_rto * (1 << self._backoff) < self._max_rto:
            self._backoff += 1
        self._total_backoffs += 1
        self._backoff_due = now + self.rto

    def statistics(self) -> RttStatistics:
        """A frozen snapshot."""
        return RttStatistics(
            srtt=self._srtt,
            rttvar=self._rttvar,
            min_rtt=self._min_rtt,
            latest_rtt=self._latest,
            rto=self.rto,
            samples=self._samples,
            backoffs=self._total_backoffs,
        )
