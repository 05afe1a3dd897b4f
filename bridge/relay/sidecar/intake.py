"""The sidecar's UDP side, sans-IO: the shared intake and each session's key epochs.

:class:`SidecarIntake` is the one receive pipeline of the sidecar's UDP socket
(PROTOCOL.md §6), shared by every session. :class:`SessionUdp` is one session's part
of it: its key epochs (``rm.keys`` after the hello, at every rekey; §3, §8), the
PROBE_ACKs it answers, and every datagram it sends, only to the address its
authenticated datagrams came from and within the anti-amplification budget (§7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple, Protocol

from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.wire.control import Keys, encode_rm
from bridge.wire.datagram import OVERHEAD, DropReason, Probe, ProbeAck
from bridge.wire.keys import KeyExhausted, KeyMaterial, KeySet, Role, Sealer
from bridge.wire.limits import Address
from bridge.wire.receiver import (
    DEFAULT_BURST,
    DEFAULT_GRACE,
    DEFAULT_RATE,
    DEFAULT_STRANGER_BURST,
    DEFAULT_STRANGER_RATE,
    Accepted,
    DatagramReceiver,
    ReceiverStatistics,
)

#: Bytes the sidecar may send to a learned address per authenticated byte received from it
#: (PROTOCOL.md §7): a share datagram whose pool is slow gets an ACK and then its VERDICT.
AMPLIFICATION_FACTOR: Final = 2.0
DEFAULT_REKEY_INTERVAL: Final = 3600.0
#: ``bad tag`` drops under a session's keys after which the sidecar rekeys (new conn_id,
#: PROTOCOL.md §6.1): a bound on forgery attempts per key that an attacker cannot turn
#: into a closed session.
DEFAULT_REKEY_AFTER_BAD_TAGS: Final = 1 << 16


class OutgoingDatagram(NamedTuple):
    """A sealed datagram and the (authenticated, budgeted) address to send it to."""

    data: bytes
    address: Address


class IntakeSession(Protocol):
    """What the intake needs of a session registered in its receiver (the session is the key)."""

    def __hash__(self) -> int: ...

    def datagram_accepted(self, accepted: Accepted, now: float) -> None: ...

    def datagram_dropped(self, reason: DropReason, now: float) -> bool: ...


class SidecarIntake:
    """The sidecar's one UDP receive pipeline, shared by every session on the socket.

    It owns a :class:`~bridge.wire.receiver.DatagramReceiver` in the sidecar role,
    in which each session registers its key epochs with itself as the session key,
    so a datagram's conn_id finds its session in one dict lookup. Drops of unknown
    conn_ids and malformed headers are counted here only; drops and acceptances
    under a known conn_id also reach that session.
    """

    def __init__(
        self,
        *,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        grace: float = DEFAULT_GRACE,
        stranger_rate: float = DEFAULT_STRANGER_RATE,
        stranger_burst: float = DEFAULT_STRANGER_BURST,
    ) -> None:
        self.grace = grace
        self.receiver = DatagramReceiver(
            Role.SIDECAR,
            rate=rate,
            burst=burst,
            grace=grace,
            stranger_rate=stranger_rate,
            stranger_burst=stranger_burst,
            amplification_factor=AMPLIFICATION_FACTOR,
        )

    def receive_datagram(self, data: bytes, address: Address, now: float) -> IntakeSession | None:
        """Run one datagram through the pipeline; return the session if it may have output.

        That is a session that accepted the datagram (PROBE_ACKs, pool writes,
        verdicts) or rekeyed because of it; a drop under a known conn_id is counted
        by its session but returns None (nothing to do: the cheap path of a flood).
        """
        result = self.receiver.receive(data, address, now)
        session: IntakeSession | None = result.session  # type: ignore[assignment]
        if session is None:
            return None
        if type(result) is Accepted:
            session.datagram_accepted(result, now)
            return session
        return session if session.datagram_dropped(result.reason, now) else None  # type: ignore[union-attr]

    def handle_timer(self, now: float) -> None:
        """Forget previous key epochs whose grace period is over."""
        self.receiver.purge(now)

    def get_timer(self) -> float | None:
        """When a previous key epoch's grace period ends (:meth:`handle_timer` forgets it)."""
        return self.receiver.next_deadline()

    def statistics(self) -> ReceiverStatistics:
        return self.receiver.statistics()


