"""The sidecar core, sans-IO: a hand-written proxy and pool around one SidecarSession.

The proxy side is built from bridge/wire/control.py (lines) and bridge/wire/keys.py
(datagrams sealed with Role.PROXY keys derived from the rm.keys the session sent);
the pool side reads the session's WritePool commands and answers with SV1 lines.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from typing import Any

import msgspec
import pytest

from bridge.relay.sidecar.channels import MAX_JOBS_PER_CHANNEL, ClosePool, OpenPool, WritePool
from bridge.relay.sidecar.intake import SidecarIntake
from bridge.relay.sidecar.session import SidecarSession
from bridge.wire.control import FEATURES, MAX_CONTROL_LINE
from bridge.wire.datagram import (
    Ack,
    AckRange,
    DatagramType,
    Probe,
    ProbeAck,
    Share,
    ShareBatch,
    decode_body,
)
from bridge.wire.keys import KeyMaterial, KeySet, Role, Sealer, derive_keys

RIG = ("192.0.2.7", 40000)
PREVHASH = "11" * 32
ALL_FEATURES = list(FEATURES)


def notify_params(job_id: str = "j1", *, clean: bool = True, ntime: str = "6554a2c1") -> list[Any]:
    return [job_id, PREVHASH, "aa", "bb", [], "20000000", "17034219", ntime, clean]


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


class Harness:
    """One session, a proxy that speaks control lines and datagrams, and a scripted pool."""

    def __init__(
        self,
        *,
        features: list[str] | None = None,
        udp: bool = True,
        intake: SidecarIntake | None = None,
        **options: Any,
    ) -> None:
        self.now = 1000.0
        self.session = SidecarSession(
            now=self.now,
            udp_port=3334 if udp else None,
            intake=intake,
            randbytes=random.Random(7).randbytes,
            **options,
        )
        self.features = ALL_FEATURES if features is None else features
        self.lines: list[dict[str, Any]] = []
        self.to_pool: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.opened: list[int] = []
        self.closed_pools: dict[int, str] = {}
        self.keys: KeySet | None = None
        self.material: KeyMaterial | None = None
        self.datagrams: list[tuple[bytes, Any]] = []
        self.openers: dict[int, Any] = {}  # conn_id -> the proxy's opener of that epoch

    # ---------------------------------------------------------------- plumbing

    def send(self, *objects: Any) -> None:
        self.session.receive_data(b"".join(line(o) for o in objects), self.now)
        self.pump()

    def send_raw(self, data: bytes) -> None:
        self.session.receive_data(data, self.now)
        self.pump()

    def pump(self) -> list[dict[str, Any]]:
        """Carry out the session's outputs; return the control lines written since last time."""
        session = self.session
        new = [json.loads(raw) for raw in session.data_to_send().splitlines()]
        self.lines.extend(new)
        for command in session.commands():
            if isinstance(command, OpenPool):
                self.opened.append(command.ch)
            elif isinstance(command, WritePool):
                self.to_pool[command.ch].extend(json.loads(raw) for raw in command.data.splitlines())
            elif isinstance(command, ClosePool):
                self.closed_pools[command.ch] = command.reason
        for datagram in session.datagrams_to_send():
            self.datagrams.append((datagram.data, datagram.address))
        for message in new:
            if message.get("method") == "rm.keys":
                params = message["params"]
                self.material = KeyMaterial(int(params["conn_id"], 16), params["epoch"], bytes.fromhex(params["secret"]))
                self.keys = KeySet.derive(self.material, Role.PROXY)
                self.openers[self.material.conn_id] = self.keys.opener
        return new

    def received(self, dtype: DatagramType | None = None) -> list[tuple[int, int, Any]]:
        """Every datagram the session sent, opened: ``(epoch, type, body)``, optionally of one type."""
        out = []
        for data, _ in self.datagrams:
            conn_id = int.from_bytes(data[2:10], "big")
            opener = self.openers[conn_id]
            plaintext = opener.open(data)
            assert plaintext is not None
            kind = data[0] & 0x0F
            if dtype is None or kind == dtype:
                out.append((opener.epoch, kind, decode_body(kind, plaintext)))
        return out

    def take(self) -> list[dict[str, Any]]:
        self.pump()
        lines, self.lines = self.lines, []
        return lines

    def pool(self, ch: int, *objects: Any) -> None:
        self.session.pool_data(ch, b"".join(line(o) for o in objects), self.now)
        self.pump()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        deadline = self.session.get_timer()
        if deadline is not None and deadline <= self.now:
            self.session.handle_timer(self.now)
        self.pump()

    def datagram(self, data: bytes, address: Any = RIG) -> None:
        self.session.receive_datagram(data, address, self.now)
        self.pump()

    def seal(self, body: Any, *, urgent: bool = False) -> bytes:
        assert self.keys is not None
        return self.keys.sealer.seal(body, urgent=urgent).data

    # ---------------------------------------------------------------- scripted sessions

    def hello(self) -> dict[str, Any]:
        self.send({"id": 1, "method": "rm.hello", "params": {"version": 1, "features": self.features, "agent": "test"}})
        return self.take()[0]

    def open_channel(self, ch: int, *workers: str, extranonce2_size: int = 4, job: str | None = "j1") -> None:
        """rm.open, subscribe, authorize each worker; the pool accepts; optionally a first job."""
        workers = workers or ("alice.rig1",)
        self.send({"method": "rm.open", "params": {"ch": ch, "peer": "203.0.113.5:4028"}})
        self.send({"ch": ch, "id": 1, "method": "mining.subscribe", "params": ["cgminer/4.11.1"]})
        for index, worker in enumerate(workers):
            self.send({"ch": ch, "id": 2 + index, "method": "mining.authorize", "params": [worker, "x"]})
        self.session.pool_connected(ch, self.now)
        self.pump()
        self.pool(ch, {"id": 1, "result": [[["mining.notify", "ab"]], "01020304", extranonce2_size], "error": None})
        for index in range(len(workers)):
            self.pool(ch, {"id": 2 + index, "result": True, "error": None})
        if job is not None:
            self.pool(ch, {"id": None, "method": "mining.notify", "params": notify_params(job)})
        self.advance(0.01)
        self.take()
        self.to_pool[ch].clear()

    def share(self, ch: int = 3, handle: int = 1, nonce: int = 0xB2957C02, **fields: Any) -> Share:
        values: dict[str, Any] = {
            "channel_id": ch,
            "job_handle": handle,
            "extranonce2": bytes.fromhex("0000002a"),
            "ntime": 0x6554A2C1,
            "nonce": nonce,
            "version_bits": 0x00C00000,
        }
        values.update(fields)
        return Share(**values)

    def submits(self, ch: int = 3) -> list[dict[str, Any]]:
        return [m for m in self.to_pool[ch] if m.get("method") == "mining.submit"]

    def results(self) -> list[list[Any]]:
        """Verdicts of UDP shares, ``[epoch, pn, index, verdict]``: VERDICT datagrams, then rm.results."""
        out: list[list[Any]] = []
        for epoch, _, body in self.received(DatagramType.VERDICT):
            for entry in body.entries:
                verdict = 1 if entry.detail is None else json.loads(entry.detail)
                out.append([epoch, entry.pn, entry.index, verdict])
        return out + self.tls_results()

    def tls_results(self) -> list[list[Any]]:
        return [entry for m in self.lines if m.get("method") == "rm.results" for entry in m["params"]["v"]]


