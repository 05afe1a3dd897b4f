"""Per-session limits of the data channel: decryption budgets and the anti-amplification budget.

Theory of operation
===================

:class:`TokenBucket` holds at most ``burst`` tokens, refills at ``rate`` tokens per
second of the ``now`` values it is given, and each datagram takes one.

:class:`SourceBudgets` is a session's *decryption* budget, split by source address
(bridge/wire/PROTOCOL.md §6.1). The conn_id travels in clear, so anyone on path can
send datagrams under a live conn_id with wrong tags; one bucket per session would let
them use up the budget and push the honest proxy's shares off UDP. Instead:

- an address that has delivered an authenticated datagram carrying the session's
  newest packet number is **trusted**: it gets a bucket of its own (``rate``,
  ``burst``). At most ``max_trusted`` addresses are kept, least recently
  authenticated first out, so the state is bounded whatever a peer sends;
- every other source (**strangers**) shares one small bucket (``stranger_rate``,
  ``stranger_burst``). It exists for the proxy's first datagram and for NAT
  rebinding; a flood from forged addresses only ever empties this bucket;
- a datagram that **authenticates refunds** the token it took (:meth:`TokenBucket.refund`,
  up to ``burst``). The budget is thus spent only on datagrams that fail the AEAD,
  and the honest peer's own datagrams pass at whatever rate it sends them: its
  budget scales with its honest rate instead of stopping at ``rate``. The refund
  cannot be earned by a forger: each packet number authenticates once (the replay
  window is checked before the budget and committed after the tag), so refunds never
  exceed the datagrams the key holder sealed.

The budget is checked before the AEAD, so a flood under a valid conn_id costs at most
``rate`` failed decryptions per second per trusted address plus ``stranger_rate``, on
top of the peer's own datagrams. What it cannot tell apart is a forger who spoofs the
trusted address itself: that one empties the proxy's bucket, and the honest shares
then compete with it for the refill (they fall back to TLS, nothing is lost).

:class:`AddressBudget` is the sidecar's view of where a session's proxy is, and how
many bytes it may still send there. The rules (QUIC's RFC 9000 §8 and WireGuard's
roaming, made stricter):

- The address is learned, and re-learned after NAT rebinding, **only** from a
  datagram that authenticated, and only when that datagram carried the highest
  packet number seen so far under the session's current key. A replayed or late
  datagram from elsewhere can therefore never move the session.
- Bytes sent to the address never exceed ``factor`` (default 1.0) times the bytes
  of authenticated datagrams received from it since it was learned. Re-learning
  starts both counts afresh, so nothing earned at one address is spent at another.
- An unauthenticated datagram never earns a byte, so the sidecar never answers one.

Both are sans-IO: time is a ``now: float`` argument (seconds, any monotonic origin);
a clock going backwards refills nothing.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from bridge.bounded import BoundedMap

__all__ = ["Address", "AddressBudget", "SourceBudgets", "TokenBucket"]

#: A socket address as the UDP driver reports it: ``(host, port)`` or, for IPv6,
#: ``(host, port, flowinfo, scope_id)``. Compared for equality only.
Address: TypeAlias = tuple[Any, ...]


class TokenBucket:
    """``rate`` events per second on average, up to ``burst`` at once. Starts full."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last: float | None = None

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def tokens(self, now: float) -> float:
        """How many tokens are available at ``now`` (does not take any)."""
        self._refill(now)
        return self._tokens

    def _refill(self, now: float) -> None:
        last = self._last
        if last is None:
            self._last = now
            return
        elapsed = now - last
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._last = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if available at ``now``; True if they were."""
        last = self._last  # _refill, inlined: this runs for every datagram of a flood
        if last is None:
            self._last = now
        elif now > last:
            self._tokens = min(self._burst, self._tokens + (now - last) * self._rate)
            self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def refund(self, cost: float = 1.0) -> None:
        """Give back ``cost`` tokens taken for an event that turned out to be free (never above ``burst``)."""
        tokens = self._tokens + cost
        self._tokens = tokens if tokens < self._burst else self._burst


class SourceBudgets:
    """A session's decryption budgets: one bucket per trusted address, one shared by strangers."""

    __slots__ = ("_burst", "_rate", "_strangers", "_trusted")

    def __init__(self, rate: float, burst: float, stranger_rate: float, stranger_burst: float, max_trusted: int = 4) -> None:
        if max_trusted < 1:
            raise ValueError("max_trusted must be at least 1")
        TokenBucket(rate, burst)  # validate early
        self._rate = rate
        self._burst = burst
        self._strangers = TokenBucket(stranger_rate, stranger_burst)
        self._trusted: BoundedMap[Address, TokenBucket] = BoundedMap(max_trusted)

    @property
    def trusted(self) -> tuple[Address, ...]:
        """The trusted addresses, least recently authenticated first."""
        return tuple(self._trusted)

    def take(self, address: Address, now: float) -> TokenBucket | None:
        """Take a token for one decryption of a datagram from ``address``.

        Returns the bucket it came from (to :meth:`TokenBucket.refund` it when the
        datagram authenticates), or None when that bucket is empty: over budget.
        """
        bucket = self._trusted.get(address) or self._strangers
        return bucket if bucket.take(now) else None

    def authenticated(self, address: Address, *, newest: bool) -> None:
        """``address`` delivered an authenticated datagram (``newest``: the highest pn so far)."""
        trusted = self._trusted
        bucket = trusted.get(address)
        if bucket is None:
            if not newest:
                return  # a late or copied datagram earns no trust
            bucket = TokenBucket(self._rate, self._burst)
        trusted.put(address, bucket)  # most recent last; the least recent goes beyond max_trusted


class AddressBudget:
    """A session's learned peer address and the bytes we may still send to it."""

    __slots__ = ("_address", "_changes", "_factor", "_received", "_sent")

    def __init__(self, factor: float = 1.0) -> None:
        if factor <= 0:
            raise ValueError("the amplification factor must be positive")
        self._factor = factor
        self._address: Address | None = None
        self._received = 0
        self._sent = 0
        self._changes = 0

    @property
    def address(self) -> Address | None:
        """Where the peer is, as far as authenticated datagrams tell; None before the first."""
        return self._address

    @property
    def received(self) -> int:
        """Authenticated bytes received from :attr:`address` since it was learned."""
        return self._received

    @property
    def sent(self) -> int:
        """Bytes sent to :attr:`address` since it was learned."""
        return self._sent

    @property
    def changes(self) -> int:
        """How many times an address was learned (the first time included)."""
        return self._changes

    @property
    def allowance(self) -> int:
        """Bytes that may still be sent to :attr:`address`."""
        return max(0, int(self._received * self._factor) - self._sent)

    def on_authenticated(self, address: Address, size: int, *, newest: bool) -> bool:
        """Account an authenticated ``size``-byte datagram from ``address``.

        ``newest`` is True when its packet number is the highest seen under the
        session's current key. Returns True if the address was (re-)learned.
        """
        if address == self._address:
            self._received += size
            return False
        if not newest:
            return False  # late or reordered datagram from an old path: earns nothing
        self._address = address
        self._received = size
        self._sent = 0
        self._changes += 1
        return True

    def try_spend(self, size: int) -> Address | None:
        """Charge ``size`` bytes about to be sent; return the address, or None if over budget."""
        if self._address is None or size > self.allowance:
            return None
        self._sent += size
        return self._address
