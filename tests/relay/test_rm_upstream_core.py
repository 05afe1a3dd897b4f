"""The proxy side of StratumRM, driven sans-IO against a hand-made sidecar."""

from __future__ import annotations

import json

import msgspec
import pytest

from bridge.relay.rm_upstream import ChannelClosed, StratumRMConnection
from bridge.sv1.events import Reply
from bridge.sv1.messages import Notify, SubmitParams
from bridge.sv1.rejects import read_verdict
from bridge.wire import control
from bridge.wire.datagram import (
    Ack,
    AckRange,
    DatagramType,
    Probe,
    ProbeAck,
    Share,
    ShareBatch,
    VerdictEntry,
    Verdicts,
    decode_body,
    parse_header,
)
from bridge.wire.keys import KeyMaterial, KeySet, Role

NOTIFY = [
    "6b05d75700000037",
    "36b6b33055f3556c2919c92af2fc9ddeeee9c69503e3f3e7f193bdcf00000000",
    "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff21016d000415d9056b0447544e010c",
    "0a636b706f6f6cffffffff0200f2052a01000000160014751e76e8199196d454941c45d1b3a323f1433bd600000000",
    [],
    "20000000",
    "1d00ffff",
    "6b05d915",
    True,
]


class FakeSidecar:
    """Just enough of a sidecar: answers hello, hands out keys, opens datagrams."""

    def __init__(self, conn: StratumRMConnection) -> None:
        self.conn = conn
        self.material = KeyMaterial(0x1122334455667788, 1, bytes(range(32)))
        self.keys = KeySet.derive(self.material, Role.SIDECAR)
        self.lines: list[dict] = []

    def send(self, *lines: bytes, now: float = 0.0) -> None:
        self.conn.receive_data(b"".join(lines), now)

    def read(self) -> list[dict]:
        new = [json.loads(line) for line in self.conn.data_to_send().decode().splitlines()]
        self.lines.extend(new)
        return new

    def open(self, datagram: bytes):
        header = parse_header(datagram)
        plaintext = self.keys.opener.open(datagram)
        assert plaintext is not None, "datagram does not authenticate under the session key"
        return header, decode_body(header.type, plaintext)

    def start(self, *, udp: bool = True, now: float = 0.0, dead_after: float = 1000.0, max_ack_delay: float = 0.005) -> None:
        self.conn.start(now)
        hello = self.read()[0]
        assert hello["method"] == "rm.hello" and hello["params"]["version"] == 1
        result = control.HelloResult(
            version=1,
            features=["udp-shares", "udp-v2"],
            udp_port=3334 if udp else None,
            dead_after=dead_after,
            max_ack_delay=max_ack_delay,
        )
        self.send(control.encode_rm_result(1, result), now=now)
        if udp:
            keys = control.Keys(conn_id=f"{self.material.conn_id:016x}", epoch=1, secret=self.material.secret.hex())
            self.send(control.encode_rm(keys), now=now)
            [probe] = self.conn.datagrams_to_send()
            _header, body = self.open(probe)
            assert isinstance(body, Probe)
            ack = self.keys.sealer.seal(ProbeAck(body.probe_id)).data
            self.conn.receive_datagram(ack, ("127.0.0.1", 3334), now)
            assert self.conn.udp_up


def channel_ready(conn: StratumRMConnection, sidecar: FakeSidecar, *, nbits: str = "1d00ffff"):
    channel = conn.open_channel("10.0.0.2:4028")
    channel.subscribe("cgminer/4.11.1", context="sub")
    channel.request("mining.authorize", ["alice.rig1", "x"], context="auth")
    sent = sidecar.read()
    assert [m.get("method") for m in sent] == ["rm.open", "mining.subscribe", "mining.authorize"]
    assert sent[1]["ch"] == channel.ch and sent[1]["params"] == ["cgminer/4.11.1"]
    sidecar.send(
        control.encode_channel_response(
            channel.ch, sent[1]["id"], msgspec.Raw(b'[[["mining.notify","ab"]],"5ad7056b",8]'), msgspec.Raw(b"null")
        ),
        control.encode_channel_response(channel.ch, sent[2]["id"], msgspec.Raw(b"true"), msgspec.Raw(b"null")),
    )
    notify = list(NOTIFY)
    notify[6] = nbits
    sidecar.send(
        b'{"id":null,"method":"rm.job","params":{"job":7,"notify":' + json.dumps(notify).encode() + b"}}\n",
        control.encode_rm(control.NotifyChannels(job=7, ch=[channel.ch])),
    )
    events = channel.events
    channel.events = []
    assert [type(e) for e in events] == [Reply, Reply, Notify]
    assert events[0].context == "sub" and events[2].params.job_id == NOTIFY[0]
    return channel


SUBMIT = SubmitParams("alice.rig1", NOTIFY[0], "0100000000000000", "6b05d915", "0a029ed1")