def ready(**options: Any) -> Harness:
    harness = Harness(**options)
    harness.hello()
    harness.open_channel(3)
    return harness


# ------------------------------------------------------------------ session start


def test_hello_answers_version_features_udp_and_sends_keys() -> None:
    harness = Harness(udp_host="pool.example.com", heartbeat=0.5, dead_after=3.0)
    harness.send(
        {
            "id": 1,
            "method": "rm.hello",
            "params": {"version": 1, "features": ["udp-shares", "udp-v2", "job-dedup", "future-x"], "agent": "p"},
        }
    )
    hello, keys = harness.take()
    assert hello["id"] == 1 and hello["error"] is None
    result = hello["result"]
    assert result["version"] == 1 and result["features"] == ["udp-shares", "udp-v2", "job-dedup"]
    assert result["udp_port"] == 3334 and result["udp_host"] == "pool.example.com"
    assert result["heartbeat"] == 0.5 and result["dead_after"] == 3.0
    assert result["max_ack_delay"] == 0.025  # announced, as QUIC's transport parameter of that name
    assert keys["method"] == "rm.keys" and keys["id"] is None
    params = keys["params"]
    assert len(params["conn_id"]) == 16 and int(params["conn_id"], 16) != 0
    assert len(params["secret"]) == 64 and params["epoch"] == 0 and params["grace"] > 0
    assert harness.session.udp and harness.session.key_epoch == 0


@pytest.mark.parametrize("features, udp", [(["job-dedup"], True), (ALL_FEATURES, False)])
def test_without_udp_the_hello_says_so_and_no_keys_are_sent(features: list[str], udp: bool) -> None:
    harness = Harness(features=features, udp=udp)
    harness.hello()
    assert harness.take() == []
    assert harness.session.udp is False
    assert "udp-shares" not in harness.session.features


def test_an_unsupported_version_is_refused_with_the_specified_error() -> None:
    harness = Harness()
    harness.send({"id": 1, "method": "rm.hello", "params": {"version": 2, "features": []}})
    answer, error = harness.take()
    assert answer["id"] == 1 and answer["error"] == [1, "unsupported StratumRM version 2; this sidecar speaks 1"]
    assert error["method"] == "rm.error" and "version 2" in error["params"]["reason"]
    assert harness.session.closed


@pytest.mark.parametrize(
    "first",
    [
        {"ch": 1, "id": 1, "method": "mining.subscribe", "params": []},
        {"method": "rm.open", "params": {"ch": 1}},
        {"id": 1, "result": True, "error": None},
    ],
)
def test_nothing_may_precede_the_hello(first: dict[str, Any]) -> None:
    harness = Harness()
    harness.send(first)
    [error] = harness.take()
    assert error["method"] == "rm.error" and "must be rm.hello" in error["params"]["reason"]
    assert harness.session.closed and "must be rm.hello" in (harness.session.protocol_error or "")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json\n", "malformed control line"),
        (b"[1, 2]\n", "malformed control line"),
        (b'"text"\n', "malformed control line"),
        (b'{"ch": "three", "id": 1, "method": "mining.submit"}\n', "malformed control line"),
        (b'{"method": "rm.frobnicate", "params": {}}\n', "unknown control method 'rm.frobnicate'"),
        (b'{"method": "rm.keys", "params": {"conn_id": "1", "epoch": 0, "secret": ""}}\n', "sent by the sidecar"),
        (b'{"id": 4, "method": "mining.subscribe", "params": []}\n', 'without "ch"'),
        (b'{"method": "rm.open", "params": {"ch": "x"}}\n', "bad params for rm.open"),
        (b'{"method": "rm.open", "params": {"ch": 0}}\n', "channel numbers are 1 to 2^32-1"),
        (b'{"id": 9, "method": "rm.hello", "params": {"version": 1}}\n', "rm.hello sent twice"),
        (b"\xff\xfe\n", "malformed control line"),
        (b"x" * (MAX_CONTROL_LINE + 10), "control line too long"),
    ],
)
def test_malformed_lines_close_the_connection_with_rm_error_and_a_reason(raw: bytes, reason: str) -> None:
    harness = ready()
    harness.send_raw(raw)
    lines = harness.take()
    assert lines[-1]["method"] == "rm.error" and reason in lines[-1]["params"]["reason"]
    assert harness.session.closed and reason in (harness.session.protocol_error or "")
    assert harness.closed_pools == {3: harness.closed_pools[3]}  # the channel's pool connection goes too
    assert harness.session.get_timer() is None


# ------------------------------------------------------------------ channels


