"""A hand-driven world for the proxy core: in-memory rigs, pools and probes, explicit time.

:class:`World` plays the trio driver's part (it executes the core's commands) and
the pools' (each upstream answers subscribe, authorize, extranonce.subscribe and
submit like a pool, and sends jobs), so failover scenarios run in microseconds
with every instant chosen by the test.
"""

from __future__ import annotations

import json
from typing import Any

from bridge.relay.failover import FailoverConfig
from bridge.relay.proxy import (
    CheckUpstream,
    CloseLeg,
    CloseProbe,
    CloseRig,
    Command,
    Event,
    KeepaliveResult,
    LegEvents,
    LegFailed,
    LegLost,
    LegOpened,
    Log,
    Notice,
    OpenLeg,
    ProbeEvents,
    ProbeFailed,
    ProbeLost,
    ProbeOpened,
    ProxyCore,
    ProxySettings,
    ProxyUpstream,
    RigConnected,
    RigData,
    RigEstablished,
    Timer,
    WriteRig,
)
from bridge.sv1.client import ClientSession

PREV_A = "00" * 24 + "aa" * 8
PREV_B = "00" * 24 + "bb" * 8


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().split("\n") if line]


class Pool:
    """One upstream: its state (up, refusing connections, silent) and its answers."""

    def __init__(self, index: int, extranonce_prefix: str) -> None:
        self.index = index
        self.prefix = extranonce_prefix
        self.up = True
        self.silent = False
        self.prevhash = PREV_A
        self.job = 0
        self.sessions = 0
        self.accepted: list[list[Any]] = []

    def next_extranonce1(self) -> str:
        self.sessions += 1
        return f"{self.prefix}{self.sessions:04x}"

    def answers(self, request: dict, extranonce1: str) -> list[dict]:
        method = request.get("method")
        if method is None or self.silent:
            return []
        rid = request["id"]
        if method == "mining.subscribe":
            return [
                {"id": rid, "result": [[["mining.notify", "s"]], extranonce1, 4], "error": None},
                {"id": None, "method": "mining.set_difficulty", "params": [1]},
                self.notify(clean=False),
            ]
        if method == "mining.submit":
            self.accepted.append(request["params"])
            return [{"id": rid, "result": True, "error": None}]
        if method in ("mining.authorize", "mining.extranonce.subscribe", "mining.ping"):
            return [{"id": rid, "result": True, "error": None}]
        return []

    def notify(self, clean: bool = True) -> dict:
        self.job += 1
        return {
            "id": None,
            "method": "mining.notify",
            "params": [f"p{self.index}j{self.job}", self.prevhash, "01", "02", [], "20000000", "17034219", "6554a2c1", clean],
        }


class Rig:
    """What one rig connection received, and its state on the proxy's side."""

    def __init__(self, rig_id: int, agent: str, xnsub: bool) -> None:
        self.id = rig_id
        self.agent = agent
        self.xnsub = xnsub
        self.received: list[dict] = []
        self.closed: str | None = None
        self.established = False
        self.next_id = 10

    @property
    def extranonce1(self) -> str | None:
        found = None
        for message in self.received:
            if message.get("method") == "mining.set_extranonce":
                found = message["params"][0]
            elif isinstance(message.get("result"), list) and message.get("id") == 1:
                found = message["result"][1]
        return found

    def jobs(self) -> list[str]:
        return [m["params"][0] for m in self.received if m.get("method") == "mining.notify"]

    def reconnects(self) -> list[dict]:
        return [m for m in self.received if m.get("method") == "client.reconnect"]


