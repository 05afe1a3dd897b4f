"""Fault injection on the whole StratumRM chain, with a share tally.

reference pool  <-SV1-  sidecar  <=TLS control= [TcpRelay]  =  miner proxy  <-SV1-  rigs
                          ^------ UDP shares --- [LossyLink] --/

:func:`start_fault_bench` starts every role in its own cancel scope inside one
nursery, with a TCP relay on the control channel and a UDP relay on the share
channel (the sidecar advertises the relay's UDP port, as a sidecar behind NAT
advertises its public address), so a test can break any one piece and bring it
back:

- :meth:`FaultBench.kill_sidecar` / :meth:`~FaultBench.start_sidecar`: the
  sidecar dies without a word (every task cancelled, every socket closed, no
  goodbye on the control channel: what SIGKILL leaves its peers) and a fresh
  one, with no memory of the last, listens on the same ports;
- :meth:`FaultBench.restart_pool`: the pool resets every connection and stops
  listening, then serves again on its port;
- :meth:`FaultBench.reset_control`: every control connection through the relay
  gets a TCP reset on both sides;
- :meth:`FaultBench.blackhole_udp`: every datagram, both ways, is dropped for a
  while;
- :meth:`FaultBench.restart_proxy`: the miner proxy dies (every rig connection
  closed) and a fresh one listens on the same port;
- :meth:`FaultBench.jump_clock`: trio's clock leaps forward (a paused VM, a
  suspended host): every timer in every role falls due at once.

Run it under trio's autojump clock (``MockClock(autojump_threshold=0)``, the
``autojump_clock`` fixture): the rigs' hash rate cap makes them sleep between
chunks, so virtual time flows while they hash and a 30 s blackhole costs a
second of real time.

**The tally.** :func:`tally` reads the rigs and the pool after a scenario:
shares submitted by rigs, answered, accepted by the pool, told "accepted" but
never accepted by the pool (a lie: must be 0), and duplicated at the pool (the
same share reaching it twice: must be 0). :func:`tally_table` prints rows as
a markdown table (the test suite prints it in its terminal summary).
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
import trio
import trio.testing

from bridge.config import parse_upstream_url
from bridge.net.miner_proxy import MinerProxy
from bridge.net.sidecar import SidecarServer
from bridge.relay.failover import FailoverConfig
from bridge.sv1.rejects import DUPLICATE
from bridge.testing.lossy_link import Impairment, LossyLink
from bridge.testing.miner import Miner
from bridge.testing.pki import make_test_pki
from bridge.testing.pool import PoolConfig, ReferencePool

__all__ = [
    "FaultBench",
    "Tally",
    "TcpRelay",
    "share_keys",
    "start_fault_bench",
    "tally",
    "tally_table",
    "until",
]

_LINGER_RESET = struct.pack("ii", 1, 0)
_RECEIVE_SIZE = 65536


class _TaskStatus(Protocol):
    def started(self, value: Any = None) -> None: ...


async def until(condition: Callable[[], bool], step: float = 0.05) -> None:
    """Return once ``condition()`` holds (polled every ``step`` s); bound it with ``trio.fail_after``."""
    while not condition():
        await trio.sleep(step)


def share_keys(records: Iterable[Any]) -> set[tuple[Any, ...]]:
    """What makes a share unique at a pool, from miner or pool records."""
    return {(r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits) for r in records}


# ---------------------------------------------------------------------- relays


class Rewriter(Protocol):
    """Rewrites one relayed connection's bytes, each direction as a stream."""

    def to_target(self, data: bytes) -> bytes: ...

    def to_client(self, data: bytes) -> bytes: ...


class TcpRelayStatistics(msgspec.Struct, frozen=True):
    connections: int
    open: int
    resets: int
    bytes_to_target: int
    bytes_to_client: int


class _Leg:
    def __init__(self, client: trio.SocketStream, target: trio.SocketStream) -> None:
        self.client = client
        self.target = target
        self.scope = trio.CancelScope()