class SessionUdp:
    """One session's key epochs on the shared intake and the datagrams it sends.

    ``owner`` is the session, its key in the intake's receiver; ``write`` queues a
    control line (``rm.keys``). ``intake`` None: the session has no UDP.
    """

    def __init__(
        self,
        counters: SidecarSessionCounters,
        intake: SidecarIntake | None,
        owner: IntakeSession,
        write: Callable[[bytes], None],
        *,
        randbytes: Callable[[int], bytes],
        rekey_interval: float | None,
        rekey_after_bad_tags: int,
    ) -> None:
        self.intake = intake
        self._owner = owner
        self._write = write
        self._randbytes = randbytes
        self.rekey_interval = rekey_interval
        self.rekey_after_bad_tags = rekey_after_bad_tags
        self.epoch = -1
        """The current key epoch (-1 before the first ``rm.keys``)."""
        self._sealers: dict[int, Sealer] = {}
        self._send_epoch = -1
        self.rekey_due: float | None = None
        self._registered = False
        self._closed = False
        self._datagrams: list[OutgoingDatagram] = []
        self.counters = counters
        self._bad_tags = 0

    # ------------------------------------------------------------------ keys

    def start(self, now: float) -> None:
        """UDP was negotiated: issue the first key epoch."""
        if not self._closed and not self._registered and self.intake is not None:
            self._issue_keys(now)

    def rekey(self, now: float) -> None:
        """Issue the next key epoch (``rm.keys``); the previous one stays valid for the grace period."""
        if self._registered:
            self._issue_keys(now)

    def _issue_keys(self, now: float) -> None:
        intake = self.intake
        assert intake is not None
        receiver = intake.receiver
        epoch = self.epoch + 1
        while True:
            material = KeyMaterial.generate(epoch, randbytes=self._randbytes)
            keys = KeySet.derive(material, Role.SIDECAR)
            try:
                if self._registered:
                    receiver.rekey(self._owner, keys.opener, now)
                else:
                    receiver.add_session(self._owner, keys.opener)
                    self._registered = True
            except ValueError:
                continue  # conn_id already in use by another session: draw again
            break
        self.epoch = epoch
        # Keep sealing under the epoch the proxy last used until it uses a newer one
        # (§8); the receiver still accepts the previous epoch, so keep its sealer too.
        keep = (self._send_epoch, epoch - 1)
        self._sealers = {e: s for e, s in self._sealers.items() if e in keep}
        self._sealers[epoch] = keys.sealer
        if self._send_epoch < 0:
            self._send_epoch = epoch
        if self.rekey_interval is not None:
            self.rekey_due = now + self.rekey_interval
        self._write(
            encode_rm(
                Keys(
                    conn_id=f"{material.conn_id:016x}",
                    epoch=epoch,
                    secret=material.secret.hex(),
                    grace=intake.grace,
                ),
            )
        )

    def sealer(self, epoch: int) -> Sealer | None:
        """The sealer of key epoch ``epoch``, while it can still seal."""
        return self._sealers.get(epoch)

    # ------------------------------------------------------------------ input

    def accepted(self, accepted: Accepted) -> None:
        """An authenticated datagram of this session."""
        counters = self.counters
        counters.datagrams_accepted += 1
        counters.udp_bytes_received += accepted.size
        if accepted.epoch > self._send_epoch and accepted.epoch in self._sealers:
            # The proxy uses newer keys: seal under them from now on (§8).
            self._send_epoch = accepted.epoch
            self._sealers = {e: s for e, s in self._sealers.items() if e >= accepted.epoch}

    def dropped(self, reason: DropReason, now: float) -> bool:
        """Count a drop under this session's conn_id; True if it rekeyed (output to send)."""
        name = reason.value
        drops = self.counters.datagram_drops
        drops[name] = drops.get(name, 0) + 1
        if reason is DropReason.BAD_TAG:
            self._bad_tags += 1
            if self._bad_tags >= self.rekey_after_bad_tags:
                # Someone is forging under this conn_id: move the session to a new one
                # (rm.keys, PROTOCOL.md §6.1). The old conn_id keeps working for the grace
                # period, then is refused; the session itself is never closed for it.
                self._bad_tags = 0
                self.counters.bad_tag_rekeys += 1
                self.rekey(now)
                return True
        return False

    def answer_probe(self, probe: Probe, now: float) -> None:
        sealer = self._sealers.get(self._send_epoch)
        if sealer is None:
            return
        address = self.address_for(OVERHEAD + 4 + probe.padding)
        if address is None:
            self.counters.probe_acks_over_budget += 1
            return
        try:
            sealed = sealer.seal(ProbeAck(probe_id=probe.probe_id, padding=probe.padding))
        except KeyExhausted:
            self.rekey(now)
            return
        self.counters.probe_acks_sent += 1
        self.send(sealed.data, address)

    # ------------------------------------------------------------------ output

    def address_for(self, size: int) -> Address | None:
        """Where a datagram of ``size`` bytes may go now (charged to the budget); None: nowhere."""
        if self.intake is None:
            return None
        return self.intake.receiver.send_to(self._owner, size)

    def send(self, data: bytes, address: Address) -> None:
        counters = self.counters
        counters.udp_bytes_sent += len(data)
        counters.udp_datagrams_sent += 1
        self._datagrams.append(OutgoingDatagram(data, address))

    @property
    def pending(self) -> bool:
        """Datagrams wait for :meth:`take`."""
        return bool(self._datagrams)

    def take(self) -> list[OutgoingDatagram]:
        """The datagrams queued since the last call."""
        if not self._datagrams:
            return []
        out, self._datagrams = self._datagrams, []
        return out

    def close(self) -> None:
        """The session is over: its conn_ids are forgotten."""
        self._closed = True
        self.rekey_due = None
        if self._registered and self.intake is not None:
            self.intake.receiver.remove_session(self._owner)
            self._registered = False
