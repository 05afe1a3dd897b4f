"""The sidecar's share ledger: no share reaches the pool twice (PROTOCOL.md C6), sans-IO.

A SHARE or SHARE_BATCH record and a TLS ``mining.submit`` go through one duplicate
table per session, keyed by ``(channel, job handle, extranonce2, ntime, nonce,
version bits)`` (a TLS share whose job id has no handle uses the job id string
instead of the handle): a share seen before is answered from its cached verdict,
or waits for the pending one (at most :data:`MAX_WAITERS_PER_SHARE` copies), and
never reaches the pool twice. How the verdicts go back is
:mod:`bridge.relay.sidecar.verdicts`.

The table is two generations of plain dicts: shares seen (forwarded, or a copy) go in
the young one; every ``horizon / 2`` seconds, or when the young one holds ``size / 2``
shares, the young one becomes the old one and the old one is forgotten. A share is kept
at least ``horizon / 2`` seconds after it was last seen, and at least until ``size / 2``
newer shares came, with no time or order kept per share.

The table is the one thing in a sidecar that grows with the share rate rather than the
rig count, so it is kept small: a key is one bytes object (:func:`share_key`), a share
with the pool is a :class:`ShareEntry`, and a judged one is its verdict alone (a plain
accept is the constant :data:`PLAIN_ACCEPT`). About 110 B a share, 14 MB when full at
the default size (with a tuple key, an entry kept with the pool's response and two
lists in an LRU, 760 B: 50 MB for half as many).
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Any, Final

from msgspec import UNSET, Raw, Struct, UnsetType, field

from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.sv1.messages import NULL, TRUE, RequestId, Response
from bridge.sv1.rejects import read_verdict, reject_reason_name

#: Shares remembered per session at most, in two generations of half this each.
DEFAULT_SHARE_CACHE: Final = 131072
#: Twice the seconds a share surely stays in the table after it was last seen. Its copies
#: come while the proxy still waits for its verdict, at most the proxy's submit timeout
#: (60 s). A small farm's table holds its last one to two minutes of shares, not
#: :data:`DEFAULT_SHARE_CACHE` of them.
DEFAULT_SHARE_HORIZON: Final = 120.0
#: Copies of one in-flight share that may wait for its verdict.
MAX_WAITERS_PER_SHARE: Final = 64
#: The verdict of a plain accept (``{"result":true,"error":null}``) in ``rm.results``.
PLAIN_ACCEPT: Final = 1

UdpRef = tuple[int, int, int]
"""A share record on the data channel: (key epoch, packet number, index in the datagram)."""
ShareKey = bytes
"""A share's place in the duplicate table (:func:`share_key`)."""

_KEY_HEAD = struct.Struct("<IIIqI")


def share_key(ch: int, job: int | str, extranonce2: bytes, ntime: int, nonce: int, version_bits: int | None) -> ShareKey:
    """The duplicate-table key of a share: channel, job (its handle, or a job id string
    that has none), extranonce2, ntime, nonce and version bits, in one bytes object (a
    tuple of them is about 230 B). The same share gives the same key by UDP and by TLS."""
    head = _KEY_HEAD.pack(ch, ntime, nonce, -1 if version_bits is None else version_bits, len(extranonce2))
    if isinstance(job, int):
        return head + extranonce2 + b"h" + job.to_bytes(8, "little")
    return head + extranonce2 + b"j" + job.encode()


class Verdict(Struct, frozen=True):
    """A pool's answer to a submit without its id: the ``verdict`` of a rm.results entry."""

    result: Raw | UnsetType = UNSET
    error: Raw = NULL
    reject_reason: str | UnsetType = field(default=UNSET, name="reject-reason")


class ShareEntry:
    """One distinct share with the pool: the copies that wait for its verdict (once
    judged, the table keeps the verdict alone)."""

    __slots__ = ("ch", "key", "tls_ids", "udp_refs", "urgent")

    def __init__(self, ch: int, key: ShareKey | None) -> None:
        self.ch = ch
        self.key = key
        self.udp_refs: list[UdpRef] | None = None
        self.tls_ids: list[RequestId] | None = None
        self.urgent = False

    @property
    def waiters(self) -> int:
        return len(self.udp_refs or ()) + len(self.tls_ids or ())

    def wait(self, ref: UdpRef | None, request_id: RequestId) -> None:
        """One more copy waits for the verdict: a UDP record (``ref``) or a TLS request."""
        if ref is not None:
            if self.udp_refs is None:
                self.udp_refs = [ref]
            else:
                self.udp_refs.append(ref)
        elif self.tls_ids is None:
            self.tls_ids = [request_id]
        else:
            self.tls_ids.append(request_id)