class TcpRelay:
    """A TCP relay to a fixed target: every accepted connection gets its own to the target.

    ``rewriter`` (a factory called once per connection) sees and may change every
    byte each way: an on-path attacker. :meth:`reset` ends every relayed
    connection with a TCP reset on both sides.
    """

    def __init__(self, target: tuple[str, int], *, rewriter: Callable[[], Rewriter] | None = None) -> None:
        self.target = target
        self.rewriter = rewriter
        self.port: int | None = None
        self._legs: set[_Leg] = set()
        self._connections = 0
        self._resets = 0
        self._bytes_to_target = 0
        self._bytes_to_client = 0

    def statistics(self) -> TcpRelayStatistics:
        return TcpRelayStatistics(self._connections, len(self._legs), self._resets, self._bytes_to_target, self._bytes_to_client)

    def reset(self) -> int:
        """Reset every relayed connection (RST both ways); return how many."""
        legs = list(self._legs)
        for leg in legs:
            for stream in (leg.client, leg.target):
                try:
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass
            leg.scope.cancel()
        self._resets += len(legs)
        return len(legs)

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status: _TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        for extra in listeners[1:]:
            await extra.aclose()
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners[:1])
            task_status.started(self.port)

    async def _handle(self, client: trio.SocketStream) -> None:
        self._connections += 1
        try:
            target = await trio.open_tcp_stream(*self.target)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        leg = _Leg(client, target)
        rewriter = self.rewriter() if self.rewriter is not None else None
        self._legs.add(leg)
        try:
            with leg.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._copy, client, target, rewriter.to_target if rewriter else None, True, nursery)
                    nursery.start_soon(self._copy, target, client, rewriter.to_client if rewriter else None, False, nursery)
        finally:
            self._legs.discard(leg)
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(target)

    async def _copy(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        rewrite: Callable[[bytes], bytes] | None,
        to_target: bool,
        nursery: trio.Nursery,
    ) -> None:
        try:
            while data := await source.receive_some(_RECEIVE_SIZE):
                if rewrite is not None:
                    data = rewrite(data)
                if to_target:
                    self._bytes_to_target += len(data)
                else:
                    self._bytes_to_client += len(data)
                if data:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        nursery.cancel_scope.cancel()  # one side gone: close both


# ---------------------------------------------------------------------- the bench


@dataclass
class _Running:
    scope: trio.CancelScope
    done: trio.Event


@dataclass
class FaultBench:
    """Handles on every role of a running chain, and the faults to inflict on them."""

    nursery: trio.Nursery
    pki: Any
    pool: ReferencePool
    pool_port: int
    sidecar: SidecarServer
    sidecar_port: int
    control: TcpRelay
    datagrams: LossyLink
    proxy: MinerProxy
    proxy_port: int
    clock: trio.testing.MockClock | None
    proxy_options: dict[str, Any]
    faults: list[str] = field(default_factory=list)
    _sidecar_run: _Running | None = None
    _proxy_run: _Running | None = None

    @property
    def miner_url(self) -> str:
        return f"stratum+tcp://127.0.0.1:{self.proxy_port}"

    def miner_url_xnsub(self) -> str:
        return self.miner_url + "#xnsub"

    async def kill_sidecar(self) -> None:
        """The sidecar process dies: every task and socket gone, nothing said to anyone."""
        self.faults.append("sidecar killed")
        await _stop(self._sidecar_run)
        self._sidecar_run = None

    async def start_sidecar(self) -> None:
        """A fresh sidecar (no state from the last one) on the same TCP and UDP port."""
        self.sidecar, self._sidecar_run = await _start_sidecar(
            self.nursery, self.pki, self.pool_port, self.sidecar_port, self.datagrams.port
        )
        self.faults.append("sidecar started")

    async def restart_pool(self, down_for: float = 0.0) -> None:
        """The pool resets every connection, stops listening, and serves again after ``down_for`` s."""
        self.faults.append("pool restarted")
        self.pool.kill()
        if down_for:
            await trio.sleep(down_for)
        await self.nursery.start(self.pool.serve, "127.0.0.1", self.pool_port)

    def reset_control(self) -> int:
        """TCP reset on every control connection, both sides."""
        self.faults.append("control reset")
        return self.control.reset()

    async def blackhole_udp(self, seconds: float) -> None:
        """Drop every datagram both ways for ``seconds``, then carry them again."""
        self.faults.append(f"UDP blackholed {seconds:g} s")
        self.datagrams.set_impairment(to_target=Impairment(loss=100.0), to_client=Impairment(loss=100.0))
        await trio.sleep(seconds)
        self.datagrams.set_impairment(to_target=Impairment(), to_client=Impairment())

    async def restart_proxy(self, down_for: float = 0.0) -> None:
        """The miner proxy dies (every rig connection closed); a fresh one listens on the same port."""
        self.faults.append("proxy restarted")
        await _stop(self._proxy_run)
        if down_for:
            await trio.sleep(down_for)
        self.proxy, self._proxy_run = await _start_proxy(
            self.nursery, self.pki, self.control.port, self.proxy_port, self.proxy_options
        )

    def jump_clock(self, seconds: float) -> None:
        """trio's clock leaps ``seconds`` forward at once (needs the bench's MockClock)."""
        if self.clock is None:
            raise RuntimeError("jump_clock needs the bench started with clock=MockClock(...)")
        self.faults.append(f"clock jumped {seconds:g} s")
        self.clock.jump(seconds)


