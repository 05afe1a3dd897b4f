"""The proxy's share delivery over the data channel, sans-IO (PROTOCOL.md C6, §9).

:class:`ShareDelivery` is what the proxy side of StratumRM
(:class:`~bridge.relay.rm_upstream.StratumRMConnection`) does with a share once the
connection has built its record: it chooses the path (UDP, TLS, or both for a block
candidate), batches and seals the records, and sees each share through to its
verdict:

- **Batching.** Records queued in one step go out together as a SHARE_BATCH when the
  driver takes the datagrams. A lone share goes alone, at once. With a
  ``batch_window``, a share that follows a share datagram within that window waits
  until the window ends (a deadline of :meth:`ShareDelivery.get_timer`).
- **No share silently lost (data channel v2).** The sidecar acknowledges each share
  datagram, by the VERDICT datagram that carries its verdict or by an ACK. The
  deadline runs on that transport round trip (RFC 6298 estimator over
  pn→acknowledgement samples, minus the ACK's ack delay, plus the announced
  ``max_ack_delay`` as QUIC's PTO), never below the floor that late acknowledgements
  of copies already sent again measured. An unacknowledged share is sent again over
  UDP with a new packet number, then over TLS; without evidence of loss (nothing
  sent after it was acknowledged, no control line since: a stalled sidecar), only
  one share goes per expiry, as a probe. An acknowledged share whose verdict does
  not follow within the verdict timeout (its own estimator over ack→verdict delays)
  is sent again only when a sidecar datagram is missing since. The first verdict
  for any copy settles the share.
- **UDP/TLS escalation and probing.** UDP counts as up once a PROBE is answered
  (probes after the keys arrive, repeated after 0.1, 0.2, 0.4 … s). Three timer
  expiries in a row that had to send shares over TLS after their UDP
  retransmission, with no UDP verdict in between, mark it down; it is probed again
  every ``probe_interval`` and comes back on the next PROBE_ACK.

- **Redundancy under loss** (PROTOCOL.md §9.1). A :class:`LossEstimate` follows the
  path's datagram loss rate (share datagrams the timer found lost against those
  acknowledged, and gaps in the sidecar's packet numbers); at 1 % or more, each share
  datagram goes out twice, the second copy identical (the sidecar's replay window
  drops whichever arrives second before any cryptography), until the rate falls
  under 0.25 %. A share then waits for a retransmission only when both copies are
  lost; at 0 % loss nothing changes.

TLS copies go through the :class:`DeliveryOwner` (the connection writes them as
channel ``mining.submit`` requests), and so do verdicts, to the rig's channel.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any, Protocol

import msgspec
from msgspec import UNSET, Raw

from bridge.sv1.framing import decode_json
from bridge.sv1.messages import FALSE, NULL, TRUE, Response, SubmitParams, error_value
from bridge.wire import control
from bridge.wire.datagram import BATCH_MAX_SHARES, Ack, Probe, ProbeAck, Share, ShareBatch, Verdicts, expand_pn
from bridge.wire.keys import Sealer
from bridge.wire.receiver import Accepted
from bridge.wire.rtt import RttEstimator

_encode = msgspec.json.Encoder().encode

UDP_FAILURES_BEFORE_FALLBACK = 3
#: The sidecar's longest wait before it acknowledges a share datagram when its hello
#: result does not say (PROTOCOL.md §2.6, C3); a larger announced value is capped here.
MAX_ACK_DELAY = 0.005
ACK_DELAY_LIMIT = 0.2
#: A late acknowledgement of a copy already sent again (a spurious retransmission: the
#: datagram was late, not lost) raises the retransmission floor to this many times its
#: acknowledgement time; the floor then halves every ``LATE_FLOOR_HALF_LIFE`` seconds.
LATE_FLOOR_MARGIN = 2.0
LATE_FLOOR_HALF_LIFE = 60.0
#: Bounds of the verdict timeout (acknowledged share, no verdict yet: a lost VERDICT).
VERDICT_TIMEOUT_MIN = 0.25
VERDICT_TIMEOUT_INITIAL = 1.0
VERDICT_TIMEOUT_MAX = 10.0
_PLAIN_ACCEPT = Response(None, TRUE, NULL)
#: Redundancy (PROTOCOL.md §9.1): each share datagram goes twice while the estimated
#: datagram loss rate is at least ``REDUNDANCY_ON`` (and at least
#: ``REDUNDANCY_MIN_LOSSES`` losses were counted), until it falls under ``REDUNDANCY_OFF``.
REDUNDANCY_ON = 0.01
REDUNDANCY_OFF = 0.0025
REDUNDANCY_MIN_LOSSES = 2.0
#: ... and only once the estimate holds this many samples (a session's first datagrams
#: say little of a rate of 1 %).
REDUNDANCY_MIN_SAMPLES = 32.0
#: The estimate covers the last ``LOSS_WINDOW`` to ``2 × LOSS_WINDOW`` datagrams.
LOSS_WINDOW = 256
#: A gap in the sidecar's packet numbers counts at most this many datagrams lost.
MAX_GAP_COUNTED = 64


class LossEstimate:
    """The path's datagram loss rate over a window, and whether share datagrams go twice.

    Samples are datagrams: delivered or lost. Both counts halve when the samples reach
    twice ``window``, so the rate covers the last ``window`` .. ``2 × window`` datagrams.
    :attr:`redundant` turns on at a rate of ``REDUNDANCY_ON`` or more (with at least
    ``REDUNDANCY_MIN_LOSSES`` losses in at least ``REDUNDANCY_MIN_SAMPLES`` samples) and
    off under ``REDUNDANCY_OFF``: the gap between the two keeps it from flapping around
    one threshold.
    """

    __slots__ = ("losses", "redundant", "samples", "switches", "window")

    def __init__(self, window: int = LOSS_WINDOW) -> None:
        self.window = window
        self.samples = 0.0
        self.losses = 0.0
        self.redundant = False
        self.switches = 0

    @property
    def rate(self) -> float:
        return self.losses / self.samples if self.samples else 0.0

    def delivered(self, count: int = 1) -> None:
        self._add(count, 0)

    def lost(self, count: int = 1) -> None:
        self._add(count, count)

    def found(self) -> None:
        """A datagram counted lost arrived after all (late, reordered): it was delivered."""
        self.losses = max(0.0, self.losses - 1)
        self._decide()

    def _add(self, samples: int, losses: int) -> None:
        self.samples += samples
        self.losses += losses
        if self.samples >= 2 * self.window:
            self.samples /= 2
            self.losses /= 2
        self._decide()

    def _decide(self) -> None:
        rate = self.rate
        if self.redundant:
            if rate < REDUNDANCY_OFF:
                self.redundant = False
                self.switches += 1
        elif rate >= REDUNDANCY_ON and self.losses >= REDUNDANCY_MIN_LOSSES and self.samples >= REDUNDANCY_MIN_SAMPLES:
            self.redundant = True
            self.switches += 1


class PendingShare:
    """One rig share on its way: where copies went and who waits for the verdict."""

    __slots__ = (
        "acked",
        "acked_at",
        "channel",
        "context",
        "deadline",
        "first_sent",
        "job",
        "params",
        "record",
        "refs",
        "sent_at",
        "serial",
        "settled",
        "tls_ids",
        "tries",
        "urgent",
    )

    def __init__(self, serial: int, channel: Any, params: SubmitParams, context: Any) -> None:
        self.serial = serial
        self.channel = channel
        self.params = params
        self.context = context
        self.record: Share | None = None
        self.job: int | None = None
        self.tries = 0
        self.sent_at = 0.0
        self.first_sent = 0.0
        self.deadline = 0.0
        self.refs: list[tuple[int, int, int]] = []
        self.tls_ids: list[int] = []
        self.settled = False
        self.urgent = False
        self.acked = False
        self.acked_at = 0.0

    def __lt__(self, other: PendingShare) -> bool:
        return self.serial < other.serial


class DeliveryOwner(Protocol):
    """What the delivery needs of its connection."""

    def send_tls(self, share: PendingShare) -> None:
        """Send ``share`` as a channel ``mining.submit`` (its request id goes in ``share.tls_ids``)."""
        ...

    def deliver_verdict(self, share: PendingShare, response: Response) -> None:
        """The share is settled: hand the pool's verdict to its rig."""
        ...

    def release(self, share: PendingShare) -> None:
        """The share is gone (settled or dropped): forget its TLS requests."""
        ...


