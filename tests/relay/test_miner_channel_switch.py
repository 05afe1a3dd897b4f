"""Moving one rig between upstream sessions, sans-IO: replayed handshake, set_extranonce, reconnect, draining."""

from __future__ import annotations

import json

from bridge.relay.miner_channel import MinerChannel
from bridge.sv1.client import ClientSession

PREV = "00" * 32


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().split("\n") if line]


class Pool:
    """A hand-driven upstream: reads what the channel sent, answers like a pool."""

    def __init__(self, channel: MinerChannel, extranonce1: str) -> None:
        self.channel = channel
        self.session = ClientSession()
        self.extranonce1 = extranonce1
        self.leg = None
        self.received: list[dict] = []
        self._answered: set[int] = set()

    def feed(self, message: dict, now: float = 1.0) -> None:
        events = self.session.receive_data(json.dumps(message).encode() + b"\n")
        self.channel.upstream_events(events, now, leg=self.leg)

    def sent(self) -> list[dict]:
        out = lines(self.session.data_to_send())
        self.received.extend(out)
        return out

    def answer_handshake(self, now: float = 1.0, job: str = "j1") -> None:
        """Answer every subscribe/authorize/configure sent so far; then a job."""
        for _ in range(3):  # authorize is released after the subscribe result
            self.sent()
            for message in list(self.received):
                if message.get("id") in self._answered:
                    continue
                self._answered.add(message.get("id"))
                method = message.get("method")
                if method == "mining.subscribe":
                    self.feed(
                        {"id": message["id"], "result": [[["mining.notify", "s"]], self.extranonce1, 4], "error": None}, now
                    )
                    self.feed({"id": None, "method": "mining.set_difficulty", "params": [0.5]}, now)
                    self.notify(job, now, clean=False)
                elif method == "mining.authorize":
                    self.feed({"id": message["id"], "result": True, "error": None}, now)
                elif method == "mining.configure":
                    self.feed(
                        {
                            "id": message["id"],
                            "result": {"version-rolling": True, "version-rolling.mask": "1fffe000"},
                            "error": None,
                        },
                        now,
                    )

    def notify(self, job: str, now: float = 1.0, clean: bool = True) -> None:
        self.feed(
            {
                "id": None,
                "method": "mining.notify",
                "params": [job, PREV, "01", "02", [], "20000000", "17034219", "6554a2c1", clean],
            },
            now,
        )


def rig(channel: MinerChannel, *messages: dict, now: float = 0.5) -> None:
    channel.miner_data(b"".join(json.dumps(m).encode() + b"\n" for m in messages), now)


def to_rig(channel: MinerChannel) -> list[dict]:
    return lines(channel.miner.data_to_send())


def submit(request_id, job: str) -> dict:
    return {"id": request_id, "method": "mining.submit", "params": ["w.1", job, "00000001", "6554a2c1", "00000002"]}


def connected(xnsub: bool, extranonce1: str = "aaaa0001") -> tuple[MinerChannel, Pool]:
    channel = MinerChannel(drain_timeout=5.0)
    first = Pool(channel, extranonce1)
    rig(
        channel,
        {"id": 1, "method": "mining.subscribe", "params": ["bmminer/2.0.0"]},
        {"id": 2, "method": "mining.authorize", "params": ["w.1", "pw"]},
    )
    first.leg = channel.attach_upstream(first.session, 0.5, key="first")
    first.answer_handshake()
    if xnsub:
        rig(channel, {"id": 3, "method": "mining.extranonce.subscribe", "params": []})
        for message in first.sent():
            first.feed({"id": message["id"], "result": True, "error": None})
    out = to_rig(channel)
    assert out[0]["result"][1] == extranonce1 and channel.subscribed
    return channel, first


