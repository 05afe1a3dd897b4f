"""The sidecar's share ledger: no share reaches the pool twice (PROTOCOL.md C6), sans-IO.

A SHARE or SHARE_BATCH record and a TLS ``mining.submit`` go through one duplicate
table per session, keyed by ``(channel, job handle, extranonce2, ntime, nonce,
version bits)`` (a TLS share whose job id has no handle uses the job id string
instead of the handle): a share seen before is answered from its cached verdict,
or waits for the pending one (at most :data:`MAX_WAITERS_PER_SHARE` copies), and
never reaches the pool twice. The table is an LRU of ``size`` entries. How the
verdicts go back is :mod:`bridge.relay.sidecar.verdicts`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final

from msgspec import UNSET, Raw, Struct, UnsetType, field

from bridge.bounded import BoundedMap
from bridge.relay.sidecar.counters import SidecarSessionCounters
from bridge.sv1.messages import NULL, RequestId, Response
from bridge.sv1.rejects import read_verdict, reject_reason_name

#: Shares remembered per session for duplicate detection (LRU).
DEFAULT_SHARE_CACHE: Final = 65536
#: Copies of one in-flight share that may wait for its verdict.
MAX_WAITERS_PER_SHARE: Final = 64
#: The verdict of a plain accept (``{"result":true,"error":null}``) in ``rm.results``.
PLAIN_ACCEPT: Final = 1

UdpRef = tuple[int, int, int]
"""A share record on the data channel: (key epoch, packet number, index in the datagram)."""
ShareKey = tuple[Any, ...]


class Verdict(Struct, frozen=True):
    """A pool's answer to a submit without its id: the ``verdict`` of a rm.results entry."""

    result: Raw | UnsetType = UNSET
    error: Raw = NULL
    reject_reason: str | UnsetType = field(default=UNSET, name="reject-reason")


class ShareEntry:
    """One distinct share: pending with the pool, or judged (then its verdict is cached)."""

    __slots__ = ("ch", "response", "tls_ids", "udp_refs", "urgent", "verdict")

    def __init__(self, ch: int) -> None:
        self.ch = ch
        self.response: Response | None = None
        self.verdict: Any = None  # PLAIN_ACCEPT or a Verdict once judged
        self.udp_refs: list[UdpRef] = []
        self.tls_ids: list[RequestId] = []
        self.urgent = False

    @property
    def waiters(self) -> int:
        return len(self.udp_refs) + len(self.tls_ids)

    def wait(self, ref: UdpRef | None, request_id: RequestId) -> None:
        """One more copy waits for the verdict: a UDP record (``ref``) or a TLS request."""
        if ref is not None:
            self.udp_refs.append(ref)
        else:
            self.tls_ids.append(request_id)


class Copy(Enum):
    """What became of a copy of a share already in the ledger."""

    CACHED = "cached"
    """Judged already: answer it with the cached verdict."""
    JOINED = "joined"
    """Still with the pool: it waits for the verdict with the first copy."""
    REFUSED = "refused"
    """Too many copies wait already."""


class ShareLedger:
    """One session's duplicate table (an LRU of ``size`` distinct shares) and its verdict counts."""

    def __init__(self, counters: SidecarSessionCounters, size: int = DEFAULT_SHARE_CACHE) -> None:
        self.size = size
        self._shares: BoundedMap[ShareKey, ShareEntry] = BoundedMap(size)
        self.counters = counters

    def __len__(self) -> int:
        return len(self._shares)

    def find(self, key: ShareKey | None) -> ShareEntry | None:
        return None if key is None else self._shares.get(key)

    def forwarded_share(self, key: ShareKey | None, entry: ShareEntry) -> None:
        """``entry`` went to the pool; remember it under ``key`` (None: not comparable, not kept)."""
        self.counters.shares_forwarded += 1
        if key is not None:
            self._shares[key] = entry

    def copy(self, entry: ShareEntry, key: ShareKey, ref: UdpRef | None, request_id: RequestId, urgent: bool) -> Copy:
        """Another copy of the share ``entry`` (a retransmission, the TLS copy of a block candidate)."""
        self._shares.refresh(key)
        if entry.verdict is not None:
            self.counters.duplicates_from_cache += 1
            return Copy.CACHED
        self.counters.duplicates_joined += 1
        if entry.waiters >= MAX_WAITERS_PER_SHARE:
            return Copy.REFUSED
        entry.urgent = entry.urgent or urgent
        entry.wait(ref, request_id)
        return Copy.JOINED

    def judge(self, entry: ShareEntry, response: Response) -> str | None:
        """The pool's verdict for ``entry``: cache it; the reject reason's name (None: accepted)."""
        reason: str | None = None
        counters = self.counters
        if response.accepted:
            counters.accepted += 1
        else:
            counters.rejected += 1
            reason = reject_reason_name(read_verdict(response).code)
            counters.rejected_by_reason[reason] = counters.rejected_by_reason.get(reason, 0) + 1
        plain = response.accepted and bytes(response.error) == b"null" and response.reject_reason is UNSET
        entry.response = response
        entry.verdict = PLAIN_ACCEPT if plain else Verdict(response.result, response.error, response.reject_reason)
        return reason

    def clear(self) -> None:
        self._shares.clear()