def test_handshake_keys_and_probe_bring_udp_up() -> None:
    conn = StratumRMConnection()
    sidecar = FakeSidecar(conn)
    sidecar.start()
    assert conn.ready and conn.udp_up


def test_a_share_goes_as_one_sealed_record_and_its_verdict_comes_back() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    serial = channel.submit(SUBMIT, context="rig-id-4")
    [datagram] = conn.datagrams_to_send()
    header, body = sidecar.open(datagram)
    assert header.type == DatagramType.SHARE and isinstance(body, Share)
    assert (body.channel_id, body.job_handle, body.extranonce2, body.ntime, body.nonce) == (
        channel.ch,
        7,
        bytes.fromhex("0100000000000000"),
        0x6B05D915,
        0x0A029ED1,
    )
    assert body.version_bits is None and body.worker_index is None
    assert len(datagram) <= 60
    verdict = sidecar.keys.sealer.seal(Verdicts((VerdictEntry(header.pn, 0),))).data
    assert len(verdict) == 37
    conn.receive_datagram(verdict, ("127.0.0.1", 3334), 0.004)
    [reply] = channel.events
    assert reply.context == "rig-id-4" and reply.accepted and reply.request_id == serial
    assert conn.delivery.rtt.srtt == pytest.approx(0.004)  # the verdict acknowledged the datagram
    stats = conn.statistics()
    assert stats.pending == 0 and stats.verdict_datagrams_received == 1


def test_a_slow_pool_is_no_reason_to_send_again_once_the_sidecar_acknowledged() -> None:
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.1)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    channel.submit(SUBMIT, context="slow")
    [datagram] = conn.datagrams_to_send()
    pn = sidecar.open(datagram)[0].pn
    # The ACK comes 5.3 ms later, 5 ms of it held at the sidecar. As in QUIC, the
    # ack delay is subtracted only above the smallest sample: the first one counts whole.
    ack = sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pn, pn),), ack_delay_us=5000)).data
    conn.receive_datagram(ack, ("127.0.0.1", 3334), 0.0053)
    assert conn.delivery.rtt.srtt == pytest.approx(0.0053)
    # The pool answers after 300 ms (far past the transport RTO): nothing was sent again.
    deadline = conn.get_timer()
    assert deadline is not None and deadline > 0.25
    conn.handle_timer(0.24)
    assert conn.datagrams_to_send() == []
    verdict = sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pn, 0),))).data
    conn.receive_datagram(verdict, ("127.0.0.1", 3334), 0.24)
    [reply] = channel.events
    assert reply.accepted
    stats = conn.statistics()
    assert stats.retransmissions_udp == stats.retransmissions_tls == stats.verdict_queries == 0
    assert stats.acks_received == 1
    assert conn.delivery.verdict_rtt.srtt == pytest.approx(0.24 - 0.0053)


def test_a_lost_verdict_is_asked_for_again_after_the_verdict_timeout() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    channel.submit(SUBMIT, context="lost verdict")
    [datagram] = conn.datagrams_to_send()
    pn = sidecar.open(datagram)[0].pn
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pn, pn),))).data, ("127.0.0.1", 3334), 0.001)
    conn.handle_timer(0.5)
    assert conn.datagrams_to_send() == []  # the verdict timeout starts at 1 s
    conn.handle_timer(1.01)
    [again] = conn.datagrams_to_send()
    header, body = sidecar.open(again)
    assert header.pn > pn and isinstance(body, Share) and body.nonce == 0x0A029ED1
    assert conn.statistics().verdict_queries == 1
    conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(header.pn, 0),))).data, ("127.0.0.1", 3334), 1.02)
    [reply] = channel.events
    assert reply.accepted and conn.statistics().pending == 0


def test_a_verdict_that_comes_after_a_verdict_timeout_ends_its_back_off() -> None:
    # A lossy link backs the verdict timeout off (1 s, 2 s, ... 10 s); once verdicts come
    # again it must not stay there, or a later lost verdict keeps its rig waiting 10 s.
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    base = conn.delivery.verdict_rtt.rto
    channel.submit(SUBMIT, context="lost verdict")
    [datagram] = conn.datagrams_to_send()
    pn = sidecar.open(datagram)[0].pn
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pn, pn),))).data, ("127.0.0.1", 3334), 0.001)
    conn.handle_timer(base + 0.01)
    [_query] = conn.datagrams_to_send()  # the verdict is asked for again
    assert conn.delivery.verdict_rtt.rto == pytest.approx(2 * base)  # backed off
    channel.submit(SubmitParams("alice.rig1", NOTIFY[0], "0100000000000000", "6b05d915", "0a029ed5"), context="next")
    [fresh] = conn.datagrams_to_send()
    fresh_pn = sidecar.open(fresh)[0].pn
    verdict = sidecar.keys.sealer.seal(Verdicts((VerdictEntry(fresh_pn, 0),))).data  # acknowledges it too
    conn.receive_datagram(verdict, ("127.0.0.1", 3334), base + 0.02)
    assert [e.context for e in channel.events] == ["next"]
    assert conn.delivery.verdict_rtt.rto == pytest.approx(base)


