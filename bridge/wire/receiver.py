"""The data-channel receive pipeline: bytes and an address in, a datagram or a drop reason out.

Theory of operation
===================

One :class:`DatagramReceiver` serves every session of one UDP socket (the sidecar
has many proxies on one port; a proxy has one session per sidecar). A session is a
caller-chosen hashable key plus up to two :class:`~bridge.wire.keys.Opener` objects:
the current key epoch and, for ``grace`` seconds after a rekey, the previous one.
Each opener is found by its own conn_id.

Every datagram goes through the checks cheapest-first, and the first failing check
decides the drop reason (:class:`~bridge.wire.datagram.DropReason`):

1. length: at least 32 bytes (header + tag), at most 1200  -> ``truncated``, ``oversized``
2. version nibble == 2                                      -> ``bad version``
3. type: defined, and one this role receives               -> ``unknown type``, ``unexpected type``
4. flags: no reserved bit; URGENT only on shares           -> ``bad flags``
5. length against the type's smallest body                 -> ``truncated``
6. conn_id lookup (dict)                                   -> ``unknown conn_id``
7. a previous epoch past its grace period                  -> ``key expired``
8. KEY_PHASE bit == epoch parity                           -> ``wrong key phase``
9. replay window pre-check (no state change)               -> ``replayed``, ``too old``
10. the session's decryption budget for this source       -> ``rate limited``
    (a bucket per trusted address, one shared by strangers: see
    :class:`~bridge.wire.limits.SourceBudgets`)
11. AEAD open, header as associated data                   -> ``bad tag``
12. refund of the token (an authenticated datagram is free), replay window commit
    (only now: the tag verified)
13. address learning, trust of the source, amplification credit (:mod:`bridge.wire.limits`)
14. body decode                                            -> ``malformed``

Nothing before step 11 changes any state except counters and the token buckets, so
an unauthenticated datagram can neither slide the window, nor move the session to
another address, nor earn its source a budget of its own. Every drop is counted by reason; :meth:`DatagramReceiver.statistics`
returns a frozen snapshot. Nothing here ever raises on received bytes.

Sending is the caller's business, except for one rule enforced here: the sidecar
asks :meth:`DatagramReceiver.send_to` for the address and permission before every
datagram it sends, which charges the session's anti-amplification budget.

No I/O, no clock: ``now`` (seconds, monotonic) is passed in.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable
from typing import Final

import msgspec

from bridge.wire.datagram import (
    MAX_DATAGRAM_SIZE,
    MIN_BODY_SIZE,
    OVERHEAD,
    PROTOCOL_VERSION,
    Body,
    DatagramDecodeError,
    DatagramType,
    DropReason,
    Flags,
    Header,
    decode_body,
)
from bridge.wire.keys import Opener, Role
from bridge.wire.limits import Address, AddressBudget, SourceBudgets
from bridge.wire.replay import Rejection

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_TRUSTED",
    "DEFAULT_RATE",
    "DEFAULT_STRANGER_BURST",
    "DEFAULT_STRANGER_RATE",
    "RECEIVED_TYPES",
    "Accepted",
    "DatagramReceiver",
    "Dropped",
    "ReceiverStatistics",
    "SessionStatistics",
]

#: Seconds the previous key epoch stays acceptable after a rekey.
DEFAULT_GRACE: Final = 2.0
#: Failed decryptions per second and burst one trusted source address of a session may
#: cost us (an address that delivered an authenticated datagram). Datagrams that
#: authenticate give their token back, so the peer's own rate is not limited by it.
DEFAULT_RATE: Final = 1000.0
DEFAULT_BURST: Final = 1000.0
#: ... and what every other source of a session shares (first datagram, NAT rebinding).
DEFAULT_STRANGER_RATE: Final = 64.0
DEFAULT_STRANGER_BURST: Final = 64.0
#: Trusted addresses kept per session (least recently authenticated out first).
DEFAULT_MAX_TRUSTED: Final = 4

#: Which datagram types each role accepts.
RECEIVED_TYPES: Final[dict[Role, frozenset[DatagramType]]] = {
    Role.SIDECAR: frozenset({DatagramType.SHARE, DatagramType.SHARE_BATCH, DatagramType.PROBE, DatagramType.PROBE_ACK}),
    Role.PROXY: frozenset({DatagramType.PROBE, DatagramType.PROBE_ACK, DatagramType.ACK, DatagramType.VERDICT}),
}
_SHARE_TYPES: Final = frozenset({DatagramType.SHARE, DatagramType.SHARE_BATCH})
_KNOWN_TYPES: Final = frozenset(int(t) for t in DatagramType)
_HEADER: Final = struct.Struct(">BBQHI")
_KEY_PHASE: Final = int(Flags.KEY_PHASE)
_UNKNOWN_CONN_ID: Final = DropReason.UNKNOWN_CONN_ID


class Accepted(msgspec.Struct, frozen=True):
    """An authenticated, decoded datagram."""

    session: Hashable
    header: Header
    body: Body
    address: Address
    #: True when this datagram (re-)learned the session's address.
    address_changed: bool
    #: The key epoch the datagram was sealed under (the sidecar switches its own
    #: sending to a new epoch once the proxy has used it).
    epoch: int
    size: int


class Dropped(msgspec.Struct, frozen=True):
    """A datagram that was dropped, why, and the session when the conn_id was known."""

    reason: DropReason
    session: Hashable | None = None


class ReceiverStatistics(msgspec.Struct, frozen=True):
    """A snapshot of the receiver's counters."""

    datagrams: int
    bytes: int
    accepted: int
    accepted_bytes: int
    #: Every drop reason's value, zeros included.
    dropped: dict[str, int]
    sessions: int
    addresses_learned: int

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class SessionStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one session's counters."""

    epoch: int
    conn_id: int
    accepted: int
    accepted_bytes: int
    bad_tags: int
    rate_limited: int
    address: Address | None
    #: Source addresses with a decryption budget of their own (§6.1).
    trusted_addresses: int
    addresses_learned: int
    bytes_sent: int
    send_allowance: int