async def _run_scoped(nursery: trio.Nursery, serve: Callable[..., Awaitable[None]], *args: Any) -> tuple[Any, _Running]:
    running = _Running(trio.CancelScope(), trio.Event())

    async def runner(task_status: _TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:
                await serve(*args, task_status=task_status)
        finally:
            running.done.set()

    value = await nursery.start(runner)
    return value, running


async def _stop(running: _Running | None) -> None:
    if running is None:
        return
    running.scope.cancel()
    await running.done.wait()


async def _start_sidecar(
    nursery: trio.Nursery, pki: Any, pool_port: int, port: int, advertise_port: int | None
) -> tuple[SidecarServer, _Running]:
    sidecar = SidecarServer(parse_upstream_url(f"stratum+tcp://127.0.0.1:{pool_port}"), pki.server_context())
    sidecar.advertise_port = advertise_port
    _, running = await _run_scoped(nursery, sidecar.serve, "127.0.0.1", port)
    return sidecar, running


async def _start_proxy(
    nursery: trio.Nursery, pki: Any, control_port: int | None, port: int, options: dict[str, Any]
) -> tuple[MinerProxy, _Running]:
    proxy = MinerProxy(
        parse_upstream_url(f"stratumrm://127.0.0.1:{control_port}"), upstream_ssl_context=pki.client_context(), **options
    )
    _, running = await _run_scoped(nursery, proxy.serve, "127.0.0.1", port)
    return proxy, running


async def start_fault_bench(
    nursery: trio.Nursery,
    pki_dir: Path,
    *,
    clock: trio.testing.MockClock | None = None,
    accounts: tuple[str, ...] = ("alice",),
    pool_config: PoolConfig | None = None,
    seed: int = 1,
    failover: FailoverConfig | None = None,
    submit_timeout: float = 30.0,
    control_rewriter: Callable[[], Rewriter] | None = None,
    datagram_rewrite: Callable[[str, bytes], bytes] | None = None,
    **proxy_options: Any,
) -> FaultBench:
    """Start pool, sidecar, the two relays and a proxy in ``nursery``; return the handles.

    ``control_rewriter`` and ``datagram_rewrite`` put an on-path attacker on the
    control channel and the share channel (:mod:`bridge.testing.tamper`).
    """
    pki = make_test_pki(pki_dir, accounts=accounts)
    pool = ReferencePool(pool_config or PoolConfig(difficulty=1.25e-6, notify_interval=5.0, seed=seed))
    pool_port = await nursery.start(pool.serve, "127.0.0.1", 0)
    # The sidecar binds TCP and UDP on one port; the UDP relay needs that port first.
    sidecar, first = await _start_sidecar(nursery, pki, pool_port, 0, None)
    sidecar_port = sidecar.port
    assert sidecar_port is not None
    datagrams = LossyLink("127.0.0.1", 0, ("127.0.0.1", sidecar_port), seed=seed, rewrite=datagram_rewrite)
    await nursery.start(datagrams.serve)
    sidecar.advertise_port = datagrams.port
    control = TcpRelay(("127.0.0.1", sidecar_port), rewriter=control_rewriter)
    await nursery.start(control.serve, "127.0.0.1", 0)
    options: dict[str, Any] = {
        "submit_timeout": submit_timeout,
        "failover": failover or FailoverConfig(no_upstream_grace=2.0),
        **proxy_options,
    }
    proxy, proxy_run = await _start_proxy(nursery, pki, control.port, 0, options)
    assert proxy.port is not None
    bench = FaultBench(
        nursery, pki, pool, pool_port, sidecar, sidecar_port, control, datagrams, proxy, proxy.port, clock, options
    )
    bench._sidecar_run = first
    bench._proxy_run = proxy_run
    return bench


# ---------------------------------------------------------------------- the tally


class Tally(msgspec.Struct, frozen=True, kw_only=True):
    """One scenario's shares, end to end."""

    scenario: str
    seed: int
    submitted: int
    """Shares the rigs submitted."""
    answered: int
    """Of those, answered (accepted or rejected) on the rig's connection."""
    accepted_at_pool: int
    told_accepted_not_at_pool: int
    """Rigs told "accepted" for a share the pool never accepted: must be 0."""
    duplicated_at_pool: int
    """Shares the bridge delivered to the pool more than once: must be 0."""
    resubmitted_by_rigs: int = 0
    """Shares a rig itself sent again (the pool answered "Duplicate share"): not the bridge's doing."""
    faults: tuple[str, ...] = ()

    @property
    def honest(self) -> bool:
        return self.told_accepted_not_at_pool == 0 and self.duplicated_at_pool == 0


def tally(scenario: str, seed: int, miners: Sequence[Miner], pools: Sequence[ReferencePool], faults: Sequence[str] = ()) -> Tally:
    """Count a finished scenario (call after the rigs finished: nothing pending).

    A rig may itself submit a share twice (the reference miner restarts
    extranonce2 when a resumed session hands it the same extranonce1 and job);
    the pool rightly answers the repeat "Duplicate share". Those repeats are
    counted apart (``resubmitted_by_rigs``): ``duplicated_at_pool`` is what the
    bridge added, arrivals at the pool beyond what the rigs sent.
    """
    submitted = sum(m.statistics().submitted for m in miners)
    answered = sum(m.statistics().accepted + m.statistics().rejected for m in miners)
    records = [r for pool in pools for r in pool.accepted]
    at_pool = share_keys(records)
    told = share_keys(s for m in miners for s in m.accepted)
    sent: set[tuple[Any, ...]] = set()
    repeats = 0
    for miner in miners:
        for share in miner.submitted:
            (key,) = share_keys([share])
            if key in sent and share.verdict is not None and share.verdict.code == DUPLICATE:
                repeats += 1
            sent.add(key)
    arrivals_twice = (len(records) - len(at_pool)) + sum(pool.statistics().duplicates for pool in pools)
    return Tally(
        scenario=scenario,
        seed=seed,
        submitted=submitted,
        answered=answered,
        accepted_at_pool=sum(pool.statistics().accepted for pool in pools),
        told_accepted_not_at_pool=len(told - at_pool),
        duplicated_at_pool=arrivals_twice - repeats,
        resubmitted_by_rigs=repeats,
        faults=tuple(faults),
    )


_COLUMNS = (
    ("scenario", "scenario"),
    ("seed", "seed"),
    ("submitted", "submitted by rigs"),
    ("answered", "answered"),
    ("accepted_at_pool", "accepted by the pool"),
    ("told_accepted_not_at_pool", "told accepted, not at the pool (0)"),
    ("duplicated_at_pool", "duplicated at the pool (0)"),
    ("resubmitted_by_rigs", "resubmitted by the rig itself"),
)


def tally_table(rows: Iterable[Tally]) -> str:
    """The rows as a markdown table, sorted by scenario then seed."""
    ordered = sorted(rows, key=lambda row: (row.scenario, row.seed))
    lines = [
        "| " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|" + "|".join("---" if name == "scenario" else "---:" for name, _ in _COLUMNS) + "|",
    ]
    for row in ordered:
        lines.append("| " + " | ".join(str(getattr(row, name)) for name, _ in _COLUMNS) + " |")
    return "\n".join(lines)


def seeded_profiles(seed: int, count: int) -> list[str]:
    """``count`` rig profiles drawn by ``seed`` (cgminer always among them: it reconnects, the others switch)."""
    rng = random.Random(seed)
    others = ["cpuminer", "bfgminer", "bmminer", "bitaxe"]
    rng.shuffle(others)
    return ["cgminer", *others][:count]
