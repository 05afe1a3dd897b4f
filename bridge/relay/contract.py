"""The contract between a sans-IO core and its trio driver.

A core is a state machine: it does no I/O and reads no clock. Its driver moves
bytes, keeps time and follows the same steps for every core:

1. **Inputs.** The driver feeds what happened with the current time ``now``,
   the only clock a core ever sees: ``receive_data(data, now)`` for bytes read
   from a stream, ``receive_datagram(data, address, now)`` for a datagram, and a
   method named for anything else (a pool connection opened, a check failed).
2. **Outputs.** After every input it takes what the core queued:
   :meth:`ConnectionCore.data_to_send` (stream bytes) and
   :meth:`DatagramCore.datagrams_to_send` (datagrams, with their addresses where
   the socket is not connected to one peer).
3. **Time.** It sleeps until :meth:`TimerCore.get_timer` (``None``: nothing is
   due), then calls :meth:`TimerCore.handle_timer` with ``now``, and takes the
   outputs again. It asks :meth:`~TimerCore.get_timer` again after every input: an
   input may move the deadline either way.
4. **The end.** :meth:`ConnectionCore.connection_lost` when the transport broke or
   the peer closed it; :meth:`ConnectionCore.close` to close deliberately (the
   core queues its goodbye, if its protocol has one). Either way ``close_reason``
   is set from then on, and the driver closes the transport once it has written
   what is queued.
5. **Statistics.** :meth:`ConnectionCore.statistics` is a frozen snapshot.

A core that owns many connections and asks its driver to open and close them
(:class:`~bridge.relay.proxy.ProxyCore`, in the mitmproxy style) is an
:class:`EventCore`: every input, the timer included, is an event fed to
:meth:`EventCore.handle` with ``now``, and its outputs are the commands that call
returns, to be carried out in order. Its :meth:`~EventCore.get_timer` is the same
as above; the timer event is fed when it comes.

The names follow aioquic's ``QuicConnection``. Cores that follow it:
:class:`~bridge.relay.rm_upstream.StratumRMConnection` (the proxy side of
StratumRM), :class:`~bridge.relay.sidecar.session.SidecarSession` (the sidecar side),
:class:`~bridge.relay.proxy.ProxyCore` (the proxy, an event core) and the
two cores it owns, :class:`~bridge.relay.miner_channel.MinerChannel` (one rig)
and :class:`~bridge.relay.failover.FailoverPolicy` (whose timer's decisions
:meth:`~bridge.relay.failover.FailoverPolicy.take_actions` hands over),
:class:`~bridge.relay.sidecar.intake.SidecarIntake` (the sidecar's UDP intake),
:class:`~bridge.relay.health.HealthWatch` and
:class:`~bridge.relay.health.SubscribeCheck` (pool health); the conformance is
type-checked at the bottom of this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

DatagramT_co = TypeVar("DatagramT_co", covariant=True)
EventT_contra = TypeVar("EventT_contra", contravariant=True)
CommandT_co = TypeVar("CommandT_co", covariant=True)


@runtime_checkable
class TimerCore(Protocol):
    """A core with deadlines."""

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due (the driver's clock); None: nothing is due."""
        ...

    def handle_timer(self, now: float) -> None:
        """The deadline :meth:`get_timer` gave has come; it is ``now``."""
        ...


@runtime_checkable
class ConnectionCore(TimerCore, Protocol):
    """A core for one connection: a byte stream, deadlines, an end and statistics."""

    close_reason: str | None
    """Why the connection is over (the driver closes the transport); None while it is not."""

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes read from the stream."""
        ...

    def data_to_send(self) -> bytes:
        """Stream bytes queued since the last call."""
        ...

    def close(self, reason: str, now: float) -> None:
        """Close deliberately for ``reason``."""
        ...

    def connection_lost(self, reason: str, now: float) -> None:
        """The transport broke or the peer closed it."""
        ...

    def statistics(self) -> object:
        """A frozen snapshot of the core's counters."""
        ...


@runtime_checkable
class DatagramCore(ConnectionCore, Protocol[DatagramT_co]):
    """A connection core that also sends datagrams."""

    def datagrams_to_send(self, now: float) -> Sequence[DatagramT_co]:
        """Datagrams queued until ``now``, in order (what goes out counts from ``now``)."""
        ...


@runtime_checkable
class EventCore(Protocol[EventT_contra, CommandT_co]):
    """A core fed events (its timer's included) that answers each with commands."""

    def get_timer(self) -> float | None:
        """When the timer event is next due (the driver's clock); None: nothing is due."""
        ...

    def handle(self, event: EventT_contra, now: float) -> Sequence[CommandT_co]:
        """Feed one event that happened at ``now``; the commands to carry out, in order."""
        ...


if TYPE_CHECKING:  # mypy checks that the cores follow the contract
    from bridge.relay.failover import FailoverPolicy
    from bridge.relay.health import HealthWatch, SubscribeCheck
    from bridge.relay.miner_channel import MinerChannel
    from bridge.relay.proxy import Command, Event, ProxyCore
    from bridge.relay.rm_upstream import StratumRMConnection
    from bridge.relay.sidecar.intake import OutgoingDatagram, SidecarIntake
    from bridge.relay.sidecar.session import SidecarSession

    def _conformance(
        proxy_side: StratumRMConnection,
        sidecar_side: SidecarSession,
        intake: SidecarIntake,
        watch: HealthWatch,
        check: SubscribeCheck,
        proxy: ProxyCore,
        rig: MinerChannel,
        policy: FailoverPolicy,
    ) -> None:
        _proxy_side: DatagramCore[bytes] = proxy_side
        _sidecar_side: DatagramCore[OutgoingDatagram] = sidecar_side
        _intake: TimerCore = intake
        _watch: TimerCore = watch
        _check: TimerCore = check
        _proxy: EventCore[Event, Command] = proxy
        _rig: TimerCore = rig
        _policy: TimerCore = policy