class _Session:
    __slots__ = (
        "accepted",
        "accepted_bytes",
        "bad_tags",
        "bucket",
        "budget",
        "current",
        "drops",
        "key",
        "previous",
        "rate_limited",
    )

    def __init__(self, key: Hashable, opener: Opener, bucket: SourceBudgets, budget: AddressBudget) -> None:
        self.key = key
        self.current = opener
        self.previous: _Entry | None = None
        self.bucket = bucket
        self.budget = budget
        self.accepted = 0
        self.accepted_bytes = 0
        self.bad_tags = 0
        self.rate_limited = 0
        #: One Dropped per reason, made on first use (a flood allocates nothing per datagram).
        self.drops: dict[DropReason, Dropped] = {}


class _Entry:
    """What a conn_id points at."""

    __slots__ = ("opener", "retire_at", "session")

    def __init__(self, session: _Session, opener: Opener, retire_at: float | None) -> None:
        self.session = session
        self.opener = opener
        self.retire_at = retire_at


class DatagramReceiver:
    """The cheapest-first receive pipeline for every session on one socket.

    ``role`` decides which types are accepted. ``rate``/``burst`` configure the
    decryption budget of each trusted source address of a session,
    ``stranger_rate``/``stranger_burst`` the one all other sources of a session
    share, ``max_trusted`` how many trusted addresses a session keeps, ``grace`` how long a previous key epoch is still
    accepted after :meth:`rekey`, and ``amplification_factor`` the sending budget
    (bytes sent per authenticated byte received from an address).
    """

    def __init__(
        self,
        role: Role,
        *,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        grace: float = DEFAULT_GRACE,
        amplification_factor: float = 1.0,
        stranger_rate: float = DEFAULT_STRANGER_RATE,
        stranger_burst: float = DEFAULT_STRANGER_BURST,
        max_trusted: int = DEFAULT_MAX_TRUSTED,
    ) -> None:
        if grace < 0:
            raise ValueError("grace must not be negative")
        SourceBudgets(rate, burst, stranger_rate, stranger_burst, max_trusted)  # validate early
        self.role = role
        self._rate = rate
        self._burst = burst
        self._stranger_rate = stranger_rate
        self._stranger_burst = stranger_burst
        self._max_trusted = max_trusted
        self._grace = grace
        self._amplification_factor = amplification_factor
        allowed_by_type: dict[int, tuple[int, int]] = {}
        for dtype in RECEIVED_TYPES[role]:
            flags = int(Flags.KEY_PHASE | Flags.URGENT) if dtype in _SHARE_TYPES else int(Flags.KEY_PHASE)
            allowed_by_type[int(dtype)] = (OVERHEAD + MIN_BODY_SIZE[dtype], flags)
        self._rules = allowed_by_type
        # Every acceptable (first byte, flags) pair -> the smallest datagram of its type:
        # one lookup does checks 2-4 for a plausible header; the rest take _header_drop.
        self._fast: dict[int, int] = {}
        for type_value, (min_size, allowed_flags) in allowed_by_type.items():
            first = PROTOCOL_VERSION << 4 | type_value
            for flags in range(256):
                if not flags & ~allowed_flags:
                    self._fast[first << 8 | flags] = min_size
        self._entries: dict[int, _Entry] = {}
        self._sessions: dict[Hashable, _Session] = {}
        self._datagrams = 0
        self._bytes = 0
        self._accepted = 0
        self._accepted_bytes = 0
        self._dropped: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self._addresses_learned = 0
        self._anonymous_drops = {reason: Dropped(reason) for reason in DropReason}
        self._unknown_conn_id = self._anonymous_drops[_UNKNOWN_CONN_ID]

    # ---------------------------------------------------------------- sessions

    def add_session(self, session: Hashable, opener: Opener) -> None:
        """Start accepting datagrams for ``session`` under ``opener``'s conn_id."""
        if session in self._sessions:
            raise ValueError(f"session {session!r} already exists; use rekey()")
        if opener.conn_id in self._entries:
            raise ValueError(f"conn_id {opener.conn_id:016x} is already in use")
        budgets = SourceBudgets(self._rate, self._burst, self._stranger_rate, self._stranger_burst, self._max_trusted)
        state = _Session(session, opener, budgets, AddressBudget(self._amplification_factor))
        self._sessions[session] = state
        self._entries[opener.conn_id] = _Entry(state, opener, None)

    def rekey(self, session: Hashable, opener: Opener, now: float) -> None:
        """Make ``opener`` the session's current epoch; keep the old one ``grace`` seconds.

        An epoch still in its grace period from an earlier rekey is forgotten at once.
        """
        state = self._sessions[session]
        if opener.conn_id in self._entries:
            raise ValueError(f"conn_id {opener.conn_id:016x} is already in use")
        if opener.epoch <= state.current.epoch:
            raise ValueError(f"epoch {opener.epoch} does not follow epoch {state.current.epoch}")
        if state.previous is not None:
            self._entries.pop(state.previous.opener.conn_id, None)
        old_entry = self._entries[state.current.conn_id]
        old_entry.retire_at = now + self._grace
        state.previous = old_entry
        state.current = opener
        self._entries[opener.conn_id] = _Entry(state, opener, None)

    def remove_session(self, session: Hashable) -> None:
        """Forget ``session`` and all its conn_ids (no-op if unknown)."""
        state = self._sessions.pop(session, None)
        if state is None:
            return
        self._entries.pop(state.current.conn_id, None)
        if state.previous is not None:
            self._entries.pop(state.previous.opener.conn_id, None)

    def purge(self, now: float) -> None:
        """Forget previous epochs whose grace period is over (call at :meth:`next_deadline`)."""
        for state in self._sessions.values():
            previous = state.previous
            if previous is not None and previous.retire_at is not None and now >= previous.retire_at:
                self._forget(previous)

    def next_deadline(self) -> float | None:
        """When :meth:`purge` next has something to do, or None."""
        deadlines = [
            s.previous.retire_at for s in self._sessions.values() if s.previous is not None and s.previous.retire_at is not None
        ]
        return min(deadlines, default=None)

    def _forget(self, entry: _Entry) -> None:
        self._entries.pop(entry.opener.conn_id, None)
        if entry.session.previous is entry:
            entry.session.previous = None

    # ---------------------------------------------------------------- receiving

    def _drop(self, reason: DropReason, state: _Session | None = None) -> Dropped:
        self._dropped[reason] += 1
        if state is None:
            return self._anonymous_drops[reason]
        dropped = state.drops.get(reason)
        if dropped is None:
            dropped = state.drops[reason] = Dropped(reason, state.key)
        return dropped

    def _header_drop(self, first: int, flags: int) -> Dropped:
        """Why a header failed the fast check, in the documented order (checks 2-4)."""
        if first >> 4 != PROTOCOL_VERSION:
            return self._drop(DropReason.BAD_VERSION)
        dtype = first & 0x0F
        rule = self._rules.get(dtype)
        if rule is None:
            if dtype in _KNOWN_TYPES:
                return self._drop(DropReason.UNEXPECTED_TYPE)
            return self._drop(DropReason.UNKNOWN_TYPE)
        return self._drop(DropReason.BAD_FLAGS)

    def receive(self, data: bytes, address: Address, now: float) -> Accepted | Dropped:
        """Run one datagram from ``address`` through the pipeline at time ``now``."""
        size = len(data)
        self._datagrams += 1
        self._bytes += size
        if size < OVERHEAD:
            return self._drop(DropReason.TRUNCATED)
        if size > MAX_DATAGRAM_SIZE:
            return self._drop(DropReason.OVERSIZED)
        first, flags, conn_id, pn_high, pn_low = _HEADER.unpack_from(data)
        min_size = self._fast.get(first << 8 | flags)
        if min_size is None:
            return self._header_drop(first, flags)
        if size < min_size:
            return self._drop(DropReason.TRUNCATED)

        entry = self._entries.get(conn_id)
        if entry is None:  # the commonest forgery: counted inline, no call
            self._dropped[_UNKNOWN_CONN_ID] += 1
            return self._unknown_conn_id
        state = entry.session
        if entry.retire_at is not None and now >= entry.retire_at:
            self._forget(entry)
            return self._drop(DropReason.KEY_EXPIRED, state)
        opener = entry.opener
        if flags & _KEY_PHASE != opener.key_phase:
            return self._drop(DropReason.WRONG_KEY_PHASE, state)
        pn = pn_high << 32 | pn_low
        window = opener.window
        rejection = window.rejection(pn)
        if rejection is not None:
            reason = DropReason.REPLAYED if rejection is Rejection.REPLAYED else DropReason.TOO_OLD
            return self._drop(reason, state)
        charged = state.bucket.take(address, now)
        if charged is None:
            state.rate_limited += 1
            return self._drop(DropReason.RATE_LIMITED, state)
        plaintext = opener.open(data)
        if plaintext is None:
            state.bad_tags += 1
            return self._drop(DropReason.BAD_TAG, state)

        # Authenticated from here on: the peer's own datagram costs no budget (§6.1).
        charged.refund()
        newest = pn > window.highest and entry.retire_at is None
        window.commit(pn)
        state.bucket.authenticated(address, newest=newest)
        address_changed = state.budget.on_authenticated(address, size, newest=newest)
        if address_changed:
            self._addresses_learned += 1
        dtype = first & 0x0F
        try:
            body = decode_body(dtype, plaintext)
        except DatagramDecodeError:
            return self._drop(DropReason.MALFORMED, state)
        self._accepted += 1
        self._accepted_bytes += size
        state.accepted += 1
        state.accepted_bytes += size
        header = Header(type=dtype, conn_id=conn_id, pn=pn, flags=flags)
        return Accepted(state.key, header, body, address, address_changed, opener.epoch, size)

    # ---------------------------------------------------------------- sending

    def address_of(self, session: Hashable) -> Address | None:
        """The session's peer address as learned from authenticated datagrams."""
        return self._sessions[session].budget.address

    def send_to(self, session: Hashable, size: int) -> Address | None:
        """Charge ``size`` bytes against the session's anti-amplification budget.

        Returns the address to send to, or None when there is no learned address or
        the datagram would exceed the budget (then do not send it).
        """
        return self._sessions[session].budget.try_spend(size)

    # ---------------------------------------------------------------- statistics

    def statistics(self) -> ReceiverStatistics:
        """A frozen snapshot of the counters."""
        return ReceiverStatistics(
            datagrams=self._datagrams,
            bytes=self._bytes,
            accepted=self._accepted,
            accepted_bytes=self._accepted_bytes,
            dropped={reason.value: count for reason, count in self._dropped.items()},
            sessions=len(self._sessions),
            addresses_learned=self._addresses_learned,
        )

    def session_statistics(self, session: Hashable) -> SessionStatistics:
        """A frozen snapshot of one session's counters."""
        state = self._sessions[session]
        return SessionStatistics(
            epoch=state.current.epoch,
            conn_id=state.current.conn_id,
            accepted=state.accepted,
            accepted_bytes=state.accepted_bytes,
            bad_tags=state.bad_tags,
            rate_limited=state.rate_limited,
            address=state.budget.address,
            trusted_addresses=len(state.bucket.trusted),
            addresses_learned=state.budget.changes,
            bytes_sent=state.budget.sent,
            send_allowance=state.budget.allowance,
        )