def _two_acknowledged_shares(conn: StratumRMConnection, sidecar: FakeSidecar):
    channel = channel_ready(conn, sidecar)
    pns = []
    for nonce in ("0a029ed1", "0a029ed2"):
        channel.submit(SubmitParams("alice.rig1", NOTIFY[0], "0100000000000000", "6b05d915", nonce), context=nonce)
        [datagram] = conn.datagrams_to_send()
        pns.append(sidecar.open(datagram)[0].pn)
    ack = Ack(ranges=(AckRange(pns[1], pns[0]),))
    conn.receive_datagram(sidecar.keys.sealer.seal(ack).data, ("127.0.0.1", 3334), 0.001)
    return channel, pns


def test_a_verdict_is_not_asked_for_again_while_every_sidecar_datagram_arrives() -> None:
    # Both shares acknowledged; the second one's verdict comes, the first one's pool is
    # slow. Every datagram the sidecar sent arrived (no gap in its packet numbers), so
    # no VERDICT was lost: the verdict timeout asks nothing and keeps waiting.
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel, pns = _two_acknowledged_shares(conn, sidecar)
    conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pns[1], 0),))).data, ("127.0.0.1", 3334), 0.5)
    conn.handle_timer(1.01)
    assert conn.datagrams_to_send() == []
    stats = conn.statistics()
    assert stats.verdict_queries == 0 and stats.verdict_waits == 1 and stats.pending == 1
    conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pns[0], 0),))).data, ("127.0.0.1", 3334), 1.5)
    assert [reply.context for reply in channel.events] == ["0a029ed2", "0a029ed1"]
    stats = conn.statistics()
    assert stats.pending == 0 and stats.verdict_queries == 0
    assert stats.retransmissions_udp == stats.retransmissions_tls == 0


def test_a_missing_sidecar_datagram_makes_the_verdict_timeout_ask_again() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    _channel, pns = _two_acknowledged_shares(conn, sidecar)
    sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pns[0], 0),)))  # lost on the way
    conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pns[1], 0),))).data, ("127.0.0.1", 3334), 0.5)
    conn.handle_timer(1.01)
    [again] = conn.datagrams_to_send()
    _header, body = sidecar.open(again)
    assert isinstance(body, Share) and body.nonce == 0x0A029ED1
    assert conn.statistics().verdict_queries == 1


def test_a_verdict_lost_before_its_datagram_was_acknowledged_is_still_asked_for() -> None:
    # Two shares in one datagram. The sidecar's VERDICT for the first is lost; the one
    # for the second acknowledges the datagram and reveals the gap at the same moment.
    # The lost datagram was sent after the share: it may have carried its verdict.
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    for nonce in ("0a029ed1", "0a029ed2"):
        channel.submit(SubmitParams("alice.rig1", NOTIFY[0], "0100000000000000", "6b05d915", nonce), context=nonce)
    [datagram] = conn.datagrams_to_send(0.0)
    pn = sidecar.open(datagram)[0].pn
    sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pn, 0),)))  # lost on the way
    conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pn, 1),))).data, ("127.0.0.1", 3334), 0.01)
    conn.receive_datagram(sidecar.keys.sealer.seal(ProbeAck(99)).data, ("127.0.0.1", 3334), 0.5)  # heard again
    conn.handle_timer(1.02)
    [again] = conn.datagrams_to_send(1.02)
    body = sidecar.open(again)[1]
    assert isinstance(body, Share) and body.nonce == 0x0A029ED1
    assert conn.statistics().verdict_queries == 1 and [r.context for r in channel.events] == ["0a029ed2"]


def test_the_retransmission_deadline_adds_the_announced_ack_delay_and_late_acks_raise_a_floor() -> None:
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.1)
    sidecar = FakeSidecar(conn)
    sidecar.start(max_ack_delay=0.025)
    channel = channel_ready(conn, sidecar)
    channel.submit(SUBMIT, context="late")
    [first] = conn.datagrams_to_send(0.0)
    assert conn.get_timer() == pytest.approx(0.125)  # RTO + the sidecar's max_ack_delay (QUIC's PTO)
    conn.handle_timer(0.126)
    [_second] = conn.datagrams_to_send(0.126)
    assert conn.statistics().retransmissions_udp == 1
    # The first copy was only late: its acknowledgement comes at 0.2 s. The next share
    # gets at least twice that before it is sent again; the floor halves every 60 s.
    pn = sidecar.open(first)[0].pn
    conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(pn, 0),))).data, ("127.0.0.1", 3334), 0.2)
    stats = conn.statistics()
    assert stats.spurious_retransmissions == 1 and stats.retransmission_floor_ms == pytest.approx(400)
    assert conn.delivery.retransmission_timeout(0.2) >= 0.4
    conn.handle_timer(60.2)
    assert conn.statistics().retransmission_floor_ms == pytest.approx(200)
    assert [reply.accepted for reply in channel.events] == [True]
    # A sidecar announcing an absurd ack delay is capped.
    conn2 = StratumRMConnection(detect_blocks=False)
    FakeSidecar(conn2).start(max_ack_delay=1e9)
    assert conn2.delivery.retransmission_timeout(0.0) == pytest.approx(conn2.delivery.rtt.rto + 0.2)


