"""How the sidecar's verdicts of UDP shares go back (PROTOCOL.md C6, §2.6, §2.7), sans-IO.

Verdicts of UDP shares go back as VERDICT datagrams (which also acknowledge their
datagrams), sealed under the key epoch the share came in, when the driver takes the
session's datagrams (:meth:`VerdictSender.take`): after the input that produced them,
or together with the verdicts of the other inputs of the same wake-up. A share datagram that no VERDICT named within ``max_ack_delay``
is acknowledged by an ACK datagram. A verdict whose datagram the anti-amplification
budget refuses, or whose epoch can no longer seal, goes in ``rm.results`` over TLS
instead, collected for ``batch_window`` seconds (at once when a line is full or the
share was URGENT; at the end of the input without ``batch-verdicts``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.relay.sidecar.intake import SessionUdp
from bridge.relay.sidecar.ledger import UdpRef
from bridge.wire.control import MAX_RESULTS_PER_LINE, Results, encode_rm
from bridge.wire.datagram import (
    ACK_MAX_RANGES,
    MAX_DATAGRAM_SIZE,
    OVERHEAD,
    VERDICT_MAX_ENTRIES,
    Ack,
    AckRange,
    DatagramType,
    pack_verdict_entry,
)
from bridge.wire.keys import KeyExhausted

#: How long a received share datagram may wait for a VERDICT to acknowledge it before
#: an ACK datagram is sent instead (PROTOCOL.md §2.6; QUIC's max_ack_delay and its
#: default). Announced in the hello result; the proxy adds it to its retransmission
#: deadline, so a pool that answers within it costs no ACK datagram.
DEFAULT_MAX_ACK_DELAY: Final = 0.025
#: Share datagrams waiting for an acknowledgement after which an ACK goes out at once.
MAX_UNACKED: Final = 256
_VERDICT_ROOM: Final = MAX_DATAGRAM_SIZE - OVERHEAD

_encode = msgspec.json.Encoder().encode


class VerdictSender:
    """One session's verdicts of UDP shares on their way back, and its acknowledgements.

    ``udp`` seals and sends the datagrams; ``write`` queues a control line (``rm.results``).
    """

    def __init__(
        self,
        counters: SidecarSessionCounters,
        udp: SessionUdp,
        write: Callable[[bytes], None],
        *,
        batch_window: float,
        max_ack_delay: float,
    ) -> None:
        self.counters = counters
        self._udp = udp
        self._write = write
        self.batch_window = batch_window
        self.max_ack_delay = max_ack_delay
        self.batch = False
        """``batch-verdicts`` was negotiated: ``rm.results`` lines wait ``batch_window``."""
        self._out: dict[int, list[tuple[int, int, Any]]] = {}  # per key epoch: (pn, index, verdict)
        self._unacked: dict[int, dict[int, float]] = {}  # per key epoch: pn -> received at
        self._unacked_count = 0
        self.ack_due: float | None = None
        self._results: list[tuple[int, int, int, Any]] = []
        self.results_due: float | None = None

    def add(self, ref: UdpRef, verdict: Any) -> None:
        """The verdict of the UDP share ``ref``; it goes at the end of this input."""
        self.counters.verdicts_udp += 1
        out = self._out.get(ref[0])
        if out is None:
            self._out[ref[0]] = [(ref[1], ref[2], verdict)]
        else:
            out.append((ref[1], ref[2], verdict))

    def received(self, epoch: int, pn: int, now: float) -> None:
        """A share datagram to acknowledge: by a VERDICT naming it, else an ACK within max_ack_delay."""
        pns = self._unacked.get(epoch)
        if pns is None:
            pns = self._unacked[epoch] = {}
        if pn not in pns:
            pns[pn] = now
            self._unacked_count += 1
        if self.ack_due is None:
            self.ack_due = now + self.max_ack_delay
        if self._unacked_count >= MAX_UNACKED:
            self.ack_due = now

    def end_of_input(self, now: float) -> None:
        """``rm.results`` go out at the end of each input without negotiated batching (the
        datagrams wait for :meth:`take`)."""
        if not self.batch and self._results:
            self.flush_results()

    @property
    def pending(self) -> bool:
        """Verdicts wait to be sealed (by :meth:`take`)."""
        return bool(self._out)

    def take(self, now: float) -> None:
        """Seal the verdicts collected so far into VERDICT datagrams (queued on the session's
        UDP path), as few as fit: those of several inputs share a datagram."""
        if self._out:
            self._flush_datagrams(now)
            if not self.batch and self._results:
                self.flush_results()

    def handle_timer(self, now: float) -> None:
        if self.results_due is not None and now >= self.results_due:
            self.flush_results()
        if self.ack_due is not None and now >= self.ack_due:
            self._send_acks(now)

    def _flush_datagrams(self, now: float) -> None:
        """Send the verdicts collected so far as VERDICT datagrams (per key epoch).

        A verdict goes over TLS (``rm.results``) instead when its epoch can no longer
        seal or the anti-amplification budget (§7) does not allow the datagram.
        """
        pending, self._out = self._out, {}
        udp = self._udp
        for epoch, items in pending.items():
            sealer = udp.sealer(epoch)
            unacked = self._unacked.get(epoch)
            start = 0
            count = len(items)
            while start < count:
                pieces: list[bytes] = []
                room = _VERDICT_ROOM
                end = start
                while end < count and end - start < VERDICT_MAX_ENTRIES:
                    pn, index, verdict = items[end]
                    piece = pack_verdict_entry(pn, index, None if type(verdict) is int else _encode(verdict))
                    if len(piece) > room and pieces:
                        break
                    room -= len(piece)
                    pieces.append(piece)
                    end += 1
                chunk = items[start:end]
                start = end
                sent = False
                if sealer is not None and udp.intake is not None and room >= 0:
                    plaintext = b"".join(pieces)
                    address = udp.address_for(OVERHEAD + len(plaintext))
                    if address is None:
                        self.counters.verdicts_over_budget += len(chunk)
                    else:
                        try:
                            sealed = sealer.seal_plaintext(DatagramType.VERDICT, plaintext)
                        except KeyExhausted:
                            udp.rekey(now)
                        else:
                            sent = True
                            self.counters.verdict_datagrams_sent += 1
                            udp.send(sealed.data, address)
                            if unacked:
                                for pn, _, _ in chunk:
                                    if unacked.pop(pn, None) is not None:
                                        self._unacked_count -= 1
                if not sent:
                    for pn, index, verdict in chunk:
                        self._add_result_line(epoch, pn, index, verdict, True, now)
        if self._unacked_count == 0:
            self.ack_due = None

    def _send_acks(self, now: float) -> None:
        """ACK every share datagram no VERDICT acknowledged (ranges highest first, per epoch)."""
        self.ack_due = None
        unacked, self._unacked = self._unacked, {}
        self._unacked_count = 0
        udp = self._udp
        if udp.intake is None:
            return
        for epoch, pns in unacked.items():
            sealer = udp.sealer(epoch)
            if sealer is None or not pns:
                continue
            ordered = sorted(pns, reverse=True)
            ranges: list[AckRange] = []
            high = low = ordered[0]
            for pn in ordered[1:]:
                if pn == low - 1:
                    low = pn
                    continue
                ranges.append(AckRange(high, low))
                high = low = pn
            ranges.append(AckRange(high, low))
            for start in range(0, len(ranges), ACK_MAX_RANGES):
                group = tuple(ranges[start : start + ACK_MAX_RANGES])
                delay = max(0, round((now - pns[group[0].high]) * 1e6))
                ack = Ack(ranges=group, ack_delay_us=min(delay, 0xFFFF_FFFF))
                address = udp.address_for(OVERHEAD + 5 + 12 * len(group))
                if address is None:
                    continue  # the proxy's retransmission recovers; the budget refills as it sends
                try:
                    sealed = sealer.seal(ack)
                except KeyExhausted:
                    udp.rekey(now)
                    return
                self.counters.ack_datagrams_sent += 1
                udp.send(sealed.data, address)

    def _add_result_line(self, epoch: int, pn: int, index: int, verdict: Any, urgent: bool, now: float) -> None:
        """A verdict of a UDP share that cannot go back as a datagram: ``rm.results`` over TLS."""
        self._results.append((epoch, pn, index, verdict))
        if urgent or len(self._results) >= MAX_RESULTS_PER_LINE:
            self.flush_results()
        elif self.results_due is None:
            self.results_due = now + self.batch_window

    def flush_results(self) -> None:
        """Write the collected ``rm.results`` line."""
        self.results_due = None
        if not self._results:
            return
        results, self._results = self._results, []
        self.counters.results_lines += 1
        self._write(encode_rm(Results(v=results)))

    def clear(self) -> None:
        """The connection is closing: nothing more goes back."""
        self._results.clear()
        self._out.clear()
        self._unacked.clear()
        self._unacked_count = 0
        self.results_due = self.ack_due = None