def test_a_subscribed_rig_gets_set_extranonce_then_a_clean_job_from_the_new_upstream() -> None:
    channel, first = connected(xnsub=True)
    rig(channel, submit(10, "j1"))  # in flight on the first upstream
    second = Pool(channel, "bbbb0002")
    second.leg = channel.switch_upstream(second.session, 2.0, key="second")
    replayed = second.sent()
    assert [m["method"] for m in replayed] == ["mining.subscribe"]
    assert replayed[0]["params"] == ["bmminer/2.0.0"]  # the rig's agent, no old session id
    assert to_rig(channel) == []  # nothing reaches the rig before the new session is ready
    second.answer_handshake(job="k1")
    assert {m["method"] for m in second.received if "method" in m} >= {"mining.authorize", "mining.extranonce.subscribe"}
    authorize = next(m for m in second.received if m.get("method") == "mining.authorize")
    assert authorize["params"] == ["w.1", "pw"]
    [result] = channel.take_switch_results()
    assert result.ok and channel.leg is second.leg
    out = to_rig(channel)
    assert [m.get("method") for m in out] == ["mining.set_extranonce", "mining.set_difficulty", "mining.notify"]
    assert out[0]["params"] == ["bbbb0002", 4]
    assert out[2]["params"][0] == "k1" and out[2]["params"][8] is True  # forced clean
    # the share in flight still gets the first pool's verdict
    [sent] = [m for m in first.sent() if m.get("method") == "mining.submit"]
    first.feed({"id": sent["id"], "result": True, "error": None})
    assert to_rig(channel) == [{"id": 10, "result": True, "error": None}]
    # shares are routed by job id: old job to the old pool, new job to the new one
    rig(channel, submit(11, "j1"), submit(12, "k1"))
    assert [m["params"][1] for m in first.sent() if m.get("method") == "mining.submit"] == ["j1"]
    assert [m["params"][1] for m in second.sent() if m.get("method") == "mining.submit"] == ["k1"]
    # the old pool's notifications no longer reach the rig
    first.notify("j2")
    assert to_rig(channel) == []


def test_a_draining_leg_is_retired_and_its_late_shares_are_answered_stale_locally() -> None:
    channel, first = connected(xnsub=True)
    second = Pool(channel, "bbbb0002")
    second.leg = channel.switch_upstream(second.session, 2.0)
    second.answer_handshake(job="k1")
    to_rig(channel)
    assert channel.retire_drained(3.0) == []
    assert channel.retire_drained(7.5) == [first.leg]
    rig(channel, submit(20, "j1"), now=8.0)
    [answer] = to_rig(channel)
    assert answer["id"] == 20 and answer["result"] is False and answer["error"][0] == 21
    assert channel.statistics().stale_local == 1 and channel.statistics().switches == 1


def test_losing_the_old_upstream_mid_switch_answers_its_shares_with_an_explicit_error() -> None:
    channel, first = connected(xnsub=True)
    rig(channel, submit(10, "j1"))
    second = Pool(channel, "bbbb0002")
    second.leg = channel.switch_upstream(second.session, 2.0)
    channel.fail_leg(first.leg, "upstream silent for 5 s", 2.0)
    [answer] = to_rig(channel)
    assert answer["id"] == 10 and answer["result"] is False and "not confirmed" in answer["error"][1]
    assert not channel.closed
    second.answer_handshake(job="k1")
    assert next(m.get("method") for m in to_rig(channel)) == "mining.set_extranonce"


def test_a_refused_authorize_abandons_the_switch() -> None:
    channel, first = connected(xnsub=True)
    second = Pool(channel, "bbbb0002")
    second.leg = channel.switch_upstream(second.session, 2.0)
    for message in second.sent():
        second.feed({"id": message["id"], "result": [[], "bbbb0002", 4], "error": None})
    for message in second.sent():
        if message["method"] == "mining.authorize":
            second.feed({"id": message["id"], "result": False, "error": [24, "Unauthorized worker", None]})
    [result] = channel.take_switch_results()
    assert not result.ok and "authorize refused" in result.reason
    assert channel.leg is first.leg and to_rig(channel) == []