def test_the_channel_handshake_is_relayed_in_pool_order_with_the_proxys_ids() -> None:
    harness = Harness()
    harness.hello()
    harness.send({"method": "rm.open", "params": {"ch": 7, "peer": "203.0.113.5:4028"}})
    assert harness.opened == [7]
    harness.send(
        {"ch": 7, "id": 11, "method": "mining.configure", "params": [["version-rolling"], {"version-rolling.mask": "ffffffff"}]},
        {"ch": 7, "id": 12, "method": "mining.subscribe", "params": ["bmminer/2.0.0"]},
        {"ch": 7, "id": 13, "method": "mining.authorize", "params": ["alice.rig1", "x"]},
        {"ch": 7, "id": 14, "method": "mining.suggest_difficulty", "params": [0.5]},
    )
    assert harness.to_pool[7] == []  # nothing before the pool connection is up
    harness.session.pool_connected(7, harness.now)
    harness.pump()
    assert [m["method"] for m in harness.to_pool[7]] == ["mining.configure", "mining.subscribe"]
    assert harness.to_pool[7][1]["params"] == ["bmminer/2.0.0"]  # the rig's user agent
    configure_id, subscribe_id = (m["id"] for m in harness.to_pool[7])
    harness.pool(
        7,
        {"id": configure_id, "result": {"version-rolling": True, "version-rolling.mask": "1fffe000"}, "error": None},
        {"id": subscribe_id, "result": [[["mining.notify", "ab"]], "01020304", 8], "error": None},
    )
    assert [m["method"] for m in harness.to_pool[7][2:]] == ["mining.authorize"]
    assert harness.to_pool[7][2]["params"] == ["alice.rig1", "x"]
    authorize_id = harness.to_pool[7][2]["id"]
    harness.pool(7, {"id": authorize_id, "result": True, "error": None})
    assert harness.to_pool[7][3]["method"] == "mining.suggest_difficulty"
    harness.pool(7, {"id": harness.to_pool[7][3]["id"], "result": False, "error": [20, "no", None], "reject-reason": "odd"})
    answers = [m for m in harness.take() if m.get("ch") == 7]
    assert [(m["id"], m["result"]) for m in answers] == [
        (11, {"version-rolling": True, "version-rolling.mask": "1fffe000"}),
        (12, [[["mining.notify", "ab"]], "01020304", 8]),
        (13, True),
        (14, False),
    ]
    assert answers[3]["error"] == [20, "no", None] and answers[3]["reject-reason"] == "odd"
    assert harness.session.channel_pool(7).version_mask == "1fffe000"


def test_pool_notifications_and_requests_pass_through_in_order() -> None:
    harness = ready()
    harness.pool(
        3,
        {"id": None, "method": "mining.set_difficulty", "params": [0.25]},
        {"id": None, "method": "mining.set_extranonce", "params": ["0a0b0c0d", 4]},
        {"id": None, "method": "mining.set_version_mask", "params": ["1fffe000"]},
        {"id": None, "method": "client.show_message", "params": ["hello rig"]},
        {"id": 77, "method": "client.get_version", "params": []},
        {"id": None, "method": "pool.custom", "params": {"x": 1}},
        {"id": None, "method": "client.reconnect", "params": []},
    )
    lines = harness.take()
    assert [(m["ch"], m["id"], m["method"], m["params"]) for m in lines] == [
        (3, None, "mining.set_difficulty", [0.25]),
        (3, None, "mining.set_extranonce", ["0a0b0c0d", 4]),
        (3, None, "mining.set_version_mask", ["1fffe000"]),
        (3, None, "client.show_message", ["hello rig"]),
        (3, 77, "client.get_version", []),
        (3, None, "pool.custom", {"x": 1}),
        (3, None, "client.reconnect", []),
    ]
    harness.send({"ch": 3, "id": 77, "result": "cgminer/4.11.1", "error": None})
    assert harness.to_pool[3] == [{"id": 77, "result": "cgminer/4.11.1", "error": None}]


def test_rm_close_from_the_proxy_closes_the_pool_connection() -> None:
    harness = ready()
    harness.send({"method": "rm.close", "params": {"ch": 3, "reason": "rig disconnected"}})
    assert "rig disconnected" in harness.closed_pools[3]
    assert harness.session.channels == frozenset()
    harness.send({"ch": 3, "id": 9, "method": "mining.submit", "params": ["alice.rig1", "j1", "00", "00", "00"]})
    [answer] = harness.take()
    assert answer["id"] == 9 and answer["result"] is False and "not open" in answer["error"][1]


def test_pool_loss_closes_the_channel_with_a_reason_after_pending_verdicts() -> None:
    harness = ready()
    harness.datagram(harness.seal(harness.share()))
    submit = harness.submits()[0]
    harness.pool(3, {"id": submit["id"], "result": True, "error": None})
    harness.session.pool_closed(3, "pool connection error: reset by peer", harness.now)
    lines = harness.take()
    assert harness.results() == [[0, 0, 0, 1]]  # the verdict went out at once, before the close
    assert [m["method"] for m in lines] == ["rm.close"]
    assert lines[0]["params"] == {"ch": 3, "reason": "pool connection error: reset by peer"}
    assert 3 in harness.closed_pools and not harness.session.closed


def test_a_fatal_pool_violation_ends_the_channel() -> None:
    harness = ready()
    harness.session.pool_data(3, b"Invalid JSON, disconnecting\n", harness.now)
    [close] = harness.take()
    assert close["method"] == "rm.close" and "invalid JSON from the pool" in close["params"]["reason"]


def test_channel_limit_answers_rm_close() -> None:
    harness = Harness(max_channels=1)
    harness.hello()
    harness.send({"method": "rm.open", "params": {"ch": 1}}, {"method": "rm.open", "params": {"ch": 2}})
    [close] = harness.take()
    assert close["params"]["ch"] == 2 and "too many channels" in close["params"]["reason"]
    assert harness.opened == [1]


def test_accounts_outside_the_certificate_are_refused_without_reaching_the_pool() -> None:
    harness = Harness(accounts={"alice"})
    harness.hello()
    harness.open_channel(3, "alice.rig1", "bob.rig1")  # bob is refused by the sidecar
    harness.send({"ch": 3, "id": 20, "method": "mining.authorize", "params": ["mallory.x", "y"]})
    [refusal] = harness.take()
    assert refusal["id"] == 20 and refusal["result"] is False and refusal["error"][0] == 24
    assert "mallory" in refusal["error"][1] and harness.to_pool[3] == []
    # A share naming bob (worker index 1) or a TLS submit for bob never reaches the pool either.
    harness.datagram(harness.seal(harness.share(worker_index=1)))
    harness.send({"ch": 3, "id": 21, "method": "mining.submit", "params": ["bob.rig1", "j1", "0000002a", "6554a2c1", "00000001"]})
    harness.advance(0.01)
    assert harness.submits() == []
    verdicts = [m for m in harness.lines if m.get("id") == 21] + harness.results()
    assert len(verdicts) == 2 and harness.session.statistics().shares_refused == 2