class ShareDelivery:
    """The shares of one StratumRM connection on their way, and the UDP path they take."""

    def __init__(
        self,
        owner: DeliveryOwner,
        *,
        probe_interval: float = 10.0,
        min_rto: float = 0.020,
        initial_rto: float = 0.200,
        max_rto: float = 2.0,
        batch_window: float = 0.0,
    ) -> None:
        self._owner = owner
        self.batch_window = batch_window
        """Seconds a share waits for others after a share datagram went out (0: never waits)."""
        self.probe_interval = probe_interval
        self.now = 0.0
        """The latest time the connection saw (an input's ``now``)."""
        self.sealer: Sealer | None = None
        """The current key epoch's sealer (None: no keys yet, shares go over TLS)."""
        self.udp_up = False
        self._datagrams: list[bytes] = []
        self._queued_records: list[PendingShare] = []
        self._sealed_at = -math.inf  # when the newest share datagram (not urgent) went out
        self._urgent_records: list[PendingShare] = []
        self.shares: dict[int, PendingShare] = {}
        """Shares without a verdict, by serial."""
        self._timeline: list[tuple[float, PendingShare]] = []  # heap; an entry is stale unless share.deadline matches
        self._refs: dict[tuple[int, int, int], PendingShare] = {}
        self._flights: dict[tuple[int, int], tuple[float, list[PendingShare]]] = {}  # unacknowledged datagrams
        self.loss = LossEstimate()
        """The path's datagram loss rate; share datagrams go twice while ``loss.redundant`` (§9.1)."""
        self._copied: set[tuple[int, int]] = set()  # flights sent twice (their acknowledgement tells no loss rate)
        self._declared_lost: set[tuple[int, int]] = set()  # flights the timer counted lost
        self.rtt = RttEstimator(min_rto=min_rto, initial_rto=initial_rto, max_rto=max_rto)
        self.verdict_rtt = RttEstimator(
            min_rto=VERDICT_TIMEOUT_MIN, initial_rto=VERDICT_TIMEOUT_INITIAL, max_rto=VERDICT_TIMEOUT_MAX
        )
        # Each share has its own deadline, so one outage expires many of them in a row: it
        # counts one UDP failure per timeout (the RTTs back off once per RTO themselves).
        self._failure_count_due = -math.inf
        self._udp_failures = 0
        self._ack_delay = MAX_ACK_DELAY
        # Loss evidence on the sidecar's datagrams: the next pn expected per key epoch,
        # when one was last found missing, when one was last received.
        self._sidecar_next: dict[int, int] = {}
        self._largest_sent: dict[int, int] = {}  # per key epoch: the pn of the newest share datagram
        self._gap_at = -math.inf
        self._heard_at = -math.inf
        self._acked_sent_at = -math.inf  # when the newest share datagram an ACK covered was sent
        # VERDICTs name only the datagrams whose shares the pool answered, so one for a
        # later datagram shows an earlier one lost only once the sidecar's ack delay has
        # passed since (the earlier one's own acknowledgement was due by then): (when, sent_at).
        self._verdict_acked: deque[tuple[float, float]] = deque()
        self._verdict_acked_sent_at = -math.inf
        self._late_floor = 0.0
        self._late_floor_at = 0.0
        self._next_probe: float | None = None
        self._probe_retry = 0.1
        self._probe_id = 0
        # counters
        self.shares_total = 0
        self.shares_udp = 0
        self.shares_tls = 0
        self.retx_udp = 0
        self.retx_tls = 0
        self.verdict_queries = 0
        self.acks_received = 0
        self.verdicts_received = 0
        self.blocks = 0
        self.settled = 0
        self.fallbacks = 0
        self.datagrams_sent = 0
        self.datagram_bytes = 0
        self.spurious = 0
        self.verdict_waits = 0
        self.probe_waits = 0
        self.redundant_copies = 0

    def announced_ack_delay(self, max_ack_delay: float) -> None:
        """The sidecar's ``max_ack_delay`` from its hello result (capped at ``ACK_DELAY_LIMIT``)."""
        self._ack_delay = min(max_ack_delay, ACK_DELAY_LIMIT) if max_ack_delay >= 0 else MAX_ACK_DELAY

    def new_keys(self, sealer: Sealer, now: float) -> None:
        """A new key epoch (``rm.keys``): seal under it; probe UDP if it is not up."""
        self.sealer = sealer
        if not self.udp_up:
            self.probe(now)

    # ------------------------------------------------------------------ shares

    def send(self, share: PendingShare) -> None:
        """A new share (its record built, ``urgent`` set for a block candidate): choose its path."""
        self.shares[share.serial] = share
        self.shares_total += 1
        share.sent_at = share.first_sent = self.now
        if share.record is not None and share.urgent:
            self.blocks += 1
            self._urgent_records.append(share)
            self._send_tls(share)
            share.tries = 2
        elif share.record is not None and self.udp_up:
            self._queued_records.append(share)
            self.shares_udp += 1
            share.tries = 1
        else:
            self._send_tls(share)
            share.tries = 2

    def _send_tls(self, share: PendingShare) -> None:
        self.shares_tls += 1
        self._owner.send_tls(share)

    def settle_tls(self, share: PendingShare, response: Response) -> None:
        """The channel response to a TLS copy of ``share``."""
        self._settle(share, response, self.now, via_udp=False)

    def drop_channel(self, channel: object) -> None:
        """The shares of ``channel`` are no longer wanted (the channel closed)."""
        for share in [s for s in self.shares.values() if s.channel is channel]:
            self._drop_share(share)

    def clear(self) -> None:
        """The connection is gone: every share with it."""
        self._verdict_acked.clear()
        self.shares.clear()
        self._refs.clear()
        self._flights.clear()
        self._timeline.clear()
        self._copied.clear()
        self._declared_lost.clear()

    # ------------------------------------------------------------------ datagrams

    def take_datagrams(self) -> list[bytes]:
        """Seal queued share records (batched) and probes, as of :attr:`now`."""
        if self._urgent_records:
            self._seal_records(self._urgent_records, urgent=True)
        if self._queued_records and self._batch_due() is None:
            self._seal_records(self._queued_records, urgent=False)
        datagrams, self._datagrams = self._datagrams, []
        self.datagrams_sent += len(datagrams)
        self.datagram_bytes += sum(len(d) for d in datagrams)
        return datagrams

    def receive(self, result: Accepted, now: float) -> None:
        """An authenticated datagram from the sidecar."""
        epoch, pn = result.epoch, result.header.pn
        expected = self._sidecar_next.get(epoch, 0)
        if pn >= expected:
            if pn > expected:
                self._gap_at = now  # a sidecar datagram is missing (lost, or late)
                self.loss.lost(min(pn - expected, MAX_GAP_COUNTED))
            self.loss.delivered()
            self._sidecar_next[epoch] = pn + 1
            if len(self._sidecar_next) > 2:
                del self._sidecar_next[min(self._sidecar_next)]
        else:
            self.loss.found()  # counted missing when a later one came first
        self._heard_at = now
        body = result.body
        match body:
            case Verdicts():
                self._on_verdicts(result.epoch, body, now)
            case Ack():
                self._on_ack(result.epoch, body, now)
            case ProbeAck():
                if not self.udp_up:
                    self.udp_up = True
                    self._udp_failures = 0
                    self._next_probe = None
                    self._probe_retry = 0.1
            case _:
                pass  # the sidecar sends no shares or probes

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        """The next retransmission, probe or batch deadline; None: nothing is due."""
        # Called after every input (the driver re-arms its timer): no list, no min() here.
        timeline = self._timeline
        due: float | None = None
        while timeline:
            deadline, share = timeline[0]
            if share.settled or share.deadline != deadline:
                heapq.heappop(timeline)
                continue
            due = deadline
            break
        probe = self._next_probe
        if probe is not None and (due is None or probe < due):
            due = probe
        if self._queued_records:
            batch_due = self._batch_due()
            if batch_due is not None and (due is None or batch_due < due):
                due = batch_due
        return due

    def handle_timer(self, now: float, spoke_at: float) -> None:
        """Probes and retransmissions due at ``now``; the sidecar's last control line came at ``spoke_at``."""
        if self._next_probe is not None and now >= self._next_probe:
            self.probe(now)
        timeline = self._timeline
        lost = False
        overdue = False
        escalated = False
        probed = False
        waiting: list[PendingShare] = []
        verdict_waiting: list[PendingShare] = []
        # Loss evidence, as QUIC's (RFC 9002 §6.1): the sidecar acknowledged a datagram
        # sent after the share's (an ACK at once, a VERDICT once the ack delay passed
        # since), or spoke on the control channel since it was sent.
        acked_after = max(self._acked_sent_at, self._mature_verdict_evidence(now))
        while timeline and timeline[0][0] <= now:
            deadline, share = heapq.heappop(timeline)
            if share.settled or share.deadline != deadline:
                continue  # settled, or re-armed since (acknowledged, sent again)
            share.deadline = 0.0
            if share.acked:
                if self._heard_at > share.acked_at and self._gap_at < share.first_sent:
                    # No sidecar datagram went missing since the share was first sent (so
                    # none that could have carried its verdict), and one came after the
                    # acknowledgement: the pool has not answered yet. Keep waiting.
                    self.verdict_waits += 1
                    share.deadline = now + self.verdict_rtt.rto
                    heapq.heappush(timeline, (share.deadline, share))
                    continue
                # Received by the sidecar, but no verdict within the verdict timeout and
                # a sidecar datagram is missing (or none came since): the VERDICT may be
                # lost. Ask again; the sidecar answers from its verdict cache or joins
                # the pending share. A sidecar silent since the acknowledgement (no
                # datagram, no line) is stalled: one share asks, as a probe.
                if share.acked_at >= self._heard_at and share.acked_at >= spoke_at:
                    if probed:
                        self.probe_waits += 1
                        verdict_waiting.append(share)
                        continue
                    probed = True
                self.verdict_queries += 1
                overdue = True
            else:
                if acked_after < share.sent_at and spoke_at < share.sent_at:
                    # No evidence of loss: nothing sent later was acknowledged (the
                    # sidecar reads its datagrams in order) and no control line came
                    # since. A stalled peer (a garbage collection, a descheduled process,
                    # a backlog) or a dead path, not one lost datagram: one share goes
                    # again per expiry, as QUIC's PTO sends one probe; the others wait
                    # for the acknowledgements the probe draws.
                    if probed:
                        self.probe_waits += 1
                        waiting.append(share)
                        continue
                    probed = True
                lost = True
                if share.refs:
                    flight = share.refs[-1][:2]
                    if flight in self._flights and flight not in self._declared_lost:
                        self._declared_lost.add(flight)
                        self.loss.lost()
            if share.tries == 1 and self.udp_up and share.record is not None:
                self.retx_udp += 1
                self._queued_records.append(share)  # new pn; armed again when sealed
            elif not share.tls_ids:
                self.retx_tls += 1
                escalated = escalated or share.record is not None
                self._send_tls(share)
            else:
                continue  # over TLS already: TCP delivers it; the rig's timeout bounds the wait
            share.tries += 1
        if escalated and self.udp_up and now >= self._failure_count_due:
            # A timer expiry that had to fall back to TLS after a UDP retransmission;
            # several in a row with no UDP acknowledgement in between mean UDP is blocked.
            # Counted once per timeout: shares expiring one after another in a burst are
            # one outage of one timeout's length, not several.
            self._udp_failures += 1
            self._failure_count_due = now + self.retransmission_timeout(now)
            if self._udp_failures >= UDP_FAILURES_BEFORE_FALLBACK:
                self.udp_down(now)
        if lost:
            self.rtt.on_timeout(now)  # one back-off per RTO, however many shares expire in it
        if overdue:
            self.verdict_rtt.on_timeout(now)
        for shares, timeout in ((waiting, self.retransmission_timeout(now)), (verdict_waiting, self.verdict_rtt.rto)):
            for share in shares:
                share.deadline = now + timeout
                heapq.heappush(timeline, (share.deadline, share))

    def _mature_verdict_evidence(self, now: float) -> float:
        """When the newest datagram was sent that a VERDICT acknowledged at least the
        sidecar's ack delay ago (from then on, its earlier datagrams' ACKs are overdue)."""
        acked = self._verdict_acked
        horizon = now - self._ack_delay
        while acked and acked[0][0] <= horizon:
            sent_at = acked.popleft()[1]
            if sent_at > self._verdict_acked_sent_at:
                self._verdict_acked_sent_at = sent_at
        return self._verdict_acked_sent_at

    def _batch_due(self) -> float | None:
        """When the queued records go out: at once (None) unless a share datagram went out
        less than ``batch_window`` ago and they do not fill a batch yet."""
        if not self.batch_window or len(self._queued_records) >= BATCH_MAX_SHARES:
            return None
        due = self._sealed_at + self.batch_window
        return due if due > self.now else None

    def _seal_records(self, shares: list[PendingShare], *, urgent: bool) -> None:
        keys = self.sealer
        live = [s for s in shares if not s.settled]
        shares.clear()
        now = self.now
        if live and not urgent and keys is not None:
            self._sealed_at = now
        deadline = now + self.retransmission_timeout(now)
        timeline = self._timeline
        if keys is None:
            for share in live:  # no keys (yet): the timer sends them over TLS
                share.deadline = deadline
                heapq.heappush(timeline, (deadline, share))
            return
        sealer = keys
        epoch = sealer.epoch
        refs = self._refs
        twice = self.loss.redundant
        for start in range(0, len(live), BATCH_MAX_SHARES):
            group = live[start : start + BATCH_MAX_SHARES]
            # only shares with a record are queued for UDP (see _submit)
            records = [s.record for s in group if s.record is not None]
            body = records[0] if len(records) == 1 else ShareBatch(tuple(records))
            sealed = sealer.seal(body, urgent=urgent)
            pn = sealed.pn
            if epoch not in self._largest_sent and len(self._largest_sent) >= 2:
                del self._largest_sent[min(self._largest_sent)]  # the proxy accepts one previous epoch
            self._largest_sent[epoch] = pn
            self._flights[(epoch, pn)] = (now, group)
            for index, share in enumerate(group):
                ref = (epoch, pn, index)
                share.refs.append(ref)
                refs[ref] = share
                share.acked = False
                share.sent_at = now
                share.deadline = deadline
                heapq.heappush(timeline, (deadline, share))
            self._datagrams.append(sealed.data)
            if twice:  # §9.1: an identical second copy; the sidecar's replay window drops the later one
                self._datagrams.append(sealed.data)
                self.redundant_copies += 1
                self._copied.add((epoch, pn))

    def retransmission_timeout(self, now: float) -> float:
        """How long a share datagram may go unacknowledged before its shares are sent again.

        QUIC's PTO: the RTO (RFC 6298 over transport round trips) plus the sidecar's
        announced ``max_ack_delay``, and never less than the floor that late
        acknowledgements of copies already sent again measured (scheduling delays
        of a loaded machine), which halves every ``LATE_FLOOR_HALF_LIFE`` seconds.
        """
        return max(self.rtt.rto + self._ack_delay, self.retransmission_floor(now))

    def retransmission_floor(self, now: float) -> float:
        """The floor late acknowledgements put under the retransmission deadline, now."""
        floor = self._late_floor
        if not floor:
            return 0.0
        decay: float = 0.5 ** (max(0.0, now - self._late_floor_at) / LATE_FLOOR_HALF_LIFE)
        return min(floor * decay, self.rtt.max_rto + self._ack_delay)

    def _late_copy(self, epoch: int, pn: int, flight: tuple[float, list[PendingShare]], now: float) -> None:
        """Datagram ``pn`` is acknowledged: if its shares were sent again meanwhile, that was spurious."""
        if not (self.retx_udp or self.retx_tls):
            return  # nothing was ever sent again
        sent_at, shares = flight
        for share in shares:
            last = share.refs[-1]
            if (last[0], last[1]) != (epoch, pn) or (share.tls_ids and not share.urgent):
                self.spurious += 1
                late = (now - sent_at) * LATE_FLOOR_MARGIN
                current = self.retransmission_timeout(now)
                if late > current:
                    self._late_floor = late
                    self._late_floor_at = now
                return

    def _settle(self, share: PendingShare, response: Response, now: float, *, via_udp: bool) -> None:
        if share.settled:
            return
        share.settled = True
        self.settled += 1
        if via_udp:
            self._udp_failures = 0
            if share.tries == 1:
                if share.acked:
                    self.verdict_rtt.observe(now - share.acked_at)
                else:  # the VERDICT acknowledged it: no wait to measure, but the verdict path answers
                    self.verdict_rtt.answered()
        self._drop_share(share)
        self._owner.deliver_verdict(share, response)

    def _drop_share(self, share: PendingShare) -> None:
        share.settled = True
        self.shares.pop(share.serial, None)
        flights = self._flights
        for ref in share.refs:
            self._refs.pop(ref, None)
            flight = flights.get((ref[0], ref[1]))
            if flight is not None and all(s.settled for s in flight[1]):
                del flights[(ref[0], ref[1])]
                self._copied.discard((ref[0], ref[1]))
                self._declared_lost.discard((ref[0], ref[1]))
        self._owner.release(share)

    def forget(self, serial: int) -> None:
        """The rig no longer wants the verdict of share ``serial``."""
        share = self.shares.get(serial)
        if share is not None:
            self._drop_share(share)

    def results(self, results: control.Results, now: float) -> None:
        """Verdicts of UDP shares over TLS (the sidecar's fallback when a VERDICT datagram cannot go)."""
        refs = self._refs
        for epoch, pn, index, verdict in results.v:
            share = refs.get((epoch, pn, index))
            if share is None:
                continue
            self._settle(share, _verdict_response(verdict), now, via_udp=True)

    def _acknowledged(self, epoch: int, pn: int, now: float, *, checked: bool = False, by_verdict: bool = False) -> float | None:
        """The sidecar received datagram ``pn``: its shares now wait for verdicts only.

        Returns when it was sent, if this is its first acknowledgement.
        """
        flight = self._flights.pop((epoch, pn), None)
        if flight is None:
            return None
        if not checked:  # (a VERDICT's datagram was sampled and checked when the VERDICT came)
            self._flight_answered((epoch, pn))
            self._late_copy(epoch, pn, flight, now)
        sent_at, shares = flight
        if by_verdict:
            self._mature_verdict_evidence(now)  # keeps the queue to the last ack delay's datagrams
            self._verdict_acked.append((now, sent_at))
        elif sent_at > self._acked_sent_at:
            self._acked_sent_at = sent_at
        deadline = now + self.verdict_rtt.rto
        for share in shares:
            if share.settled or share.acked:
                continue
            share.acked = True
            share.acked_at = now
            share.deadline = deadline
            heapq.heappush(self._timeline, (deadline, share))
        return sent_at

    def _flight_answered(self, key: tuple[int, int]) -> None:
        """Share datagram ``key`` is acknowledged (first time): a sample of the loss rate (§9.1)."""
        if key in self._declared_lost:
            self.loss.found()  # late, not lost
        elif key not in self._copied:  # (one of two copies arriving tells nothing of the loss rate)
            self.loss.delivered()
        self._declared_lost.discard(key)
        self._copied.discard(key)

    def _on_ack(self, epoch: int, ack: Ack, now: float) -> None:
        self.acks_received += 1
        self._udp_failures = 0
        flights = self._flights
        largest = ack.ranges[0].high
        sample: float | None = None
        for r in ack.ranges:
            if r.high - r.low < len(flights):
                pns: Any = range(r.high, r.low - 1, -1)
            else:  # a wide range: look only at what is in flight
                pns = [pn for (e, pn) in flights if e == epoch and r.low <= pn <= r.high]
            for pn in pns:
                sent_at = self._acknowledged(epoch, pn, now)
                if sent_at is not None and pn == largest:
                    sample = sent_at
        if sample is not None:
            # RFC 9002 §5.3: the peer's ack delay, at most its announced max_ack_delay (a
            # sidecar whose ack timer ran late does not make the path look faster).
            self.rtt.observe(now - sample, min(ack.ack_delay_us / 1e6, self._ack_delay))

    def _on_verdicts(self, epoch: int, verdicts: Verdicts, now: float) -> None:
        self.verdicts_received += 1
        self._udp_failures = 0
        refs = self._refs
        flights = self._flights
        largest = -1
        sample: float | None = None
        acknowledged: list[int] = []
        sent = self._largest_sent.get(epoch)
        if sent is None:
            return  # nothing was ever sent under that key: nothing to name
        for entry in verdicts.entries:
            pn = expand_pn(entry.pn, sent)  # the entry carries the low 32 bits
            if pn is None:
                continue
            flight = flights.get((epoch, pn))
            if flight is not None:
                if not acknowledged or pn != acknowledged[-1]:  # entries of one datagram are adjacent
                    self._flight_answered((epoch, pn))
                    self._late_copy(epoch, pn, flight, now)
                    acknowledged.append(pn)
                if pn > largest:
                    largest, sample = pn, flight[0]
            share = refs.get((epoch, pn, entry.index))
            if share is not None:
                detail = entry.detail
                self._settle(share, _PLAIN_ACCEPT if detail is None else _detail_response(detail), now, via_udp=True)
        for pn in acknowledged:  # the other shares of these datagrams now wait for their verdicts only
            self._acknowledged(epoch, pn, now, checked=True, by_verdict=True)
        if sample is not None:
            # A verdict acknowledges its datagram; the sidecar sends it within its ack
            # delay or sends an ACK first, so the sample is at most RTT + 5 ms.
            self.rtt.observe(now - sample)

    def probe(self, now: float) -> None:
        """Send a PROBE now; unanswered, it is repeated after 0.1, 0.2, 0.4 … s up to ``probe_interval``."""
        if self.sealer is None:
            return
        self._probe_id = (self._probe_id + 1) & 0xFFFFFFFF
        self._datagrams.append(self.sealer.seal(Probe(self._probe_id)).data)
        self._next_probe = now + self._probe_retry
        self._probe_retry = min(self._probe_retry * 2, self.probe_interval)

    def udp_down(self, now: float) -> None:
        """UDP counts as down (escalation, or the test of a fallback): probe again after ``probe_interval``."""
        self.udp_up = False
        self.fallbacks += 1
        self._udp_failures = 0
        self._probe_retry = self.probe_interval
        self._next_probe = now + self.probe_interval


def _verdict_response(verdict: Any) -> Response:
    """A verdict as the sidecar reports it (``1`` or the pool's response without id) as a Response."""
    if verdict == control.ACCEPTED_VERDICT and type(verdict) is int:
        return _PLAIN_ACCEPT
    if isinstance(verdict, dict):
        result = verdict.get("result", UNSET)
        reason = verdict.get("reject-reason", UNSET)
        return Response(
            None,
            UNSET if result is UNSET else Raw(_encode(result)),
            Raw(_encode(verdict.get("error"))),
            reason if isinstance(reason, str) else UNSET,
        )
    return Response(None, FALSE, error_value(20, "unreadable verdict from the sidecar"))


def _detail_response(detail: bytes) -> Response:
    """The DETAIL of a VERDICT entry (the pool's response object, JSON) as a Response."""
    try:
        verdict = decode_json(detail)
    except msgspec.DecodeError:
        verdict = None
    return _verdict_response(verdict)