def test_a_rig_without_extranonce_subscribe_is_reconnected_after_its_verdicts() -> None:
    channel, first = connected(xnsub=False)
    rig(channel, submit(10, "j1"))
    channel.request_reconnect("moving to the backup", 2.0)
    assert to_rig(channel) == [] and not channel.closed  # waits for the verdict
    [sent] = [m for m in first.sent() if m.get("method") == "mining.submit"]
    first.feed({"id": sent["id"], "result": True, "error": None}, 2.1)
    out = to_rig(channel)
    assert out == [{"id": 10, "result": True, "error": None}, {"id": None, "method": "client.reconnect", "params": []}]
    assert "client.reconnect" in channel.reconnect_reason and not channel.closed
    # a share that crossed the reconnect still goes to its pool
    rig(channel, submit(11, "j1"), now=2.2)
    assert [m["params"][1] for m in first.sent() if m.get("method") == "mining.submit"] == ["j1"]
    channel.handle_timer(4.1)  # the rig never closed: the proxy does, after the linger
    assert channel.closed and "client.reconnect" in channel.close_reason


def test_reconnect_does_not_wait_forever_for_a_silent_pool() -> None:
    channel, _first = connected(xnsub=False)
    rig(channel, submit(10, "j1"))
    channel.request_reconnect("moving", 2.0)
    assert channel.get_timer() == 7.0
    channel.handle_timer(7.0)
    out = to_rig(channel)
    assert out[0]["id"] == 10 and out[0]["result"] is False and "not confirmed" in out[0]["error"][1]
    assert out[1]["method"] == "client.reconnect" and channel.reconnecting


def test_a_rig_still_in_its_handshake_moves_without_noticing() -> None:
    channel = MinerChannel()
    first = Pool(channel, "aaaa0001")
    rig(channel, {"id": 1, "method": "mining.subscribe", "params": ["cgminer/4.11.1"]})
    first.leg = channel.attach_upstream(first.session, 0.5)
    assert [m["method"] for m in first.sent()] == ["mining.subscribe"]
    channel.upstream_lost("connection reset", 0.6, leg=first.leg, release=False)
    assert to_rig(channel) == [] and not channel.closed
    rig(channel, {"id": 2, "method": "mining.authorize", "params": ["w.1", "x"]}, now=0.7)
    second = Pool(channel, "bbbb0002")
    second.leg = channel.switch_upstream(second.session, 0.8)
    second.answer_handshake(job="k1")
    out = to_rig(channel)
    assert out[0] == {"id": 1, "result": [[["mining.notify", "s"]], "bbbb0002", 4], "error": None}
    assert {"id": 2, "result": True, "error": None} in out
    assert not any(m.get("method") == "mining.set_extranonce" for m in out)


def test_without_a_current_upstream_shares_get_an_explicit_answer() -> None:
    channel, first = connected(xnsub=True)
    channel.upstream_lost("connection reset", 2.0, leg=first.leg, release=False)
    rig(channel, submit(30, "j1"), submit(31, "zz"), now=2.1)
    out = to_rig(channel)
    assert [(m["id"], m["error"][0]) for m in out] == [(30, 21), (31, 20)]
    assert all(m["result"] is False for m in out)


def test_an_answered_handshake_keeps_its_requests_and_no_pending_records() -> None:
    """Issue 9.6 (memory per rig): once the pool answered the handshake, the channel keeps
    the requests to replay on a new upstream, not their pending records; the replay works."""
    import gc

    from bridge.relay.miner_channel import PendingRequest

    channel, _first = connected(xnsub=True)
    channel.get_timer()  # drops the answered records from the channel's queue of pending requests
    gc.collect()
    live = [o for o in gc.get_objects() if type(o) is PendingRequest and o.method != "answered"]
    assert [p.method for p in live if any(p is q for _, q in channel._handshake)] == []
    second = Pool(channel, "bbbb0002")
    second.leg = channel.switch_upstream(second.session, 2.0, key="second")
    second.answer_handshake(2.0, job="k1")
    replayed = [m.get("method") for m in second.received]
    assert "mining.subscribe" in replayed and "mining.authorize" in replayed, replayed
    assert any(m.get("params") == ["w.1", "pw"] for m in second.received)  # the rig's own authorize, kept
    [result] = channel.take_switch_results()
    assert result.ok and channel.leg is second.leg