# ------------------------------------------------------------------ jobs


def test_identical_notifies_become_one_rm_job_and_one_rm_notify() -> None:
    harness = Harness()
    harness.hello()
    harness.open_channel(3, job=None)
    harness.open_channel(4, job=None)
    harness.pool(3, {"id": None, "method": "mining.notify", "params": notify_params("j9")})
    harness.pool(4, {"id": None, "method": "mining.notify", "params": notify_params("j9")})
    [job] = harness.take()
    assert job == {"id": None, "method": "rm.job", "params": {"job": 1, "notify": notify_params("j9")}}
    assert harness.session.get_timer() == pytest.approx(harness.now + 0.002)
    harness.advance(0.001)
    assert harness.take() == []  # still collecting
    harness.advance(0.0015)
    assert harness.take() == [{"id": None, "method": "rm.notify", "params": {"job": 1, "ch": [3, 4]}}]
    # A different notify (clean_jobs differs) is a different job.
    harness.pool(4, {"id": None, "method": "mining.notify", "params": notify_params("j9", clean=False)})
    harness.advance(0.01)
    assert [m["params"].get("job") for m in harness.take()] == [2, 2]
    stats = harness.session.statistics()
    assert stats.notify_deliveries == 3 and stats.jobs_announced == 2 and stats.notify_lines == 2


def test_a_pending_rm_notify_goes_out_before_any_later_line_of_its_channels() -> None:
    harness = ready()
    harness.pool(
        3,
        {"id": None, "method": "mining.notify", "params": notify_params("j2")},
        {"id": None, "method": "mining.set_difficulty", "params": [2]},
        {"id": None, "method": "mining.notify", "params": notify_params("j3")},
        {"id": None, "method": "mining.notify", "params": notify_params("j4")},
    )
    harness.advance(0.01)
    order = [(m["method"], m["params"].get("job") if m["method"].startswith("rm.") else None) for m in harness.take()]
    assert order == [
        ("rm.job", 2),
        ("rm.notify", 2),
        ("mining.set_difficulty", None),
        ("rm.job", 3),
        ("rm.notify", 3),
        ("rm.job", 4),
        ("rm.notify", 4),
    ]


def test_without_job_dedup_notifies_are_plain_channel_lines() -> None:
    harness = Harness(features=["udp-shares"])
    harness.hello()
    harness.take()
    harness.open_channel(3, job=None)
    harness.pool(3, {"id": None, "method": "mining.notify", "params": notify_params("j5")})
    assert harness.take() == [{"ch": 3, "id": None, "method": "mining.notify", "params": notify_params("j5")}]


def test_job_tables_stay_bounded_and_forget_old_handles() -> None:
    harness = ready()
    for number in range(MAX_JOBS_PER_CHANNEL + 50):
        harness.pool(3, {"id": None, "method": "mining.notify", "params": notify_params(f"x{number}", clean=False)})
    harness.advance(0.01)
    session = harness.session
    assert len(session.jobs) == MAX_JOBS_PER_CHANNEL and session.jobs.distinct_notifies == MAX_JOBS_PER_CHANNEL
    harness.datagram(harness.seal(harness.share(handle=1)))  # j1's handle was forgotten
    harness.advance(0.01)
    [refused] = harness.results()
    assert refused[3]["error"][0] == 21 and harness.submits() == []
    harness.send({"method": "rm.close", "params": {"ch": 3}})
    assert len(session.jobs) == 0 and session.jobs.distinct_notifies == 0


# ------------------------------------------------------------------ shares


def test_a_udp_share_is_rebuilt_forwarded_at_once_and_its_verdict_sent_at_once() -> None:
    harness = ready()
    harness.datagram(harness.seal(harness.share()))
    [submit] = harness.submits()
    assert submit["params"] == ["alice.rig1", "j1", "0000002a", "6554a2c1", "b2957c02", "00c00000"]
    # the ACK, unless a verdict comes first: after the announced max_ack_delay (QUIC's default)
    assert harness.session.get_timer() == pytest.approx(harness.now + 0.025)
    harness.pool(3, {"id": submit["id"], "result": True, "error": None})
    # One 37-byte VERDICT datagram, no waiting for company, no ACK (the verdict acknowledges).
    assert harness.results() == [[0, 0, 0, 1]]
    [(data, address)] = harness.datagrams
    assert len(data) == 37 and address == RIG
    assert harness.session.get_timer() > harness.now + 0.025
    harness.advance(0.03)
    assert len(harness.datagrams) == 1 and harness.tls_results() == []
    # Without version bits the sixth param is left out.
    harness.datagram(harness.seal(harness.share(nonce=1, version_bits=None)))
    assert harness.submits()[1]["params"] == ["alice.rig1", "j1", "0000002a", "6554a2c1", "00000001"]


def test_rejections_carry_the_pools_own_words() -> None:
    harness = ready()
    harness.datagram(harness.seal(harness.share(nonce=1)))
    harness.datagram(harness.seal(harness.share(nonce=2)))
    first, second = harness.submits()
    harness.pool(
        3,
        {"id": first["id"], "result": False, "error": None, "reject-reason": "Above target"},
        {"id": second["id"], "result": None, "error": [23, "Low difficulty share", None]},
    )
    harness.advance(0.01)
    assert harness.results() == [
        [0, 0, 0, {"result": False, "error": None, "reject-reason": "Above target"}],
        [0, 1, 0, {"result": None, "error": [23, "Low difficulty share", None]}],
    ]
    assert harness.session.statistics().rejected == 2


def test_an_urgent_share_gets_its_verdict_without_waiting_for_the_batch() -> None:
    harness = ready()
    harness.datagram(harness.seal(harness.share(), urgent=True))
    harness.pool(3, {"id": harness.submits()[0]["id"], "result": True, "error": None})
    assert harness.results() == [[0, 0, 0, 1]]


def test_a_batch_reports_each_share_by_index_and_picks_workers_by_index() -> None:
    harness = Harness()
    harness.hello()
    harness.open_channel(3, "alice.rig1", "alice.rig2")
    batch = ShareBatch(shares=tuple(harness.share(nonce=n, worker_index=n % 2) for n in range(3)))
    harness.datagram(harness.seal(batch))
    submits = harness.submits()
    assert [s["params"][0] for s in submits] == ["alice.rig1", "alice.rig2", "alice.rig1"]
    harness.pool(3, *({"id": s["id"], "result": True, "error": None} for s in submits))
    harness.advance(0.01)
    assert harness.results() == [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 2, 1]]
    assert len(harness.received(DatagramType.VERDICT)) == 1 and harness.tls_results() == []