def _shares_in_own_datagrams(conn, sidecar: FakeSidecar, channel, nonces: tuple[str, ...], sent_at) -> list[int]:
    """Submit a share per nonce, each sealed in its own datagram at ``sent_at(index)``; their packet numbers."""
    pns = []
    for index, nonce in enumerate(nonces):
        channel.submit(SubmitParams("alice.rig1", NOTIFY[0], "0100000000000000", "6b05d915", nonce), context=nonce)
        [datagram] = conn.datagrams_to_send(sent_at(index))
        pns.append(sidecar.open(datagram)[0].pn)
    return pns


def test_a_silent_sidecar_gets_one_probe_per_timeout_not_every_share_again() -> None:
    # Three shares in three datagrams, then nothing from the sidecar at all (a stalled
    # process or path): the timer sends only the oldest again, as QUIC's PTO probes.
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.1)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    pns = _shares_in_own_datagrams(conn, sidecar, channel, ("0a029ed1", "0a029ed2", "0a029ed3"), lambda _: 0.001)
    conn.handle_timer(0.2)
    [probe] = conn.datagrams_to_send(0.2)
    body = sidecar.open(probe)[1]
    assert isinstance(body, Share) and body.nonce == 0x0A029ED1
    stats = conn.statistics()
    assert stats.retransmissions_udp == 1 and stats.probe_waits == 2
    # The stall ends: the sidecar acknowledges the three first copies. Nothing else goes.
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pns[2], pns[0]),))).data, ("127.0.0.1", 3334), 0.25)
    conn.handle_timer(0.9)
    assert conn.datagrams_to_send(0.9) == []
    stats = conn.statistics()
    assert stats.retransmissions_udp == 1 and stats.spurious_retransmissions == 1


def test_shares_expiring_one_after_another_back_the_timeout_off_once_and_count_one_udp_failure() -> None:
    # Three shares 10 ms apart, each in its own datagram, all lost (a later datagram is
    # acknowledged: evidence of loss). Their deadlines come one after another within one
    # timeout: as with TCP's single timer, that is one back-off and one UDP failure, not
    # three (which would double the timeout three times and declare UDP blocked at once).
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.1)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    nonces = ("0a029ed1", "0a029ed2", "0a029ed3", "0a029ed4")
    pns = _shares_in_own_datagrams(conn, sidecar, channel, nonces, lambda index: 0.01 * index)
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pns[3], pns[3]),))).data, ("127.0.0.1", 3334), 0.031)
    base = conn.delivery.rtt.rto
    for _ in range(3):  # each share's deadline in turn
        due = conn.get_timer()
        assert due is not None and due < 0.2
        conn.handle_timer(due)
        conn.datagrams_to_send(due)
    assert conn.statistics().retransmissions_udp == 3
    assert conn.delivery.rtt.rto == pytest.approx(2 * base)
    assert conn.delivery.udp_up


def test_without_evidence_of_loss_an_expiry_sends_one_probe_even_for_shares_sent_before_the_sidecar_spoke() -> None:
    # Three shares, the first acknowledged; then the sidecar stalls (a garbage
    # collection, a descheduled process, a backlog in its socket). The other two were
    # sent before it last spoke, but nothing sent after them was acknowledged: one probe.
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.1)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    nonces = ("0a029ed1", "0a029ed2", "0a029ed3")
    pns = _shares_in_own_datagrams(conn, sidecar, channel, nonces, lambda index: 0.001 * (index + 1))
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pns[0], pns[0]),))).data, ("127.0.0.1", 3334), 0.01)
    conn.handle_timer(0.2)
    [probe] = conn.datagrams_to_send(0.2)
    body = sidecar.open(probe)[1]
    assert isinstance(body, Share) and body.nonce == 0x0A029ED2
    stats = conn.statistics()
    assert stats.retransmissions_udp == 1 and stats.probe_waits == 1
    # The stall ends: both first copies are acknowledged; nothing else goes.
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pns[2], pns[1]),))).data, ("127.0.0.1", 3334), 0.21)
    conn.handle_timer(0.9)
    assert conn.datagrams_to_send(0.9) == []
    assert conn.statistics().retransmissions_udp == 1


def test_an_acknowledgement_of_a_later_datagram_is_evidence_of_loss_and_every_expired_share_goes() -> None:
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.1)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    nonces = ("0a029ed1", "0a029ed2", "0a029ed3")
    pns = _shares_in_own_datagrams(conn, sidecar, channel, nonces, lambda index: 0.001 * (index + 1))
    # The third datagram is acknowledged, the first two never: they were lost.
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pns[2], pns[2]),))).data, ("127.0.0.1", 3334), 0.01)
    conn.handle_timer(0.2)
    copies = conn.datagrams_to_send(0.2)
    nonces = sorted(record.nonce for datagram in copies for record in _records(sidecar.open(datagram)[1]))
    assert nonces == [0x0A029ED1, 0x0A029ED2]
    assert conn.statistics().probe_waits == 0


