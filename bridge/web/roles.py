"""Each role as the management port sees it: readiness, API documents, metrics.

A view reads the role's ``statistics()`` snapshots (and the rig, link and session
snapshots next to them) and never touches the role's internals. :class:`ProxyView`
wraps a :class:`~bridge.net.proxy_service.ProxyService`, :class:`SidecarView` a
:class:`~bridge.net.sidecar.SidecarServer`.

Admission control (pending handshakes, refusals by reason) is read from the role's
``admission`` statistics (:class:`~bridge.net.admission.AdmissionStatistics`: the rig
port's at the proxy, the control port's at the sidecar); the sidecar's refused TLS
handshakes and certificates (``SidecarStatistics.refusals``) count as refusals too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bridge import __version__
from bridge.net.upstreams import PROBE_PEER
from bridge.pki.rotation import CertificateStatus
from bridge.web.api import (
    Certificate,
    FailoverEvent,
    HashrateMeter,
    Rig,
    Session,
    Totals,
    Upstream,
)
from bridge.web.metrics import MAX_WORKER_SERIES, Families

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from bridge.net.proxy_service import ProxyService
    from bridge.net.sidecar import SidecarServer

__all__ = ["ProxyView", "RoleView", "SidecarView"]


class RoleView(ABC):
    """What every role's view offers the management app (a role implements the abstract methods)."""

    role = "role"

    def __init__(self, *, metrics_per_worker: bool = False, max_worker_series: int = MAX_WORKER_SERIES) -> None:
        self.metrics_per_worker = metrics_per_worker
        self.max_worker_series = max_worker_series
        self.meter = HashrateMeter()
        self.draining = False

    # -- each role implements these
    @abstractmethod
    def statistics(self) -> Any: ...

    @abstractmethod
    def warnings(self) -> list[str]: ...

    @abstractmethod
    def not_ready(self) -> str:
        """Why the role cannot take work ("" when it can)."""
        ...

    @abstractmethod
    def rigs(self) -> list[Rig]: ...

    @abstractmethod
    def upstreams(self) -> list[Upstream]: ...

    @abstractmethod
    def sessions(self) -> list[Session]: ...

    @abstractmethod
    def certificates(self) -> list[Certificate]: ...

    @abstractmethod
    def totals(self, rigs: list[Rig]) -> Totals: ...

    def failover_history(self) -> list[FailoverEvent]:
        return []

    @abstractmethod
    def role_families(self, families: Families, rigs: list[Rig]) -> None: ...

    @abstractmethod
    def sample(self, now: float) -> None:
        """Feed the hashrate meter (called about once a second)."""
        ...

    # -- shared
    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: the role is shutting down"
        reason = self.not_ready()
        return not reason, reason

    def metric_families(self) -> Iterator[Metric]:
        families = Families()
        ready, _reason = self.readiness()
        families.gauge("info", "The role and version of this process.", 1, role=self.role, version=__version__)
        families.gauge("ready", "1 when the role can take work (what /readyz answers).", int(ready))
        families.gauge("draining", "1 while the role drains before shutting down.", int(self.draining))
        rigs = self.rigs()
        self.role_families(families, rigs)
        families.gauge(
            "hashrate_hashes_per_second",
            "Hashrate estimated from the difficulty of accepted shares over the last minute.",
            sum(rig.hashrate for rig in rigs),
        )
        for certificate in self.certificates():
            status = certificate.certificate
            labels = {"use": certificate.use, "name": status.name, "serial": status.serial}
            families.gauge(
                "certificate_expiry_timestamp_seconds",
                "notAfter of each certificate the role presents, trusts or sees, as a Unix time.",
                status.not_after.timestamp(),
                **labels,
            )
            families.gauge("certificate_days_left", "Days until each certificate expires.", status.days_left, **labels)
        if self.metrics_per_worker:
            self._worker_families(families, rigs)
        return iter(families)

    def _worker_families(self, families: Families, rigs: list[Rig]) -> None:
        workers: dict[str, list[float]] = {}
        for rig in rigs:
            for worker in rig.workers[:1] or ["(none)"]:
                values = workers.setdefault(worker, [0, 0, 0, 0.0])
                values[0] += rig.accepted
                values[1] += rig.rejected
                values[2] += rig.stale
                values[3] += rig.hashrate
        ranked = sorted(workers.items(), key=lambda item: (-item[1][0], item[0]))
        kept = ranked[: self.max_worker_series]
        families.gauge(
            "worker_series_dropped",
            "Workers left out of the per-worker series (over --metrics-per-worker's cap).",
            len(ranked) - len(kept),
        )
        for worker, (accepted, rejected, stale, hashrate) in kept:
            families.counter("worker_shares_accepted", "Accepted shares per worker (live rigs).", accepted, worker=worker)
            families.counter("worker_shares_rejected", "Rejected shares per worker (live rigs).", rejected, worker=worker)
            families.counter("worker_shares_stale", "Stale shares per worker (live rigs).", stale, worker=worker)
            families.gauge("worker_hashrate_hashes_per_second", "Estimated hashrate per worker.", hashrate, worker=worker)


