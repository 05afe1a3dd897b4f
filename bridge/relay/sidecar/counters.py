"""The sidecar session's counters, declared once (see :mod:`bridge.counters`).

A :class:`~bridge.relay.sidecar.session.SidecarSession` keeps one
:class:`SidecarSessionCounters`; its parts (jobs, ledger, verdicts, UDP key epochs) and
its control session add to that same object. The session's statistics snapshot
subclasses it, and so does the sidecar's total over every control connection, which
sums them with :meth:`~bridge.counters.Counters.add`.
"""

from __future__ import annotations

from msgspec import field

from bridge.relay.control_session import ControlCounters

__all__ = ["SidecarSessionCounters"]


class SidecarSessionCounters(ControlCounters, kw_only=True):
    """What happened on one control connection (or, summed, on all of them)."""

    channels_opened: int = 0
    channels_closed: int = 0
    shares_udp: int = 0
    """Share records received in authenticated datagrams."""
    shares_tls: int = 0
    """``mining.submit`` channel requests."""
    shares_forwarded: int = 0
    """Shares submitted to the pool (each distinct share once)."""
    duplicates_from_cache: int = 0
    """Copies answered with the cached verdict of a share already judged."""
    duplicates_joined: int = 0
    """Copies that arrived while the first was still with the pool, answered with its verdict."""
    shares_refused: int = 0
    """Shares answered with an error without reaching the pool (unknown channel, job or worker ...)."""
    authorizations_refused: int = 0
    """``mining.authorize`` requests for an account the certificate does not name (error 24)."""
    requests_refused: int = 0
    """Channel requests not relayed: a method outside the allowlist or malformed params (error 20)."""
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    """Rejected shares by reason (stale, duplicate, low-difficulty ...)."""
    block_candidates: int = 0
    """Distinct shares forwarded that the proxy flagged as block candidates (sent urgently)."""
    verdicts_udp: int = 0
    """Verdicts of UDP shares (VERDICT datagram entries and ``rm.results`` entries)."""
    verdicts_tls: int = 0
    """Channel responses to ``mining.submit`` written."""
    results_lines: int = 0
    """``rm.results`` lines."""
    verdict_datagrams_sent: int = 0
    """VERDICT datagrams (data channel v2)."""
    ack_datagrams_sent: int = 0
    """ACK datagrams: share datagrams no VERDICT acknowledged within max_ack_delay."""
    verdicts_over_budget: int = 0
    """Verdicts sent over TLS because the anti-amplification budget refused their datagram."""
    jobs_announced: int = 0
    """``rm.job`` lines."""
    notify_lines: int = 0
    """``rm.notify`` lines."""
    notify_deliveries: int = 0
    """Channels that received a ``mining.notify`` (one line each without de-duplication)."""
    notify_lines_saved: int = 0
    """Lines job de-duplication saved, net: deliveries minus the ``rm.job`` and ``rm.notify``
    lines that carried them (negative where it cost lines, one channel per job)."""
    datagrams_accepted: int = 0
    """Authenticated datagrams under this session's conn_ids."""
    datagram_drops: dict[str, int] = field(default_factory=dict)
    """Drops of datagrams under this session's conn_ids, by reason."""
    probe_acks_sent: int = 0
    probe_acks_over_budget: int = 0
    bad_tag_rekeys: int = 0
    """Rekeys (new conn_id) because forged datagrams reached the threshold (§6.1)."""
    udp_datagrams_sent: int = 0
    """VERDICT, ACK and probe-acknowledgement datagrams."""
    udp_bytes_received: int = 0
    udp_bytes_sent: int = 0
    pool_bytes_received: int = 0
    pool_bytes_sent: int = 0
