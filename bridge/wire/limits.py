"""Per-session limits of the data channel: a token bucket and the anti-amplification budget.

Theory of operation
===================

:class:`TokenBucket` caps how many datagrams per second one session may make us
*decrypt*. It holds at most ``burst`` tokens, refills at ``rate`` tokens per second
of the ``now`` values it is given, and each datagram takes one. It runs before the
AEAD, so a peer holding a valid conn_id (a rogue miner, or anyone on path) cannot
make us spend unbounded CPU.

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

__all__ = ["Address", "AddressBudget", "TokenBucket"]

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
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False


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