def test_a_share_reaches_the_pool_once_whatever_repeats_it() -> None:
    harness = ready()
    share = harness.share()
    harness.datagram(harness.seal(share))  # pn 0: forwarded
    harness.datagram(harness.seal(share))  # pn 1, while pending: joins
    tls_submit = {
        "ch": 3,
        "id": 40,
        "method": "mining.submit",
        "params": ["alice.rig1", "j1", "0000002A", "6554a2c1", "b2957c02", "00c00000"],
    }
    harness.send(tls_submit)  # TLS copy (upper-case hex), while pending: joins
    [submit] = harness.submits()
    harness.pool(3, {"id": submit["id"], "result": True, "error": None})
    harness.advance(0.01)
    harness.datagram(harness.seal(share))  # pn 2, after the verdict: from the cache
    harness.send({**tls_submit, "id": 41})
    harness.advance(0.01)
    assert len(harness.submits()) == 1
    assert harness.results() == [[0, 0, 0, 1], [0, 1, 0, 1], [0, 2, 0, 1]]
    tls_answers = [m for m in harness.lines if m.get("ch") == 3 and m.get("id") in (40, 41)]
    assert [(m["id"], m["result"], m["error"]) for m in tls_answers] == [(40, True, None), (41, True, None)]
    stats = harness.session.statistics()
    assert stats.shares_forwarded == 1 and stats.duplicates_joined == 2 and stats.duplicates_from_cache == 2
    assert stats.shares_udp == 3 and stats.shares_tls == 2 and stats.verdicts_udp == 3 and stats.verdicts_tls == 2


def test_a_tls_share_first_and_its_udp_retransmission_share_one_pool_submit() -> None:
    harness = ready()
    harness.send(
        {"ch": 3, "id": 50, "method": "mining.submit", "params": ["alice.rig1", "j1", "0000002a", "6554a2c1", "b2957c02"]}
    )
    [submit] = harness.submits()
    assert submit["params"] == ["alice.rig1", "j1", "0000002a", "6554a2c1", "b2957c02"]  # relayed as sent
    harness.datagram(harness.seal(harness.share(version_bits=None)))
    harness.pool(3, {"id": submit["id"], "result": False, "error": [22, "Duplicate share", None]})
    harness.advance(0.01)
    assert len(harness.submits()) == 1
    assert harness.results() == [[0, 0, 0, {"result": False, "error": [22, "Duplicate share", None]}]]
    [answer] = [m for m in harness.lines if m.get("id") == 50]
    assert answer["error"] == [22, "Duplicate share", None]


def test_shares_on_other_jobs_channels_or_extranonces_are_distinct() -> None:
    harness = Harness()
    harness.hello()
    harness.open_channel(3)
    harness.open_channel(4)  # same job j1, same handle
    base = harness.share()
    for share in (
        base,
        msgspec.structs.replace(base, channel_id=4),
        msgspec.structs.replace(base, extranonce2=bytes.fromhex("0000002b")),
        msgspec.structs.replace(base, ntime=base.ntime + 1),
        msgspec.structs.replace(base, version_bits=None),
    ):
        harness.datagram(harness.seal(share))
    assert len(harness.submits(3)) == 4 and len(harness.submits(4)) == 1


@pytest.mark.parametrize(
    "change, code, words",
    [
        ({"channel_id": 9}, 20, "channel 9 is not open"),
        ({"job_handle": 77}, 21, "job handle 77"),
        ({"worker_index": 1}, 24, "worker index 1"),
        ({"extranonce2": b"\x00\x00\x2a"}, 20, "Incorrect size of extranonce2"),
    ],
)
def test_records_that_fail_the_sidecars_checks_get_an_explicit_error_verdict(
    change: dict[str, Any], code: int, words: str
) -> None:
    harness = ready()
    harness.datagram(harness.seal(harness.share(**change)))
    harness.advance(0.01)
    [[epoch, pn, index, verdict]] = harness.results()
    assert (epoch, pn, index) == (0, 0, 0) and verdict["result"] is False
    assert verdict["error"][0] == code and words in verdict["error"][1]
    assert harness.submits() == [] and harness.session.statistics().shares_refused == 1


def test_a_copy_of_a_rejected_share_gets_the_pools_rejection_from_the_cache() -> None:
    harness = ready()
    share = harness.share()
    harness.datagram(harness.seal(share))
    [submit] = harness.submits()
    harness.pool(3, {"id": submit["id"], "result": False, "error": [23, "Low difficulty share", None]})
    harness.advance(0.01)
    tls_copy = {
        "ch": 3,
        "id": 40,
        "method": "mining.submit",
        "params": ["alice.rig1", "j1", "0000002a", "6554a2c1", "b2957c02", "00c00000"],
    }
    harness.send(tls_copy)
    harness.datagram(harness.seal(share))
    harness.advance(0.01)
    assert len(harness.submits()) == 1
    [answer] = [m for m in harness.lines if m.get("ch") == 3 and m.get("id") == 40]
    assert answer["result"] is False and answer["error"] == [23, "Low difficulty share", None]
    verdicts = [entry[3] for entry in harness.results()]
    assert len(verdicts) == 2 and all(v["result"] is False and v["error"][0] == 23 for v in verdicts)
    assert harness.session.statistics().duplicates_from_cache == 2


def test_the_duplicate_table_is_a_bounded_lru() -> None:
    harness = ready(share_cache_size=4)
    for nonce in range(10):
        harness.datagram(harness.seal(harness.share(nonce=nonce)))
    assert len(harness.session.ledger) == 4
    harness.pool(3, *({"id": s["id"], "result": True, "error": None} for s in harness.submits()))
    harness.advance(0.01)
    assert len(harness.results()) == 10  # evicted entries still got their verdicts


def test_pending_copies_per_share_are_bounded() -> None:
    harness = ready()
    share = harness.share()
    for _ in range(100):
        harness.datagram(harness.seal(share))
    [submit] = harness.submits()
    harness.pool(3, {"id": submit["id"], "result": True, "error": None})
    harness.advance(0.01)
    assert len(harness.results()) == 64