def verdict_fields(verdict: Any) -> tuple[Raw | UnsetType, Raw, str | UnsetType]:
    """A cached verdict's result, error and reject reason, for a TLS answer."""
    if verdict is PLAIN_ACCEPT:
        return TRUE, NULL, UNSET
    return verdict.result, verdict.error, verdict.reject_reason


class Copy(Enum):
    """What became of a copy of a share already in the ledger."""

    CACHED = "cached"
    """Judged already: answer it with the cached verdict."""
    JOINED = "joined"
    """Still with the pool: it waits for the verdict with the first copy."""
    REFUSED = "refused"
    """Too many copies wait already."""


class ShareLedger:
    """One session's duplicate table (see the module docs) and its verdict counts."""

    def __init__(
        self, counters: SidecarSessionCounters, size: int = DEFAULT_SHARE_CACHE, horizon: float = DEFAULT_SHARE_HORIZON
    ) -> None:
        self.size = size
        self.horizon = horizon
        self.counters = counters
        #: Each: a share with the pool (its ShareEntry) or judged (its verdict), by key.
        self._young: dict[ShareKey, Any] = {}
        self._old: dict[ShareKey, Any] = {}
        self._generation = max(1, size // 2)
        self._rotated_at: float | None = None

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def _rotate(self, now: float) -> None:
        self._old = self._young
        self._young = {}
        self._rotated_at = now

    def expire(self, now: float) -> None:
        """Forget the old generation when the young one is ``horizon / 2`` seconds old."""
        if self._rotated_at is None:
            self._rotated_at = now
        elif now - self._rotated_at >= self.horizon / 2:
            self._rotate(now)

    def _seen(self, key: ShareKey, value: Any, now: float) -> None:
        self.expire(now)
        if len(self._young) >= self._generation and key not in self._young:
            self._rotate(now)
        self._young[key] = value

    def find(self, key: ShareKey | None) -> Any:
        """What the table holds for ``key``: a :class:`ShareEntry` (with the pool), a verdict, or None."""
        if key is None:
            return None
        found = self._young.get(key)
        return self._old.get(key) if found is None else found

    def forwarded_share(self, entry: ShareEntry, now: float) -> None:
        """``entry`` went to the pool; remember it under its key (None: not comparable, not kept)."""
        self.counters.shares_forwarded += 1
        if entry.key is not None:
            self._seen(entry.key, entry, now)

    def copy(self, found: Any, key: ShareKey, ref: UdpRef | None, request_id: RequestId, urgent: bool, now: float) -> Copy:
        """Another copy of a share the table holds (``found``: its entry or its verdict): a
        retransmission, the TLS copy of a block candidate. It counts as seen again."""
        self._old.pop(key, None)
        self._seen(key, found, now)
        if type(found) is not ShareEntry:
            self.counters.duplicates_from_cache += 1
            return Copy.CACHED
        entry = found
        self.counters.duplicates_joined += 1
        if entry.waiters >= MAX_WAITERS_PER_SHARE:
            return Copy.REFUSED
        entry.urgent = entry.urgent or urgent
        entry.wait(ref, request_id)
        return Copy.JOINED

    def judge(self, entry: ShareEntry, response: Response) -> tuple[Any, str | None]:
        """The pool's verdict for ``entry``, cached in its place; the verdict and the reject
        reason's name (None: accepted)."""
        reason: str | None = None
        counters = self.counters
        if response.accepted:
            counters.accepted += 1
        else:
            counters.rejected += 1
            reason = reject_reason_name(read_verdict(response).code)
            counters.rejected_by_reason[reason] = counters.rejected_by_reason.get(reason, 0) + 1
        plain = response.accepted and bytes(response.error) == b"null" and response.reject_reason is UNSET
        verdict = PLAIN_ACCEPT if plain else Verdict(response.result, response.error, response.reject_reason)
        key = entry.key
        if key is not None:
            for generation in (self._young, self._old):
                if generation.get(key) is entry:  # not forgotten meanwhile
                    generation[key] = verdict
                    break
        return verdict, reason

    def clear(self) -> None:
        self._young = {}
        self._old = {}