class World:
    def __init__(
        self,
        pools: int = 2,
        *,
        stratumrm: tuple[int, ...] = (),
        keepalive: str = "subscribe",
        start_probes: bool = True,
        **failover: Any,
    ) -> None:
        self.now = 0.0
        upstreams = [
            ProxyUpstream(f"u{i}", f"stratum+tcp://pool{i}:3333", priority=i, stratumrm=i in stratumrm) for i in range(pools)
        ]
        self.core = ProxyCore(
            upstreams, ProxySettings(failover=FailoverConfig(**failover), keepalive=keepalive, drain_timeout=5.0)
        )
        self.pools = [Pool(i, f"{i + 1:x}" * 4) for i in range(pools)]
        self.rigs: dict[int, Rig] = {}
        self.legs: dict[tuple[int, int], tuple[int, ClientSession, str]] = {}
        self.pending_opens: list[OpenLeg] = []
        self.probes: dict[int, tuple[ClientSession, str]] = {}
        self.checks: list[CheckUpstream] = []
        self.logs: list[Log] = []
        self.notices: list[Notice] = []
        self.closed_legs = 0
        self.checks_asked = 0
        if start_probes:
            for index in range(pools):
                self.open_probe(index)

    # ------------------------------------------------------------------ driving

    def feed(self, event: Event) -> None:
        self.apply(self.core.handle(event, self.now))

    def apply(self, commands: list[Command]) -> None:
        for command in commands:
            match command:
                case WriteRig(rig, data):
                    self.rigs[rig].received.extend(lines(data))
                case CloseRig(rig, reason):
                    self.rigs[rig].closed = reason
                case RigEstablished(rig):
                    self.rigs[rig].established = True
                case OpenLeg():
                    self.pending_opens.append(command)
                case CloseLeg(rig, leg):
                    if self.legs.pop((rig, leg), None) is not None:
                        self.closed_legs += 1
                case CheckUpstream():
                    self.checks.append(command)
                    self.checks_asked += 1
                case CloseProbe(upstream, reason):
                    self.probes.pop(upstream, None)
                    self.feed(ProbeLost(upstream, reason))
                case Log():
                    self.logs.append(command)
                case Notice():
                    self.notices.append(command)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let time pass in steps, running the core's timer and the pools each step."""
        end = self.now + seconds
        while self.now < end - 1e-12:
            self.now = min(end, self.now + step)
            self.settle()

    def settle(self) -> None:
        for _ in range(50):
            busy = self.connect_pending()
            busy |= self.pump()
            busy |= self.answer_checks()
            deadline = self.core.get_timer()
            if deadline is not None and deadline <= self.now:
                self.feed(Timer())
                busy = True
            if not busy:
                return
        raise AssertionError("the world does not settle")

    def connect_pending(self) -> bool:
        opens, self.pending_opens = self.pending_opens, []
        for command in opens:
            pool = self.pools[command.upstream]
            if not pool.up:
                self.feed(LegFailed(command.rig, command.leg, "connection refused"))
                continue
            session = ClientSession()
            self.legs[(command.rig, command.leg)] = (command.upstream, session, pool.next_extranonce1())
            self.feed(LegOpened(command.rig, command.leg, session))
        return bool(opens)

    def pump(self) -> bool:
        """Every pool answers what it was sent; True if anything moved."""
        moved = False
        for (rig, leg), (upstream, session, extranonce1) in list(self.legs.items()):
            requests = lines(session.data_to_send())
            answers = [a for r in requests for a in self.pools[upstream].answers(r, extranonce1)]
            if answers:
                moved = True
                self.feed(LegEvents(rig, leg, session.receive_data(_encode(answers))))
        for upstream, (session, extranonce1) in list(self.probes.items()):
            requests = lines(session.data_to_send())
            answers = [a for r in requests for a in self.pools[upstream].answers(r, extranonce1)]
            if answers:
                moved = True
                self.feed(ProbeEvents(upstream, session.receive_data(_encode(answers))))
        return moved

    # ------------------------------------------------------------------ the scenario's verbs

    def open_probe(self, upstream: int) -> None:
        pool = self.pools[upstream]
        if not pool.up:
            self.feed(ProbeFailed(upstream, "connection refused"))
            return
        session = ClientSession()
        self.probes[upstream] = (session, pool.next_extranonce1())
        self.feed(ProbeOpened(upstream, session))
        self.settle()

    def connect_rig(self, agent: str = "cgminer/4.12.0", *, xnsub: bool = False, user: str = "alice.rig") -> Rig:
        rig_id = len(self.rigs) + 1
        rig = self.rigs[rig_id] = Rig(rig_id, agent, xnsub)
        self.feed(RigConnected(rig_id, f"10.0.0.{rig_id}:4000", ("192.0.2.1", 3333)))
        messages = [
            {"id": 1, "method": "mining.subscribe", "params": [agent]},
            {"id": 2, "method": "mining.authorize", "params": [user, "x"]},
        ]
        if xnsub:
            messages.append({"id": 3, "method": "mining.extranonce.subscribe", "params": []})
        self.rig_says(rig, *messages)
        return rig

    def rig_says(self, rig: Rig, *messages: dict) -> None:
        self.feed(RigData(rig.id, _encode(list(messages))))
        self.settle()

    def submit(self, rig: Rig) -> int:
        rig.next_id += 1
        job = rig.jobs()[-1]
        self.rig_says(
            rig, {"id": rig.next_id, "method": "mining.submit", "params": ["alice.rig", job, "00000001", "6554a2c1", "00000002"]}
        )
        return rig.next_id

    def answer(self, rig: Rig, request_id: int) -> dict | None:
        return next((m for m in rig.received if m.get("id") == request_id and "method" not in m), None)

    def kill(self, upstream: int) -> None:
        """The pool dies with resets: every connection to it breaks, new ones are refused."""
        self.pools[upstream].up = False
        for (rig, leg), (index, _, _) in list(self.legs.items()):
            if index == upstream:
                del self.legs[(rig, leg)]
                self.feed(LegLost(rig, leg, "pool connection error: connection reset by peer"))
        if self.probes.pop(upstream, None) is not None:
            self.feed(ProbeLost(upstream, "connection error: connection reset by peer"))
        self.settle()

    def restore(self, upstream: int) -> None:
        self.pools[upstream].up = True
        self.pools[upstream].silent = False
        self.open_probe(upstream)

    def new_job(self, upstream: int) -> None:
        """The pool sends a job on every session (its probe included)."""
        pool = self.pools[upstream]
        if not pool.up or pool.silent:
            return
        notify = _encode([pool.notify()])
        for (rig, leg), (index, session, _) in list(self.legs.items()):
            if index == upstream:
                self.feed(LegEvents(rig, leg, session.receive_data(notify)))
        if upstream in self.probes:
            session, _ = self.probes[upstream]
            self.feed(ProbeEvents(upstream, session.receive_data(notify)))
        self.settle()

    def answer_checks(self) -> bool:
        """Run the keepalive checks asked for: a pool that is up and not silent answers."""
        checks, self.checks = self.checks, []
        for check in checks:
            pool = self.pools[check.upstream]
            alive = pool.up and not pool.silent
            self.feed(KeepaliveResult(check.upstream, alive, "" if alive else "no answer to mining.subscribe"))
        return bool(checks)

    def upstream_of(self, rig: Rig) -> int | None:
        return self.core.upstream_of(rig.id)

    def kinds(self) -> list[str]:
        return [n.kind for n in self.notices]


def _encode(messages: list[dict]) -> bytes:
    return b"".join(json.dumps(m).encode() + b"\n" for m in messages)