def test_verdict_datagrams_hold_at_most_64_entries_and_fit_1200_bytes() -> None:
    harness = ready(intake=SidecarIntake(rate=1e6, burst=1e6))
    reason = {"result": False, "error": [23, "Low difficulty share " + "x" * 300, None]}
    for nonce in range(70):
        harness.datagram(harness.seal(ShareBatch(tuple(harness.share(nonce=nonce * 4 + i) for i in range(4)))))
    harness.pool(3, *({"id": s["id"], **reason} for s in harness.submits()[:8]))
    harness.pool(3, *({"id": s["id"], "result": True, "error": None} for s in harness.submits()[8:]))
    received = harness.received(DatagramType.VERDICT)
    assert sum(len(body.entries) for _, _, body in received) == 280
    assert all(len(body.entries) <= 64 for _, _, body in received)
    assert all(len(data) <= 1200 for data, _ in harness.datagrams)
    assert harness.tls_results() == []


def test_verdicts_the_budget_refuses_go_over_tls_in_lines_of_at_most_2048(monkeypatch) -> None:
    harness = ready(intake=SidecarIntake(rate=1e6, burst=1e6))
    share = harness.share()
    harness.datagram(harness.seal(share))
    intake = harness.session.intake
    assert intake is not None
    monkeypatch.setattr(intake.receiver, "send_to", lambda session, size: None)
    harness.pool(3, {"id": harness.submits()[0]["id"], "result": True, "error": None})
    for _ in range(2100):
        harness.datagram(harness.seal(share))
    harness.advance(0.01)
    sizes = [len(m["params"]["v"]) for m in harness.lines if m.get("method") == "rm.results"]
    assert sum(sizes) == 2101 and max(sizes) <= 2048
    assert harness.datagrams == [] and harness.session.statistics().verdicts_over_budget == 2101


def test_without_batch_verdicts_each_input_flushes_its_verdicts() -> None:
    harness = Harness(features=["udp-shares", "udp-v2", "job-dedup"])
    harness.hello()
    harness.open_channel(3)
    harness.datagram(harness.seal(harness.share()))
    harness.pool(3, {"id": harness.submits()[0]["id"], "result": True, "error": None})
    assert harness.results() == [[0, 0, 0, 1]]


# ------------------------------------------------------------------ datagrams


def test_a_probe_is_answered_to_the_learned_address_with_an_ack_no_larger() -> None:
    harness = ready()
    probe = harness.seal(Probe(probe_id=0xABCD, padding=20))
    harness.datagram(probe)
    [(data, address)] = harness.datagrams
    assert address == RIG and len(data) == len(probe)
    assert harness.keys is not None
    plaintext = harness.keys.opener.open(data)
    assert plaintext is not None and decode_body(DatagramType.PROBE_ACK, plaintext) == ProbeAck(probe_id=0xABCD, padding=20)
    assert harness.session.statistics().probe_acks_sent == 1


def test_probe_acks_never_exceed_what_the_address_sent() -> None:
    harness = ready()
    harness.datagram(harness.seal(Probe(probe_id=1, padding=100)))  # learns RIG
    # A late (not newest) datagram from elsewhere moves nothing and earns nothing there.
    assert harness.keys is not None
    early = harness.keys.sealer.seal(Probe(probe_id=2)).data
    harness.datagram(harness.seal(Probe(probe_id=3, padding=500)))
    harness.datagram(early, address=("198.51.100.9", 9))
    assert {address for _data, address in harness.datagrams} == {RIG}
    assert sum(len(data) for data, _ in harness.datagrams) <= harness.session.statistics().udp_bytes_received


def hostile_datagrams(harness: Harness) -> dict[str, list[bytes]]:
    """Datagrams (sequences) for every drop reason, made against the harness's keys."""
    assert harness.material is not None and harness.keys is not None
    material = harness.material
    keys = derive_keys(material)
    share = harness.share()
    good = harness.seal(share)
    stranger = KeySet.derive(KeyMaterial(0x0DDBA11, 0, bytes(32)), Role.PROXY).sealer.seal(share).data
    old_pn = Sealer(conn_id=material.conn_id, epoch=material.epoch, key=keys.proxy_to_sidecar, first_pn=10).seal(share).data
    far_ahead = Sealer(conn_id=material.conn_id, epoch=material.epoch, key=keys.proxy_to_sidecar, first_pn=5000).seal(share).data
    ack = harness.keys.sealer.seal(Ack(ranges=(AckRange(high=3, low=1),))).data
    malformed = harness.keys.sealer.seal_plaintext(DatagramType.SHARE, b"\x80" + bytes(12)).data
    flipped_tag = bytearray(harness.seal(share))
    flipped_tag[-1] ^= 1
    return {
        "truncated": [good[:20]],
        "oversized": [bytes(1300)],
        "bad version": [bytes([0x11]) + good[1:]],
        "unknown type": [bytes([0x27]) + good[1:]],
        "unexpected type": [ack],
        "bad flags": [good[:1] + bytes([good[1] | 0x04]) + good[2:]],
        "unknown conn_id": [stranger],
        "wrong key phase": [good[:1] + bytes([good[1] ^ 0x01]) + good[2:]],
        "replayed": [good, good],
        "too old": [far_ahead, old_pn],
        "bad tag": [bytes(flipped_tag)],
        "malformed": [malformed],
    }


@pytest.mark.parametrize(
    "reason",
    [
        "truncated",
        "oversized",
        "bad version",
        "unknown type",
        "unexpected type",
        "bad flags",
        "unknown conn_id",
        "wrong key phase",
        "replayed",
        "too old",
        "bad tag",
        "malformed",
    ],
)
def test_hostile_datagrams_are_dropped_without_a_reply_and_counted_by_reason(reason: str) -> None:
    harness = ready()
    sequence = hostile_datagrams(harness)[reason]
    for data in sequence:
        harness.datagram(data, address=("198.51.100.66", 666))
    harness.advance(0.03)  # past the max_ack_delay
    # Never a reply; an authenticated share in the sequence is acknowledged, nothing else.
    assert all(kind == DatagramType.ACK for _, kind, _ in harness.received())
    assert len(harness.datagrams) == (1 if reason in ("replayed", "too old") else 0)
    intake = harness.session.intake
    assert intake is not None and intake.statistics().dropped[reason] == 1
    # At most the one legitimate copy in the sequence reached the pool.
    legitimate = 1 if reason in ("replayed", "too old") else 0
    assert len(harness.submits()) == legitimate