def _records(body):
    return list(body.shares) if isinstance(body, ShareBatch) else [body]


def test_acknowledged_shares_of_a_silent_sidecar_ask_for_their_verdicts_one_at_a_time() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    pns = []
    for nonce in ("0a029ed1", "0a029ed2", "0a029ed3"):
        channel.submit(SubmitParams("alice.rig1", NOTIFY[0], "0100000000000000", "6b05d915", nonce), context=nonce)
        [datagram] = conn.datagrams_to_send(0.0)
        pns.append(sidecar.open(datagram)[0].pn)
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(pns[2], pns[0]),))).data, ("127.0.0.1", 3334), 0.001)
    conn.handle_timer(1.01)  # the verdict timeout, and not a word from the sidecar since the ACK
    [query] = conn.datagrams_to_send(1.01)
    assert isinstance(sidecar.open(query)[1], Share)
    stats = conn.statistics()
    assert stats.verdict_queries == 1 and stats.probe_waits == 2 and stats.pending == 3


def test_a_verdict_with_detail_keeps_the_pools_words_and_an_ack_covers_several_datagrams() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    pns = []
    for i in range(3):
        channel.submit(msgspec.structs.replace(SUBMIT, nonce=f"{i:08x}"), context=i)
        [datagram] = conn.datagrams_to_send()
        pns.append(sidecar.open(datagram)[0].pn)
    ack = Ack(ranges=(AckRange(pns[2], pns[1]), AckRange(pns[0], pns[0])), ack_delay_us=100)
    conn.receive_datagram(sidecar.keys.sealer.seal(ack).data, ("127.0.0.1", 3334), 0.002)
    detail = b'{"result":false,"error":null,"reject-reason":"Stale"}'
    verdicts = Verdicts((VerdictEntry(pns[0]), VerdictEntry(pns[1], 0, detail), VerdictEntry(pns[2], 0, b"{bad")))
    conn.receive_datagram(sidecar.keys.sealer.seal(verdicts).data, ("127.0.0.1", 3334), 0.003)
    replies = {r.context: r for r in channel.events}
    assert replies[0].accepted
    assert replies[1].response.reject_reason == "Stale" and read_verdict(replies[1].response).code == 21
    assert not replies[2].accepted  # unreadable: an explicit error, never a silent accept


def test_a_sidecar_without_data_channel_v2_gets_shares_over_tls() -> None:
    conn = StratumRMConnection()
    conn.start(0.0)
    conn.data_to_send()
    old = control.HelloResult(version=1, features=["udp-shares"], udp_port=3334)
    conn.receive_data(control.encode_rm_result(1, old), 0.0)
    assert conn.ready and conn.hello is not None and conn.hello.udp_port is None


def test_a_batch_window_delays_only_shares_that_follow_another_within_it() -> None:
    conn = StratumRMConnection(detect_blocks=False, batch_window=0.002)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    channel.submit(msgspec.structs.replace(SUBMIT, nonce="00000001"))
    [lone] = conn.datagrams_to_send(0.1)  # alone: it goes at once
    assert isinstance(sidecar.open(lone)[1], Share)
    channel.submit(msgspec.structs.replace(SUBMIT, nonce="00000002"))
    assert conn.datagrams_to_send(0.1005) == []  # another went 0.5 ms ago: it waits for the window
    due = conn.get_timer()
    assert due == pytest.approx(0.102)
    channel.submit(msgspec.structs.replace(SUBMIT, nonce="00000003"))
    assert conn.datagrams_to_send(0.101) == []
    conn.handle_timer(due)
    [batch] = conn.datagrams_to_send(due)
    assert sorted(r.nonce for r in _records(sidecar.open(batch)[1])) == [2, 3]  # together, one datagram
    channel.submit(msgspec.structs.replace(SUBMIT, nonce="00000004"))
    [later] = conn.datagrams_to_send(0.2)  # the window since the last datagram is over: at once
    assert isinstance(sidecar.open(later)[1], Share)


def test_shares_of_one_step_share_a_datagram_and_rejects_keep_the_pools_words() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    for i in range(3):
        channel.submit(msgspec.structs.replace(SUBMIT, nonce=f"{i:08x}"), context=i)
    [datagram] = conn.datagrams_to_send()
    header, body = sidecar.open(datagram)
    assert isinstance(body, ShareBatch) and len(body.shares) == 3
    verdicts = [
        (1, header.pn, 0, 1),
        (1, header.pn, 1, {"result": False, "error": None, "reject-reason": "Stale"}),
        (1, header.pn, 2, {"result": None, "error": [23, "low difficulty share", None]}),
    ]
    sidecar.send(control.encode_rm(control.Results(v=verdicts)))
    replies = {r.context: r for r in channel.events}
    assert replies[0].accepted
    assert replies[1].response.reject_reason == "Stale" and read_verdict(replies[1].response).code == 21
    assert read_verdict(replies[2].response).code == 23