def _admission(statistics: Any) -> tuple[dict[str, int], int | None]:
    """Refusals by reason and pending connections from the role's admission statistics."""
    admission = statistics.admission
    if admission is None:
        return {}, None
    return dict(admission.refused), admission.pending


def _stale(by_reason: dict[str, int]) -> int:
    return by_reason.get("stale", 0)


# --------------------------------------------------------------------------- the proxy


class ProxyView(RoleView):
    role = "proxy"

    def __init__(self, service: ProxyService, **options: Any) -> None:
        super().__init__(**options)
        self.service = service
        self.proxy = service.proxy

    def statistics(self) -> Any:
        return self.service.statistics()

    def warnings(self) -> list[str]:
        return self.service.warnings()

    def not_ready(self) -> str:
        failover = self.proxy.statistics().failover
        if failover is not None and failover.upstreams and all(u.state == "down" for u in failover.upstreams):
            reasons = "; ".join(f"{u.name}: {u.reason}" for u in failover.upstreams)
            return f"no usable upstream ({reasons})"
        return ""

    def sample(self, now: float) -> None:
        snapshots = self.proxy.rigs()
        for rig in snapshots:
            self.meter.observe(rig.id, rig.shares.accepted_difficulty, now)
        self.meter.retain(rig.id for rig in snapshots)

    def rigs(self) -> list[Rig]:
        found = []
        for rig in self.proxy.rigs():
            shares = rig.shares
            found.append(
                Rig(
                    id=str(rig.id),
                    peer=rig.peer,
                    workers=rig.workers,
                    upstream=rig.upstream,
                    difficulty=shares.difficulty,
                    submitted=shares.submitted,
                    accepted=shares.accepted,
                    rejected=shares.rejected,
                    stale=shares.stale_local + _stale(shares.rejected_by_reason),
                    accepted_difficulty=shares.accepted_difficulty,
                    hashrate=self.meter.rate(rig.id),
                    connected_at=rig.connected_at,
                )
            )
        return found

    def _active(self, failover: Any) -> str | None:
        if failover is None or not failover.upstreams:
            return None
        busiest = max(failover.upstreams, key=lambda u: u.rigs)
        if busiest.rigs:
            return busiest.name
        usable = [u for u in failover.upstreams if u.state != "down"]
        return min(usable, key=lambda u: u.priority).name if usable else None

    def upstreams(self) -> list[Upstream]:
        failover = self.proxy.statistics().failover
        links = {link.upstream: link for link in self.proxy.links()}
        active = self._active(failover)
        found = []
        for status in failover.upstreams if failover is not None else []:
            link = links.get(status.name)
            connection = link.connection if link is not None else None
            found.append(
                Upstream(
                    name=status.name,
                    state=status.state,
                    active=status.name == active,
                    reason=status.reason,
                    priority=status.priority,
                    weight=status.weight,
                    rigs=status.rigs,
                    in_hold_down=status.in_hold_down,
                    healthy_for=status.healthy_for,
                    udp=None if link is None else bool(connection and connection.udp_up),
                    srtt_ms=connection.srtt_ms if connection else None,
                    rto_ms=connection.rto_ms if connection else None,
                    retransmissions_udp=connection.retransmissions_udp if connection else None,
                    retransmissions_tls=connection.retransmissions_tls if connection else None,
                    tls_fallbacks=connection.udp_fallbacks if connection else None,
                    datagrams_sent=connection.datagrams_sent if connection else None,
                )
            )
        return found

    def sessions(self) -> list[Session]:
        tls = self.service.statistics().tls
        name = tls.certificate.name if tls is not None and tls.certificate is not None else None
        found = []
        for link in self.proxy.links():
            connection = link.connection
            if connection is None:
                continue
            found.append(
                Session(
                    peer=link.upstream,
                    certificate=name,
                    accounts=[],
                    channels=connection.channels,
                    accepted=None,
                    rejected=None,
                    shares_udp=connection.shares_udp,
                    shares_tls=connection.shares_tls,
                    datagrams=connection.datagrams_sent,
                    datagram_drops={},
                )
            )
        return found

    def certificates(self) -> list[Certificate]:
        tls = self.service.statistics().tls
        if tls is None or tls.certificate is None:
            return []
        return [Certificate(use="this proxy", certificate=tls.certificate)]

    def failover_history(self) -> list[FailoverEvent]:
        return [FailoverEvent(at=e.at, kind=e.kind, message=e.message) for e in self.proxy.failover_history]

    def totals(self, rigs: list[Rig]) -> Totals:
        stats = self.proxy.statistics()
        connections = [link.connection for link in self.proxy.links() if link.connection is not None]
        linked = bool(connections)
        shares_udp = sum(c.shares_udp for c in connections)
        retx_udp = sum(c.retransmissions_udp for c in connections)
        srtts = [c.srtt_ms for c in connections if c.srtt_ms is not None]
        failover = stats.failover
        refusals, pending = _admission(stats)
        return Totals(
            rigs=stats.connections_active,
            hashrate=sum(rig.hashrate for rig in rigs),
            submitted=stats.submitted,
            accepted=stats.accepted,
            rejected=stats.rejected,
            stale=stats.stale_local + _stale(stats.rejected_by_reason),
            rejected_by_reason=stats.rejected_by_reason,
            block_candidates=sum(c.block_candidates for c in connections) if linked else None,
            datagrams_sent=sum(c.datagrams_sent for c in connections) if linked else None,
            datagrams_received=sum(c.datagrams_received for c in connections) if linked else None,
            datagrams_dropped=sum(sum(c.datagram_drops.values()) for c in connections) if linked else None,
            udp_loss=(retx_udp / shares_udp if shares_udp else 0.0) if linked else None,
            retransmissions=sum(c.retransmissions_udp + c.retransmissions_tls for c in connections) if linked else None,
            tls_fallbacks=sum(c.udp_fallbacks for c in connections) if linked else None,
            srtt_ms=min(srtts) if srtts else None,
            sessions=sum(1 for c in connections if c.ready),
            channels=sum(c.channels for c in connections),
            handshakes_pending=pending,
            admission_refusals=refusals,
            failovers=sum(failover.switches.values()) if failover is not None else None,
            active_upstream=self._active(failover),
        )

    def role_families(self, families: Families, rigs: list[Rig]) -> None:
        stats = self.proxy.statistics()
        families.gauge("rigs_connected", "Rig connections open now.", stats.connections_active)
        families.counter("rig_connections", "Rig connections accepted.", stats.connections_accepted)
        families.counters_by("rig_disconnections", "Rig connections closed, by reason.", "reason", stats.closed_by_reason)
        families.counter("shares_submitted", "Shares rigs submitted.", stats.submitted)
        families.counter("shares_accepted", "Shares the pool accepted.", stats.accepted)
        families.counters_by("shares_rejected", "Shares rejected, by reason.", "reason", stats.rejected_by_reason)
        families.counter(
            "shares_stale",
            "Stale shares: rejected as stale by the pool, or answered by the proxy after their upstream went.",
            stats.stale_local + _stale(stats.rejected_by_reason),
        )
        families.counter("shares_unconfirmed", "Shares without a verdict (timed out, upstream lost).", stats.unconfirmed)
        families.counter("shares_accepted_difficulty", "Sum of the difficulty of accepted shares.", stats.accepted_difficulty)
        families.counter("rig_switches", "Rigs moved to another upstream without reconnecting.", stats.switches)
        failover = stats.failover
        if failover is not None:
            families.counters_by("failovers", "Rig moves by kind (failover, failback, rebalance).", "kind", failover.switches)
            families.counters_by("failover_detections", "Upstreams found down, by reason.", "reason", failover.detections)
            active = self._active(failover)
            for upstream in failover.upstreams:
                families.gauge(
                    "upstream_up", "1 when the upstream is usable.", int(upstream.state == "up"), upstream=upstream.name
                )
                families.gauge(
                    "upstream_active", "1 for the upstream taking the rigs.", int(upstream.name == active), upstream=upstream.name
                )
                families.gauge("upstream_rigs", "Rigs on each upstream.", upstream.rigs, upstream=upstream.name)
        families.declare_counter("block_candidates", "Shares that met the network target (sent urgently).", "upstream")
        families.declare_counter("datagrams_sent", "UDP datagrams sent to sidecars.", "upstream")
        families.declare_counter("datagrams_received", "UDP datagrams received from sidecars.", "upstream")
        families.declare_counter(
            "datagrams_dropped", "UDP datagrams from sidecars dropped, by reason (PROTOCOL.md 6).", "upstream", "reason"
        )
        families.declare_counter("retransmissions", "Shares sent again, by path (udp, tls).", "upstream", "path")
        families.declare_counter("tls_fallbacks", "Times UDP failed and shares moved to the TLS channel.", "upstream")
        families.declare_gauge("rtt_seconds", "Smoothed round-trip time to each sidecar.", "upstream")
        families.declare_gauge("rto_seconds", "Retransmission timeout to each sidecar.", "upstream")
        sessions = channels = 0
        for link in self.proxy.links():
            connection = link.connection
            if connection is None:
                continue
            sessions += connection.ready
            channels += connection.channels
            name = link.upstream
            families.counter("block_candidates", "", connection.block_candidates, upstream=name)
            families.counter("datagrams_sent", "", connection.datagrams_sent, upstream=name)
            families.counter("datagrams_received", "", connection.datagrams_received, upstream=name)
            for reason, count in sorted(connection.datagram_drops.items()):
                families.counter("datagrams_dropped", "", count, upstream=name, reason=reason)
            families.counter("retransmissions", "", connection.retransmissions_udp, upstream=name, path="udp")
            families.counter("retransmissions", "", connection.retransmissions_tls, upstream=name, path="tls")
            families.counter("tls_fallbacks", "", connection.udp_fallbacks, upstream=name)
            if connection.srtt_ms is not None:
                families.gauge("rtt_seconds", "", connection.srtt_ms / 1000, upstream=name)
            families.gauge("rto_seconds", "", connection.rto_ms / 1000, upstream=name)
        families.gauge("sessions_active", "StratumRM control connections to sidecars, up now.", sessions)
        families.gauge("channels_open", "Rig channels over StratumRM connections.", channels)
        tls = self.service.statistics().tls
        if tls is not None:
            families.counter("tls_handshakes", "TLS handshakes with sidecars, by kind.", tls.handshakes_full, kind="full")
            families.counter("tls_handshakes", "", tls.handshakes_resumed, kind="resumed")
        refusals, pending = _admission(stats)
        families.counters_by("admission_refusals", "Connections refused by admission control, by reason.", "reason", refusals)
        if pending is not None:
            families.gauge("handshakes_pending", "Rig connections before their first Stratum request now.", pending)