def test_a_flood_over_the_rate_limit_is_dropped_before_decryption() -> None:
    harness = ready(intake=SidecarIntake(rate=10, burst=10, stranger_rate=1, stranger_burst=1))
    harness.datagram(harness.seal(harness.share(nonce=1000)))  # the stranger token: RIG is trusted now
    for nonce in range(25):  # forged tags from the proxy's own address
        bad = bytearray(harness.seal(harness.share(nonce=nonce)))
        bad[20] ^= 0xFF
        harness.datagram(bytes(bad))
    stats = harness.session.statistics()
    assert stats.shares_udp == 1 and stats.datagram_drops == {"bad tag": 10, "rate limited": 15}
    harness.datagram(harness.seal(harness.share(nonce=98)))  # the bucket is empty: so is the honest one's
    assert harness.session.statistics().datagram_drops["rate limited"] == 16
    harness.now += 1.0
    harness.datagram(harness.seal(harness.share(nonce=99)))
    assert harness.session.statistics().shares_udp == 2


def test_the_proxys_own_datagrams_are_not_rate_limited() -> None:
    """Authenticated datagrams give their token back (§6.1): 25 at once pass a budget of 10."""
    harness = ready(intake=SidecarIntake(rate=10, burst=10, stranger_rate=1, stranger_burst=1))
    for nonce in range(25):
        harness.datagram(harness.seal(harness.share(nonce=nonce)))
    stats = harness.session.statistics()
    assert stats.shares_udp == 25 and stats.datagram_drops == {}


def test_forged_datagrams_from_other_addresses_do_not_take_the_proxys_budget() -> None:
    """A bad-tag flood under the live conn_id empties the strangers' bucket only (§6.1)."""
    harness = ready(intake=SidecarIntake(rate=10, burst=10, stranger_rate=2, stranger_burst=2))
    harness.datagram(harness.seal(harness.share(nonce=1000)))  # RIG is trusted
    for index in range(500):
        bad = bytearray(harness.seal(harness.share(nonce=index)))
        bad[20] ^= 0xFF
        harness.datagram(bytes(bad), address=("198.51.100.66", 1000 + index))
    for nonce in range(10):
        harness.datagram(harness.seal(harness.share(nonce=2000 + nonce)))
    stats = harness.session.statistics()
    assert stats.shares_udp == 11
    assert stats.datagram_drops == {"bad tag": 2, "rate limited": 498}  # RIG's stranger token came back
    assert not harness.session.closed


def test_bad_tags_past_the_threshold_rekey_instead_of_closing() -> None:
    harness = ready(rekey_after_bad_tags=5, intake=SidecarIntake(rate=1e6, burst=1e6))
    old, old_keys = harness.material, harness.keys
    assert old is not None and old_keys is not None
    harness.take()
    for _ in range(5):
        bad = bytearray(harness.seal(harness.share()))
        bad[20] ^= 0xFF
        harness.datagram(bytes(bad))
    assert not harness.session.closed
    [keys_line] = [m for m in harness.take() if m.get("method") == "rm.keys"]
    assert keys_line["params"]["epoch"] == 1
    assert harness.material is not None and harness.material.conn_id != old.conn_id
    stats = harness.session.statistics()
    assert stats.bad_tag_rekeys == 1 and stats.key_epoch == 1
    # After the grace period the old conn_id is refused; the new keys carry shares.
    harness.now += 10.0
    intake = harness.session.intake
    assert intake is not None
    intake.handle_timer(harness.now)
    harness.datagram(old_keys.sealer.seal(harness.share(nonce=4)).data)
    assert intake.statistics().dropped["unknown conn_id"] == 1
    harness.datagram(harness.seal(harness.share(nonce=5)))
    assert harness.session.statistics().shares_udp == 1


def test_rekey_keeps_the_previous_epoch_for_the_grace_period() -> None:
    harness = ready(rekey_interval=60.0, heartbeat=100.0, dead_after=1000.0)
    assert harness.keys is not None and harness.material is not None
    old_keys, old_material = harness.keys, harness.material
    harness.datagram(old_keys.sealer.seal(Probe(probe_id=0)).data)  # teaches the address
    assert len(harness.datagrams) == 1
    harness.now += 60.0
    harness.session.handle_timer(harness.now)
    lines = harness.take()
    [keys_line] = [m for m in lines if m.get("method") == "rm.keys"]
    assert keys_line["params"]["epoch"] == 1 and harness.material.conn_id != old_material.conn_id
    new_keys = harness.keys
    # The old epoch still works during the grace period, and PROBE_ACKs stay under it ...
    harness.datagram(old_keys.sealer.seal(Probe(probe_id=1)).data)
    assert old_keys.opener.open(harness.datagrams[-1][0]) is not None
    assert len(harness.submits()) == 0
    # ... until the proxy uses the new epoch.
    harness.datagram(new_keys.sealer.seal(Probe(probe_id=2)).data)
    assert new_keys.opener.open(harness.datagrams[-1][0]) is not None
    intake = harness.session.intake
    assert intake is not None
    harness.now += intake.grace + 0.1
    harness.datagram(old_keys.sealer.seal(harness.share()).data)
    assert harness.session.statistics().datagram_drops == {"key expired": 1}
    assert harness.submits() == []


def test_datagrams_of_a_closed_session_are_unknown() -> None:
    intake = SidecarIntake()
    harness = Harness(intake=intake)
    harness.hello()
    harness.open_channel(3)
    data = harness.seal(harness.share())
    harness.send_raw(b"garbage\n")
    assert harness.session.closed
    assert intake.receive_datagram(data, RIG, harness.now) is None
    assert intake.statistics().dropped["unknown conn_id"] == 1 and intake.statistics().sessions == 0


# ------------------------------------------------------------------ liveness


def test_heartbeat_ping_pong_and_a_silent_proxy_is_dead() -> None:
    harness = ready(heartbeat=1.0, dead_after=5.0)
    harness.advance(1.0)
    [ping] = harness.take()
    assert ping["method"] == "rm.ping" and ping["params"]["t"] == pytest.approx(harness.now)
    harness.send({"method": "rm.ping", "params": {"t": 12.5}})
    assert harness.take() == [{"id": None, "method": "rm.pong", "params": {"t": 12.5}}]
    harness.send({"method": "rm.pong", "params": {"t": ping["params"]["t"]}})
    for _ in range(4):
        harness.advance(1.0)
    assert not harness.session.closed
    harness.advance(1.0)
    assert harness.session.closed and "silent" in (harness.session.close_reason or "")
    assert harness.lines[-1]["method"] == "rm.error" and 3 in harness.closed_pools