def test_no_verdict_means_udp_retransmission_then_tls_and_repeated_failures_fall_back() -> None:
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.1)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    for attempt in range(3):
        now = attempt * 10.0
        channel.submit(msgspec.structs.replace(SUBMIT, nonce=f"{attempt:08x}"), context=attempt)
        [first] = conn.datagrams_to_send(now)
        conn.handle_timer(now + 5)  # past any RTO
        [again] = conn.datagrams_to_send()
        assert sidecar.open(again)[0].pn > sidecar.open(first)[0].pn
        conn.handle_timer(now + 9)
        tls = [m for m in sidecar.read() if m.get("method") == "mining.submit"]
        assert len(tls) == 1 and tls[0]["params"][4] == f"{attempt:08x}"
        sidecar.send(control.encode_channel_response(channel.ch, tls[0]["id"], msgspec.Raw(b"true"), msgspec.Raw(b"null")))
        [reply] = channel.events
        channel.events = []
        assert reply.accepted and reply.context == attempt
    stats = conn.statistics()
    assert stats.retransmissions_udp == 3 and stats.retransmissions_tls == 3
    assert not conn.udp_up and stats.udp_fallbacks == 1
    # While UDP is down shares go over TLS at once.
    channel.submit(msgspec.structs.replace(SUBMIT, nonce="ffffffff"), context="down")
    assert conn.datagrams_to_send() == []
    assert [m["method"] for m in sidecar.read() if "method" in m] == ["mining.submit"]


def test_a_late_udp_verdict_after_the_tls_one_is_ignored() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    channel.submit(SUBMIT, context="x")
    [first] = conn.datagrams_to_send()
    conn.handle_timer(5)
    conn.datagrams_to_send()
    conn.handle_timer(10)
    [tls] = [m for m in sidecar.read() if m.get("method") == "mining.submit"]
    sidecar.send(control.encode_channel_response(channel.ch, tls["id"], msgspec.Raw(b"true"), msgspec.Raw(b"null")))
    sidecar.send(control.encode_rm(control.Results(v=[(1, sidecar.open(first)[0].pn, 0, 1)])))
    assert len(channel.events) == 1


def test_block_candidates_go_over_udp_urgent_and_tls_at_once() -> None:
    conn = StratumRMConnection(detect_blocks=True)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar, nbits="2100ffff")  # a target so easy that every hash is a block
    channel.submit(SUBMIT, context="block")
    [datagram] = conn.datagrams_to_send()
    header, _ = sidecar.open(datagram)
    assert header.urgent
    assert [m["method"] for m in sidecar.read() if "method" in m] == ["mining.submit"]
    assert conn.statistics().block_candidates == 1


def test_unknown_job_or_worker_goes_over_tls() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    channel.submit(msgspec.structs.replace(SUBMIT, job_id="unknown"), context=1)
    channel.submit(msgspec.structs.replace(SUBMIT, worker="bob.rig"), context=2)
    channel.submit(msgspec.structs.replace(SUBMIT, nonce="0A029ED1"), context=3)
    assert conn.datagrams_to_send() == []
    assert len([m for m in sidecar.read() if m.get("method") == "mining.submit"]) == 3


def test_sidecar_closing_a_channel_and_going_silent() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start(dead_after=5.0)
    channel = channel_ready(conn, sidecar)
    sidecar.send(control.encode_rm(control.Close(ch=channel.ch, reason="pool connection refused")))
    assert isinstance(channel.events[-1], ChannelClosed) and "pool connection refused" in channel.events[-1].reason
    other = conn.open_channel()
    conn.handle_timer(1.5)
    assert any(m.get("method") == "rm.ping" for m in sidecar.read())
    conn.handle_timer(6.0)
    assert conn.close_reason and "silent" in conn.close_reason
    conn.connection_lost(conn.close_reason, 6.0)
    assert isinstance(other.events[-1], ChannelClosed)


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b'{"id":null,"method":"rm.bogus","params":{}}\n',
        b'{"id":null,"method":"rm.notify","params":{"job":99,"ch":[1]}}\n',
    ],
)
def test_malformed_control_lines_close_the_connection_with_a_reason(line) -> None:
    conn = StratumRMConnection()
    FakeSidecar(conn).start()
    conn.receive_data(line, 0.0)
    assert conn.close_reason
    [goodbye] = [json.loads(sent) for sent in conn.data_to_send().splitlines()]
    assert goodbye == {"id": None, "method": "rm.error", "params": {"reason": conn.close_reason}}


def test_a_deliberate_close_tells_the_sidecar_why_instead_of_sending_what_was_queued() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start(udp=False)
    channel = channel_ready(conn, sidecar)
    channel.submit(SUBMIT, context="queued")  # over TLS, not yet taken by the driver
    conn.close("rigs moved to another sidecar", 1.0)
    lines = [json.loads(sent) for sent in conn.data_to_send().splitlines()]
    assert lines == [{"id": None, "method": "rm.error", "params": {"reason": "rigs moved to another sidecar"}}]