# --------------------------------------------------------------------------- the sidecar


class SidecarView(RoleView):
    role = "sidecar"

    def __init__(self, server: SidecarServer, **options: Any) -> None:
        super().__init__(**options)
        self.server = server

    def statistics(self) -> Any:
        return self.server.statistics()

    def warnings(self) -> list[str]:
        return self.server.warnings()

    def not_ready(self) -> str:
        stats = self.server.statistics()
        if not stats.pool_up:
            return f"pool down: {stats.pool_reason or 'not answering'}"
        return ""

    def _rig_channels(self) -> Iterator[tuple[Any, Any]]:
        """(session, channel) for every rig's channel; a proxy's health probe is no rig."""
        for session in self.server.session_statuses():
            for channel in session.channels:
                if channel.peer != PROBE_PEER:
                    yield session, channel

    def sample(self, now: float) -> None:
        keys = []
        for session, channel in self._rig_channels():
            key = (session.peer, channel.ch)
            keys.append(key)
            self.meter.observe(key, channel.accepted_difficulty, now)
        self.meter.retain(keys)

    def rigs(self) -> list[Rig]:
        pool = str(self.server.pool)
        return [
            Rig(
                id=f"{session.certificate}/{channel.ch}",
                peer=f"{session.certificate} {channel.peer}",
                workers=channel.workers,
                upstream=pool,
                difficulty=channel.difficulty,
                submitted=None,
                accepted=channel.accepted,
                rejected=channel.rejected,
                stale=channel.stale,
                accepted_difficulty=channel.accepted_difficulty,
                hashrate=self.meter.rate((session.peer, channel.ch)),
                connected_at=session.connected_at,
            )
            for session, channel in self._rig_channels()
        ]

    def upstreams(self) -> list[Upstream]:
        stats = self.server.statistics()
        return [
            Upstream(
                name=str(self.server.pool),
                state="up" if stats.pool_up else "down",
                active=True,
                reason=None if stats.pool_up else stats.pool_reason,
                rigs=stats.channels_open,
            )
        ]

    def sessions(self) -> list[Session]:
        return [
            Session(
                peer=session.peer,
                certificate=session.certificate,
                accounts=session.accounts,
                channels=session.statistics.channels_open,
                accepted=session.statistics.accepted,
                rejected=session.statistics.rejected,
                shares_udp=session.statistics.shares_udp,
                shares_tls=session.statistics.shares_tls,
                datagrams=session.statistics.datagrams_accepted,
                datagram_drops=session.statistics.datagram_drops,
                connected_at=session.connected_at,
            )
            for session in self.server.session_statuses()
        ]

    def certificates(self) -> list[Certificate]:
        stats = self.server.statistics()
        found: list[Certificate] = []
        if stats.certificate is not None:
            found.append(Certificate(use="this sidecar", certificate=stats.certificate))
        found += [Certificate(use="CA", certificate=ca) for ca in stats.ca_certificates]
        for peer in stats.connected_certificates:
            plain = CertificateStatus(
                role=peer.role,
                name=peer.name,
                serial=peer.serial,
                not_before=peer.not_before,
                not_after=peer.not_after,
                days_left=peer.days_left,
                expiring_soon=peer.expiring_soon,
                expired=peer.expired,
                file=peer.file,
            )
            found.append(Certificate(use="connected proxy", certificate=plain))
        return found

    def _refusals(self, stats: Any) -> tuple[dict[str, int], int | None]:
        refusals: Counter[str] = Counter(stats.refusals)
        extra, pending = _admission(stats)
        refusals.update(extra)
        return dict(refusals), pending

    def totals(self, rigs: list[Rig]) -> Totals:
        stats = self.server.statistics()
        dropped = sum(stats.datagram_drops.values())
        refusals, pending = self._refusals(stats)
        return Totals(
            rigs=len(rigs),
            hashrate=sum(rig.hashrate for rig in rigs),
            submitted=None,
            accepted=stats.accepted,
            rejected=stats.rejected,
            stale=_stale(stats.rejected_by_reason),
            rejected_by_reason=stats.rejected_by_reason,
            block_candidates=stats.block_candidates,
            datagrams_sent=stats.udp_datagrams_sent,
            datagrams_received=stats.datagrams_received,
            datagrams_dropped=dropped,
            udp_loss=dropped / stats.datagrams_received if stats.datagrams_received else 0.0,
            retransmissions=None,
            tls_fallbacks=None,
            srtt_ms=None,
            sessions=stats.sessions_active,
            channels=stats.channels_open,
            handshakes_pending=pending,
            admission_refusals=refusals,
            failovers=None,
            active_upstream=str(self.server.pool),
        )

    def role_families(self, families: Families, rigs: list[Rig]) -> None:
        stats = self.server.statistics()
        families.gauge(
            "rigs_connected", "Rigs connected through the proxies now (their channels; probes not counted).", len(rigs)
        )
        families.counter("channels_opened", "Rig channels opened.", stats.channels_opened)
        families.gauge("channels_open", "Rig channels open now.", stats.channels_open)
        families.gauge("sessions_active", "Proxies' control connections open now.", stats.sessions_active)
        families.counter("sessions", "Proxies' control connections accepted.", stats.sessions_total)
        families.counters_by("session_closes", "Control connections closed, by reason.", "reason", stats.closed_by_reason)
        families.counter("tls_handshakes", "Completed TLS handshakes, by kind.", stats.handshakes_full, kind="full")
        families.counter("tls_handshakes", "", stats.handshakes_resumed, kind="resumed")
        refusals, pending = self._refusals(stats)
        if pending is not None:
            families.gauge("handshakes_pending", "Connections still in their TLS handshake now.", pending)
        families.counters_by("admission_refusals", "Connections refused, by reason.", "reason", refusals)
        families.counter("shares_received", "Share copies received, by path (udp, tls).", stats.shares_udp, path="udp")
        families.counter("shares_received", "", stats.shares_tls, path="tls")
        families.counter("shares_submitted", "Distinct shares submitted to the pool.", stats.shares_forwarded)
        families.counter("shares_accepted", "Shares the pool accepted.", stats.accepted)
        families.counters_by("shares_rejected", "Shares rejected, by reason.", "reason", stats.rejected_by_reason)
        families.counter("shares_stale", "Shares the pool rejected as stale.", _stale(stats.rejected_by_reason))
        families.counter("shares_refused", "Shares answered with an error without reaching the pool.", stats.shares_refused)
        families.counter(
            "share_duplicates",
            "Copies answered from another copy's verdict, by kind.",
            stats.duplicates_from_cache,
            kind="cached",
        )
        families.counter("share_duplicates", "", stats.duplicates_joined, kind="joined")
        families.counter("datagrams_received", "UDP datagrams received.", stats.datagrams_received)
        families.counter("datagrams_sent", "UDP datagrams sent (VERDICT, ACK, probe acknowledgements).", stats.udp_datagrams_sent)
        families.counter(
            "block_candidates", "Distinct shares forwarded that proxies flagged as block candidates.", stats.block_candidates
        )
        families.counter("datagrams_accepted", "UDP datagrams authenticated and accepted.", stats.datagrams_accepted)
        families.counters_by("datagrams_dropped", "UDP datagrams dropped, by reason.", "reason", stats.datagram_drops)
        families.gauge("pool_up", "1 when the pool answers.", int(stats.pool_up))
        families.counter("pool_connect_failures", "Pool connections that could not be opened.", stats.pool_connect_failures)
        families.counter(
            "bytes", "Bytes by link and direction.", stats.control_bytes_received, link="control", direction="received"
        )
        families.counter("bytes", "", stats.control_bytes_sent, link="control", direction="sent")
        families.counter("bytes", "", stats.pool_bytes_received, link="pool", direction="received")
        families.counter("bytes", "", stats.pool_bytes_sent, link="pool", direction="sent")
        families.counter("certificate_reloads", "Certificate files reloaded.", stats.certificate_reloads)


def limited(items: Iterable[Rig], limit: int) -> list[Rig]:
    """The ``limit`` busiest rigs (by hashrate, then accepted shares)."""
    return sorted(items, key=lambda rig: (-rig.hashrate, -rig.accepted, rig.id))[:limit]


def now_utc() -> datetime:
    return datetime.now(UTC)