def test_the_proxys_rm_error_closes_quietly() -> None:
    harness = ready()
    harness.send({"method": "rm.error", "params": {"reason": "shutting down"}})
    assert harness.session.closed and "shutting down" in (harness.session.close_reason or "")
    assert harness.take() == [] and harness.session.protocol_error is None


def test_statistics_count_bytes_and_lines_saved() -> None:
    harness = Harness()
    harness.hello()
    for ch in (1, 2, 3, 4):
        harness.open_channel(ch, job=None)
    for ch in (1, 2, 3, 4):
        harness.pool(ch, {"id": None, "method": "mining.notify", "params": notify_params("jj")})
    harness.advance(0.01)
    stats = harness.session.statistics()
    assert stats.notify_deliveries == 4 and stats.notify_lines_saved == 2  # 4 lines became rm.job + rm.notify
    assert stats.channels_open == 4 and stats.control_bytes_sent > 0 and stats.pool_bytes_received > 0


# ------------------------------------------------------------------ cost


def test_cost_per_udp_share_through_the_core() -> None:
    """Datagram in -> submit out -> verdict in -> rm.results out, per share (printed with -s)."""
    harness = ready(intake=SidecarIntake(rate=1e6, burst=1e6))
    count = 3000
    assert harness.keys is not None
    datagrams = [harness.seal(harness.share(nonce=n)) for n in range(count)]
    session = harness.session
    replies = [b'{"id":%d,"result":true,"error":null}\n' % (3 + n) for n in range(count)]
    start = time.perf_counter()
    for n in range(count):
        session.receive_datagram(datagrams[n], RIG, harness.now)
        session.commands()
        session.pool_data(3, replies[n], harness.now)
        if n % 16 == 15:
            session.handle_timer(harness.now + 0.01)
            session.data_to_send()
    elapsed = time.perf_counter() - start
    per_share = elapsed / count * 1e6
    print(f"\nsidecar core: {per_share:.1f} µs per UDP share (open, submit, verdict, rm.results)")
    assert session.statistics().accepted == count
    assert per_share < 2000  # a pathology guard, not a benchmark


def test_a_share_the_pool_is_slow_to_judge_is_acknowledged_after_the_ack_delay() -> None:
    harness = ready(max_ack_delay=0.005)
    for nonce in (1, 2, 3):
        harness.datagram(harness.seal(harness.share(nonce=nonce)))  # pns 0, 1, 2
    first, second, third = harness.submits()
    harness.pool(3, {"id": second["id"], "result": True, "error": None})  # pn 1 judged at once
    harness.advance(0.004)
    assert [kind for _, kind, _ in harness.received()] == [DatagramType.VERDICT]
    harness.advance(0.002)  # past the 5 ms ack delay: one ACK for pns 0 and 2, with its delay
    [(_, _, ack)] = harness.received(DatagramType.ACK)
    assert ack.ranges == (AckRange(high=2, low=2), AckRange(high=0, low=0))
    assert ack.ack_delay_us == 6000
    assert len(harness.datagrams[-1][0]) == 32 + 5 + 24
    harness.pool(3, {"id": first["id"], "result": True, "error": None}, {"id": third["id"], "result": True, "error": None})
    assert harness.results() == [[0, 1, 0, 1], [0, 0, 0, 1], [0, 2, 0, 1]]
    harness.advance(0.01)
    stats = harness.session.statistics()
    assert stats.ack_datagrams_sent == 1 and stats.verdict_datagrams_sent == 2 and stats.udp_datagrams_sent == 3


def test_a_proxy_whose_bytes_wait_unread_is_busy_not_silent() -> None:
    harness = ready(heartbeat=1.0, dead_after=5.0)
    for _ in range(4):
        harness.advance(1.0)
    assert harness.now >= harness.session.silent_deadline() - 1.0
    due = harness.session.silent_deadline()
    harness.session.input_waiting(due)  # the driver saw bytes in the kernel: the sidecar is behind
    harness.session.handle_timer(due)
    assert not harness.session.closed and harness.session.silent_deadline() == due + 5.0


def test_time_the_sidecar_was_too_busy_to_read_is_not_the_proxys_silence() -> None:
    # dead_after 5 s. The sidecar's loop is starved (10,000 rigs connecting): its timer, due
    # 4 s after the proxy's last word, runs 7 s after it. The proxy's bytes could not have
    # been read in those 3 s, so they do not count: the proxy is silent only after 5 + 3 s.
    harness = ready(heartbeat=1.0, dead_after=5.0)
    session = harness.session
    spoke = session.silent_deadline() - 5.0
    session.handle_timer(spoke + 7.0, due=spoke + 4.0)
    assert not session.closed and session.silent_deadline() == pytest.approx(spoke + 8.0)
    session.handle_timer(spoke + 8.0, due=spoke + 8.0)
    assert session.close_reason == "proxy silent for 5 s (no line, no rm.pong)"
    # The same late timer without its due time (nothing known about the lag) is silence.
    plain = ready(heartbeat=1.0, dead_after=5.0)
    plain.session.handle_timer(plain.session.silent_deadline() + 2.0)
    assert plain.session.closed


def test_a_silent_proxy_whose_tcp_still_acknowledges_is_busy_not_gone() -> None:
    harness = ready(heartbeat=1.0, dead_after=5.0)
    session = harness.session
    due = session.silent_deadline()
    session.peer_acknowledged(0.3, due)  # the driver read TCP_INFO: the proxy's kernel answers
    session.handle_timer(due, due=due)
    assert not session.closed and session.silent_deadline() == pytest.approx(due + 5.0)
    gone = ready(heartbeat=1.0, dead_after=5.0)
    deadline = gone.session.silent_deadline()
    gone.session.peer_acknowledged(4.0, deadline)  # nothing acknowledged for 4 s: the path is gone
    gone.session.handle_timer(deadline, due=deadline)
    assert gone.session.close_reason == "proxy silent for 5 s (no line, no rm.pong)"