def test_a_sidecars_own_error_is_not_answered_and_nothing_queued_goes_to_it() -> None:
    conn = StratumRMConnection()
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel = channel_ready(conn, sidecar)
    channel.request("mining.extranonce.subscribe", [], context="queued")  # not yet taken by the driver
    conn.receive_data(b'{"id":null,"method":"rm.error","params":{"reason":"shutting down"}}\n', 0.0)
    assert conn.close_reason == "sidecar error: shutting down" and conn.data_to_send() == b""


def test_refused_hello_closes_with_the_sidecars_words() -> None:
    conn = StratumRMConnection()
    conn.start(0.0)
    conn.data_to_send()
    conn.receive_data(b'{"id":1,"result":null,"error":[1,"unsupported StratumRM version 1"]}\n', 0.0)
    assert "unsupported StratumRM version" in conn.close_reason


def test_udp_comes_back_after_a_fallback_when_a_probe_is_answered() -> None:
    conn = StratumRMConnection(detect_blocks=False, probe_interval=10.0)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    channel_ready(conn, sidecar)
    conn.delivery.udp_down(0.0)
    assert not conn.udp_up and conn.datagrams_to_send() == []
    conn.handle_timer(10.0)  # the re-probe is due
    [probe] = conn.datagrams_to_send()
    _header, body = sidecar.open(probe)
    assert isinstance(body, Probe)
    conn.receive_datagram(sidecar.keys.sealer.seal(ProbeAck(body.probe_id)).data, ("127.0.0.1", 3334), 10.5)
    assert conn.udp_up


def test_forged_probe_acks_do_not_bring_udp_up() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start()
    conn.delivery.udp_down(0.0)
    forged = bytearray(sidecar.keys.sealer.seal(ProbeAck(1)).data)
    forged[-1] ^= 1
    conn.receive_datagram(bytes(forged), ("127.0.0.1", 3334), 1.0)
    stranger = KeySet.derive(KeyMaterial(0x1122334455667788, 1, bytes(32)), Role.SIDECAR)
    conn.receive_datagram(stranger.sealer.seal(ProbeAck(1)).data, ("127.0.0.1", 3334), 1.0)
    assert not conn.udp_up


def test_a_sidecar_whose_bytes_wait_unread_is_busy_not_silent() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start(dead_after=5.0)
    channel_ready(conn, sidecar)
    due = conn.silent_deadline()
    conn.input_waiting(due)  # the driver saw bytes in the kernel: the proxy is behind
    conn.handle_timer(due)
    assert conn.close_reason is None and conn.silent_deadline() == due + 5.0
    conn.handle_timer(due + 5.0)
    assert conn.close_reason and "silent" in conn.close_reason


def test_time_this_process_was_too_busy_to_read_is_not_the_sidecars_silence() -> None:
    # dead_after 5 s; the sidecar's last word was at 0. The proxy's loop is starved (a mass
    # connect): its timer, due at 4 s, runs at 7 s. The sidecar's bytes could not have been
    # read in those 3 s, so they do not count: the sidecar is silent only at 5 + 3 = 8 s.
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start(udp=False, dead_after=5.0)
    conn.handle_timer(7.0, due=4.0)
    assert conn.close_reason is None
    assert conn.silent_deadline() == pytest.approx(8.0)
    conn.handle_timer(8.0, due=8.0)
    assert conn.close_reason == "sidecar silent for 5 s"
    # The same late timer judged on the sidecar's clock alone (no due: nothing known) is silence.
    plain = StratumRMConnection(detect_blocks=False)
    FakeSidecar(plain).start(udp=False, dead_after=5.0)
    plain.handle_timer(7.0)
    assert plain.close_reason == "sidecar silent for 5 s"


@pytest.mark.parametrize("late", [0.5, 3.0])
def test_a_loop_that_is_always_late_still_finds_a_dead_sidecar_within_twice_dead_after(late: float) -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start(udp=False, dead_after=5.0)
    now = 0.0
    while conn.close_reason is None:
        due = conn.get_timer()
        assert due is not None
        now = due + late  # every timer late, for ever (and the sidecar dead)
        conn.handle_timer(now, due=due)
        conn.data_to_send()  # the heartbeat rm.ping goes out
        assert now <= 2 * 5.0 + late
    assert conn.close_reason == "sidecar silent for 5 s"
    # Late by a third of the time: a third is excused (7.5 s); late by more than it waits: capped (10 s).
    assert now >= {0.5: 7.5, 3.0: 10.0}[late]


def test_lateness_counts_only_since_the_sidecars_last_word() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start(udp=False, dead_after=5.0)
    conn.handle_timer(3.0, due=1.0)  # 2 s late before the sidecar spoke again
    assert conn.silent_deadline() == pytest.approx(7.0)
    sidecar.send(control.encode_rm(control.Ping(t=3.5)), now=3.5)
    assert conn.silent_deadline() == pytest.approx(8.5)  # a fresh 5 s: the old lateness is spent
    conn.handle_timer(5.0, due=3.0)  # due before the word at 3.5: only the 1.5 s after it counts
    assert conn.silent_deadline() == pytest.approx(10.0)
    conn.handle_timer(10.0, due=10.0)
    assert conn.close_reason == "sidecar silent for 5 s"


def test_a_silent_sidecar_whose_tcp_still_acknowledges_is_busy_until_the_busy_limit() -> None:
    conn = StratumRMConnection(detect_blocks=False)
    FakeSidecar(conn).start(udp=False, dead_after=5.0)
    now = conn.silent_deadline()
    while conn.close_reason is None:
        conn.peer_acknowledged(0.3, now)  # every time: its kernel acknowledges the rm.pings
        conn.handle_timer(now, due=now)
        conn.data_to_send()
        now = conn.get_timer()
    assert conn.close_reason == "sidecar silent for 5 s"
    assert conn.silent_deadline() == pytest.approx(30.0)  # a hung sidecar is still found


def test_an_ack_delay_beyond_the_announced_max_ack_delay_is_not_subtracted_from_the_sample() -> None:
    # RFC 9002 5.3: a sidecar whose ack timer ran late (it reports 80 ms held against an
    # announced 25 ms) does not make the path look faster than it is.
    conn = StratumRMConnection(detect_blocks=False)
    sidecar = FakeSidecar(conn)
    sidecar.start(max_ack_delay=0.025)
    channel = channel_ready(conn, sidecar)
    # A first sample of 10 ms sets the smallest RTT seen.
    [first] = _shares_in_own_datagrams(conn, sidecar, channel, ("0a029ed1",), lambda _: 1.0)
    conn.receive_datagram(sidecar.keys.sealer.seal(Ack(ranges=(AckRange(first, first),))).data, ("127.0.0.1", 3334), 1.01)
    [second] = _shares_in_own_datagrams(conn, sidecar, channel, ("0a029ed2",), lambda _: 2.0)
    held = Ack(ranges=(AckRange(second, second),), ack_delay_us=80_000)
    conn.receive_datagram(sidecar.keys.sealer.seal(held).data, ("127.0.0.1", 3334), 2.1)
    # 100 ms measured, 25 ms of it the sidecar's at most: a 75 ms sample, not 20 ms.
    assert conn.delivery.rtt.statistics().latest_rtt == pytest.approx(0.1)
    assert conn.delivery.rtt.srtt == pytest.approx(7 / 8 * 0.01 + 1 / 8 * 0.075)


def test_a_verdict_for_a_later_datagram_is_evidence_of_loss_only_after_the_ack_delay() -> None:
    # Datagrams 1 and 2 wait for a slow pool; a verdict from datagram 3 comes at once. The
    # sidecar acknowledges 1 and 2 within its ack delay (50 ms here), so until then that
    # verdict says nothing about them: their deadline is a probe timeout, and only the
    # oldest goes again (one late ACK costs one copy, not a copy of every share waiting).
    conn = StratumRMConnection(detect_blocks=False, initial_rto=0.02)
    sidecar = FakeSidecar(conn)
    sidecar.start(max_ack_delay=0.05)
    channel = channel_ready(conn, sidecar)
    _shares_in_own_datagrams(conn, sidecar, channel, ("0a029ed1", "0a029ed2"), lambda index: 0.001 * (index + 1))
    for nonce in ("0a029ed3", "0a029ed4"):  # datagram 3: a batch of two, one answered
        channel.submit(SubmitParams("alice.rig1", NOTIFY[0], "0100000000000000", "6b05d915", nonce), context=nonce)
    [batch] = conn.datagrams_to_send(0.003)
    third = sidecar.open(batch)[0].pn
    conn.receive_datagram(sidecar.keys.sealer.seal(Verdicts((VerdictEntry(third, 0),))).data, ("127.0.0.1", 3334), 0.05)
    due = conn.get_timer()
    assert due == pytest.approx(0.001 + 0.02 + 0.05)  # datagram 1's deadline, 21 ms after the verdict
    conn.handle_timer(0.073)  # both deadlines passed
    copies = conn.datagrams_to_send(0.073)
    assert sorted(record.nonce for datagram in copies for record in _records(sidecar.open(datagram)[1])) == [0x0A029ED1]
    assert conn.statistics().probe_waits == 1
    # Once the ack delay has passed since that verdict, it is evidence: datagram 2 is lost.
    again = conn.get_timer()  # datagram 2's re-armed deadline, well past 0.05 + 0.05
    assert again is not None and again > 0.1
    conn.handle_timer(again)
    copies = conn.datagrams_to_send(again)
    assert sorted(record.nonce for datagram in copies for record in _records(sidecar.open(datagram)[1])) == [0x0A029ED2]
