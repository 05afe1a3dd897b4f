"""The reference miner: each profile's exact wire behaviour, real hashing, and real pools.

The sans-IO :class:`MinerProtocol` is checked line by line against what real
miners sent to a real ckpool (tests/data/captures): ids, order, params, spacing. Where the captures contain a share, the
miner is fed the same job, hashes the nonce range around the captured nonce
for real, and must find that nonce and submit a byte-identical line. The trio
driver then mines against the reference pool on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import json
import ssl
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.errors import ConfigError
from bridge.mining.share import Job, difficulty_to_target, roll_version, scan_nonces
from bridge.testing.miner import (
    AuthorizationFailed,
    Authorized,
    Ignored,
    Miner,
    MinerConfig,
    MinerProtocol,
    NewJob,
    Profile,
    ReconnectRefused,
    ReconnectRequested,
    ShareAnswered,
    ShareSubmitted,
    SubscribeFailed,
    parse_miner_url,
    render_line,
    spread_bits,
)
from bridge.testing.miner_command import testminer as miner_cli
from bridge.testing.pool import PoolConfig, ReferencePool

CAPTURES = Path(__file__).parent.parent / "data" / "captures"
LOCALHOST = "127.0.0.1"

PREVHASH_A = "36b6b33055f3556c2919c92af2fc9ddeeee9c69503e3f3e7f193bdcf00000000"
PREVHASH_B = "f91f638e507b4b3bf265c0946e47462b5bfcae854b71b1db8cda35df4666b876"
COINB1 = "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff21016d0004"
COINB2 = "0a636b706f6f6cffffffff0100f2052a01000000016a00000000"


# --------------------------------------------------------------------------- helpers


def capture(name: str) -> list[tuple[str, str]]:
    """The (direction, line) traffic records of a capture, in order."""
    records = [json.loads(line) for line in (CAPTURES / name).read_text().splitlines() if line.strip()]
    return [(r["dir"], r["line"]) for r in records if "line" in r]


def miner(profile: Profile, user: str = "u.w1", **options: Any) -> MinerProtocol:
    return MinerProtocol(MinerConfig(user=user, profile=profile, **options))


def sent(protocol: MinerProtocol) -> list[str]:
    return protocol.data_to_send().decode().splitlines()


def pool(protocol: MinerProtocol, *lines: str, now: float = 0.0) -> list[Any]:
    return protocol.receive_data("".join(line + "\n" for line in lines).encode(), now)


def subscribe_result(request_id: Any, extranonce1: str = "5ad7056b", size: int = 8, session: str = "6b05d75a") -> str:
    return json.dumps({"result": [[["mining.notify", session]], extranonce1, size], "id": request_id, "error": None})


def result(request_id: Any, value: Any = True) -> str:
    return json.dumps({"result": value, "error": None, "id": request_id})


def notify(job_id: str, *, prevhash: str = PREVHASH_A, clean: bool = True, ntime: str = "6b05d915") -> str:
    params = [job_id, prevhash, COINB1, COINB2, [], "20000000", "207fffff", ntime, clean]
    return json.dumps({"params": params, "id": None, "method": "mining.notify"})


def set_difficulty(value: float) -> str:
    return json.dumps({"params": [value], "id": None, "method": "mining.set_difficulty"})


def request(method: str, params: list[Any], request_id: Any = None) -> str:
    return json.dumps({"id": request_id, "method": method, "params": params})


def handshake(protocol: MinerProtocol, *, host: str = "pool.example.com", port: int = 3333) -> None:
    """Connect, subscribe and authorize ``protocol`` whatever its profile; drain its lines."""
    protocol.connection_made(host, port, 0.0)
    profile = protocol.config.profile
    subscribe_id = {Profile.CPUMINER: 1, Profile.BITAXE: 2, Profile.BMMINER: 1}.get(profile, 0)
    authorize_id = {Profile.CPUMINER: 2, Profile.BITAXE: 3, Profile.BFGMINER: "auth"}.get(profile, 1)
    if profile is Profile.BMMINER:
        authorize_id = 2
    if profile is Profile.BITAXE:
        pool(protocol, result(1, {"version-rolling": True, "version-rolling.mask": "1fffe000"}))
    if profile is Profile.BMMINER:
        pool(protocol, result(0, {"version-rolling": True, "version-rolling.mask": "1fffe000"}))
    pool(protocol, subscribe_result(subscribe_id))
    events = pool(protocol, result(authorize_id))
    assert any(isinstance(e, Authorized) for e in events), events
    sent(protocol)


def fake_share(protocol: MinerProtocol, nonce: int = 1, now: float = 0.0) -> list[Any]:
    """Pretend the current chunk found ``nonce`` (the protocol trusts its hasher)."""
    chunk = protocol.next_chunk(now)
    assert chunk is not None
    return protocol.chunk_done(chunk, [(nonce, 0)], now)


def mine_known_nonce(protocol: MinerProtocol, nonce: int, now: float = 0.0) -> list[str]:
    """Hash the 64 nonces around ``nonce`` for real over the current work; return the submit lines."""
    chunk = protocol.next_chunk(now)
    assert chunk is not None
    chunk = msgspec.structs.replace(chunk, start=nonce - 32, count=64)
    hits = scan_nonces(chunk.header76, chunk.start, chunk.count, chunk.target)
    assert [found for found, _ in hits] == [nonce]
    events = protocol.chunk_done(chunk, hits, now)
    assert [type(e) for e in events] == [ShareSubmitted]
    return sent(protocol)


def replay_until(protocol: MinerProtocol, records: list[tuple[str, str]], stop: str | None = None) -> list[str]:
    """Feed the pool's lines up to and including the line containing ``stop``; return what the miner sent."""
    out: list[str] = []
    for direction, line in records:
        if direction == "pool>miner":
            pool(protocol, line)
            out.extend(sent(protocol))
            if stop is not None and stop in line:
                break
    return out


def miner_lines(records: list[tuple[str, str]], *, submits: bool = False) -> list[str]:
    return [line for d, line in records if d == "miner>pool" and submits == ('"mining.submit"' in line)]


# --------------------------------------------------------------------------- rendering and helpers


def test_render_line_spacing_matches_the_c_miners() -> None:
    fields = [("id", 1), ("method", "mining.configure"), ("params", [["a"], {"k": 2}])]
    assert render_line(fields, compact=False) == b'{"id": 1, "method": "mining.configure", "params": [["a"], {"k": 2}]}\n'
    assert render_line(fields, compact=True) == b'{"id":1,"method":"mining.configure","params":[["a"],{"k":2}]}\n'
    tight = render_line([("method", "m"), ("id", 4)], compact=False, tight_keys=frozenset({"id"}))
    assert tight == b'{"method": "m", "id":4}\n'


def test_spread_bits_walks_every_value_inside_the_mask() -> None:
    mask = 0x1FFFE000
    values = [spread_bits(i, mask) for i in range(1 << 16)]
    assert len(set(values)) == 1 << 16
    assert all(v & ~mask == 0 for v in values)
    assert values[:3] == [0, 0x2000, 0x4000]


def test_parse_miner_url() -> None:
    url = parse_miner_url("stratum+tcp://pool.example.com:3333#xnsub")
    assert (url.host, url.port, url.tls, url.xnsub, url.redirect) == ("pool.example.com", 3333, False, True, False)
    assert parse_miner_url("stratum+ssl://h.example:443#redirect").tls
    assert parse_miner_url("stratum+tcp://h.example:1#xnsub#redirect").redirect
    for bad in ("stratumrm://h:1", "pool.example.com:3333", "stratum+tcp://nohost"):
        with pytest.raises(ConfigError):
            parse_miner_url(bad)


def test_unknown_profile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        Miner("stratum+tcp://127.0.0.1:1", "u.w", profile="antminer")


# --------------------------------------------------------------------------- captures, byte for byte


def test_cgminer_replays_its_capture() -> None:
    records = capture("cgminer-ckpool-nodevices.jsonl")
    protocol = miner(Profile.CGMINER, "cgminer1.rig1")
    protocol.connection_made("127.0.0.1", 3399, 0.0)
    out = sent(protocol) + replay_until(protocol, records)
    # subscribe, authorize after the result, nothing in reply to show_message or notifies
    assert out == miner_lines(records)
    assert protocol.authorized and protocol.jobs > 10


def test_cpuminer_replays_its_capture_and_finds_the_captured_shares() -> None:
    records = capture("minerd-ckpool-basic.jsonl")
    protocol = miner(Profile.CPUMINER, "minerd1.rig1")
    protocol.connection_made("127.0.0.1", 3399, 0.0)
    out = sent(protocol) + replay_until(protocol, records, '"6b05d75700000009"')
    assert out == miner_lines(records)
    first, second = miner_lines(records, submits=True)
    assert mine_known_nonce(protocol, 0xB8ACC61A) == [first]
    replay_until(protocol, records[records.index(("miner>pool", first)) :], '"6b05d7570000000e"')
    assert mine_known_nonce(protocol, 0xDA384712) == [second]


def test_cpuminer_extranonce2_restarts_on_every_job() -> None:
    records = capture("minerd-ckpool-dupshare.jsonl")
    protocol = miner(Profile.CPUMINER, "minerd2.rig1")
    protocol.connection_made("127.0.0.1", 3399, 0.0)
    replay_until(protocol, records, '"6b05d757000000ab"')  # the twelfth job, clean_jobs false
    original = miner_lines(records, submits=True)[0]
    assert mine_known_nonce(protocol, 0x3047920D) == [original]


def test_bfgminer_replays_its_capture_and_finds_the_captured_share() -> None:
    records = capture("bfgminer-ckpool-basic.jsonl")
    protocol = miner(Profile.BFGMINER, "bfgminer1.rig1", user_agent="bfgminer/5.5.0-34-g866fd36f", suggest_target=False)
    protocol.connection_made("127.0.0.1", 3399, 0.0)
    out = sent(protocol) + replay_until(protocol, records, '"6b05d7570000002d"')
    # subscribe id 0, authorize id "auth", get_transactions id "txlist<job>" once
    assert out == miner_lines(records)
    # extranonce2 0100000000000000: the second work since the clean job
    assert mine_known_nonce(protocol, 0xC3384901) == miner_lines(records, submits=True)


def test_cpuminer_answers_get_version_ignores_empty_reconnect_and_resumes() -> None:
    first = capture("minerd-ckpool-reconnect-1.jsonl")
    protocol = miner(Profile.CPUMINER, "minerd1.rig1")
    protocol.connection_made("127.0.0.1", 3399, 0.0)
    out = sent(protocol)
    events: list[Any] = []
    for direction, line in first:
        if direction == "pool>miner":
            events.extend(pool(protocol, line))
            out.extend(sent(protocol))
    assert out == miner_lines(first)  # includes {"id": "gv1", "error": null, "result": "cpuminer/2.5.1"}
    assert [type(e) for e in events if isinstance(e, (ReconnectRefused, ReconnectRequested))] == [
        ReconnectRefused,
        ReconnectRequested,
    ]
    assert events[-1] == ReconnectRequested("127.0.0.1", 3399)
    protocol.connection_lost(1.0)
    second = capture("minerd-ckpool-reconnect-2.jsonl")
    protocol.connection_made("127.0.0.1", 3399, 1.0)
    assert sent(protocol) + replay_until(protocol, second) == miner_lines(second)  # ["cpuminer/2.5.1", "6b05d75b"]


# --------------------------------------------------------------------------- handshakes


def test_cgminer_handshake_suggestion_and_resume() -> None:
    protocol = miner(Profile.CGMINER, "user.worker", suggest_difficulty=512)
    protocol.connection_made("pool.example.com", 3333, 0.0)
    assert sent(protocol) == ['{"id": 0, "method": "mining.subscribe", "params": ["cgminer/4.11.1"]}']
    pool(protocol, subscribe_result(0, session="e1a3b2c4"))
    assert sent(protocol) == ['{"id": 1, "method": "mining.authorize", "params": ["user.worker", "x"]}']
    pool(protocol, result(1))
    assert sent(protocol) == ['{"id": 2, "method": "mining.suggest_difficulty", "params": [512]}']
    protocol.connection_lost(5.0)
    protocol.connection_made("pool.example.com", 3333, 5.0)
    assert sent(protocol) == ['{"id": 3, "method": "mining.subscribe", "params": ["cgminer/4.11.1", "e1a3b2c4"]}']
    refused = json.dumps({"id": 3, "result": None, "error": [20, "Not resumable", None]})
    assert pool(protocol, refused) == []
    assert sent(protocol) == ['{"id": 4, "method": "mining.subscribe", "params": []}']
    events = pool(protocol, json.dumps({"id": 4, "result": None, "error": [20, "No", None]}))
    assert [type(e) for e in events] == [SubscribeFailed]


def test_cgminer_refuses_a_subscribe_result_it_cannot_use() -> None:
    protocol = miner(Profile.CGMINER)
    protocol.connection_made("pool.example.com", 3333, 0.0)
    sent(protocol)
    pool(protocol, subscribe_result(0, size=1))  # cgminer wants 2..16
    assert sent(protocol) == ['{"id": 1, "method": "mining.subscribe", "params": []}']


def test_cgminer_hashes_but_never_submits_with_extranonce2_above_8() -> None:
    protocol = miner(Profile.CGMINER)
    protocol.connection_made("pool.example.com", 3333, 0.0)
    pool(protocol, subscribe_result(0, size=12), result(1), notify("j1"))
    sent(protocol)
    assert fake_share(protocol) == []
    assert sent(protocol) == []
    assert protocol.statistics().not_submitted == 1


def test_cgminer_authorize_failure() -> None:
    protocol = miner(Profile.CGMINER)
    protocol.connection_made("pool.example.com", 3333, 0.0)
    pool(protocol, subscribe_result(0))
    events = pool(protocol, json.dumps({"result": False, "error": "Invalid character in username", "id": 1}))
    assert events == [AuthorizationFailed('"Invalid character in username"')]
    assert not protocol.authorized


def test_cpuminer_handshake_and_submit_shape() -> None:
    protocol = miner(Profile.CPUMINER, "user", password="pass")
    protocol.connection_made("pool.example.com", 3333, 0.0)
    assert sent(protocol) == ['{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}']
    pool(protocol, subscribe_result(1))
    assert sent(protocol) == ['{"id": 2, "method": "mining.authorize", "params": ["user", "pass"]}']
    pool(protocol, result(2), notify("4128eb", ntime="647025b5"))
    fake_share(protocol, 0x0A029ED1)
    assert sent(protocol) == [
        '{"method": "mining.submit", "params": ["user", "4128eb", "0000000000000000", "647025b5", "0a029ed1"], "id":4}'
    ]


def test_bfgminer_handshake_with_target_and_xnsub() -> None:
    protocol = miner(Profile.BFGMINER, "user", password="pass", extranonce_subscribe=True, suggest_difficulty=1)
    protocol.connection_made("pool.example.com", 3333, 0.0)
    assert sent(protocol) == [
        (
            '{"id": null, "method": "mining.suggest_target", "params": '
            '["00000000ffff0000000000000000000000000000000000000000000000000000"]}'
        ),
        '{"id": 0, "method": "mining.subscribe", "params": ["bfgminer/5.5.0"]}',
    ]
    pool(protocol, subscribe_result(0))
    assert sent(protocol) == [
        '{"id": "xnsub", "method": "mining.extranonce.subscribe", "params": []}',
        '{"id": "auth", "method": "mining.authorize", "params": ["user", "pass"]}',
    ]
    pool(protocol, result("xnsub"), result("auth"), notify("j7"))
    assert sent(protocol) == ['{"params": ["j7"], "id": "txlistj7", "method": "mining.get_transactions"}']
    pool(protocol, notify("j8", clean=False))
    assert sent(protocol) == []  # the transparency probe goes once
    fake_share(protocol, 0xC3384901)
    assert sent(protocol) == [
        '{"params": ["user", "j8", "0100000000000000", "6b05d915", "c3384901"], "id": 1, "method": "mining.submit"}'
    ]


def test_bfgminer_drops_suggest_target_after_a_pool_refused_it() -> None:
    protocol = miner(Profile.BFGMINER, suggest_difficulty=0.5)
    protocol.connection_made("pool.example.com", 3333, 0.0)
    assert '"mining.suggest_target"' in sent(protocol)[0]
    closed = protocol.connection_lost(0.1)  # ckpool drops a client that speaks before subscribing
    assert closed.retry_now
    protocol.connection_made("pool.example.com", 3333, 0.1)
    assert sent(protocol) == ['{"id": 1, "method": "mining.subscribe", "params": ["bfgminer/5.5.0"]}']
    assert not protocol.connection_lost(0.2).retry_now
    protocol.connection_made("pool.example.com", 3333, 5.0)  # a later connection tries the target again
    assert '"mining.suggest_target"' in sent(protocol)[0]


def test_bmminer_handshake_and_rolled_submit() -> None:
    protocol = miner(Profile.BMMINER, "user", extranonce_subscribe=True)
    protocol.connection_made("pool.example.com", 3333, 0.0)
    assert sent(protocol) == [
        (
            '{"id": 0, "method": "mining.configure", "params": [["version-rolling"], '
            '{"version-rolling.mask": "1fffe000", "version-rolling.min-bit-count": 2}]}'
        ),
        '{"id": 1, "method": "mining.subscribe", "params": ["bmminer/2.0.0"]}',
    ]
    pool(protocol, result(0, {"version-rolling": True, "version-rolling.mask": "1fffe000"}), subscribe_result(1))
    assert sent(protocol) == ['{"id": 2, "method": "mining.authorize", "params": ["user", "x"]}']
    pool(protocol, result(2))
    assert sent(protocol) == [
        '{"id": 3, "method": "mining.multi_version", "params": [1]}',
        '{"id": 4, "method": "mining.extranonce.subscribe", "params": []}',
    ]
    pool(protocol, notify("j1"))
    fake_share(protocol, 5)  # chunk 0: version bits 0
    fake_share(protocol, 6)  # chunk 1: the next value inside the mask
    assert sent(protocol) == [
        '{"params": ["user", "j1", "0000000000000000", "6b05d915", "00000005", "00000000"], "id": 5, "method": "mining.submit"}',
        '{"params": ["user", "j1", "0000000000000000", "6b05d915", "00000006", "00002000"], "id": 6, "method": "mining.submit"}',
    ]


def test_bmminer_without_a_granted_mask_sends_five_params() -> None:
    protocol = miner(Profile.BMMINER, "user")
    protocol.connection_made("pool.example.com", 3333, 0.0)
    pool(protocol, result(0, {"version-rolling": False}), subscribe_result(1), result(2), notify("j1"))
    sent(protocol)
    fake_share(protocol, 5)
    assert sent(protocol) == [
        '{"params": ["user", "j1", "0000000000000000", "6b05d915", "00000005"], "id": 4, "method": "mining.submit"}'
    ]


def test_bitaxe_pipelines_its_handshake_in_compact_json() -> None:
    protocol = miner(Profile.BITAXE, "user.worker")
    protocol.connection_made("pool.example.com", 3333, 0.0)
    assert sent(protocol) == [
        '{"id":1,"method":"mining.configure","params":[["version-rolling"],{"version-rolling.mask":"ffffffff"}]}',
        '{"id":2,"method":"mining.subscribe","params":["bitaxe/BM1368/v2.9.0"]}',
        '{"id":3,"method":"mining.authorize","params":["user.worker","x"]}',
        '{"id":4,"method":"mining.suggest_difficulty","params":[1e-06]}',
    ]
    # answers in any order; nothing more is sent in reply
    pool(protocol, subscribe_result(2), result(3), result(1, {"version-rolling": False}), notify("j1"))
    assert sent(protocol) == []
    fake_share(protocol, 7)
    assert sent(protocol) == [
        '{"id":5,"method":"mining.submit","params":["user.worker","j1","0000000000000000","6b05d915","00000007","00000000"]}'
    ]
    protocol.connection_lost(1.0)
    protocol.connection_made("pool.example.com", 3333, 1.0)
    assert sent(protocol)[1] == '{"id":2,"method":"mining.subscribe","params":["bitaxe/BM1368/v2.9.0"]}'  # no resume


def test_bitaxe_rolls_within_the_mask_the_pool_granted() -> None:
    protocol = miner(Profile.BITAXE, "user.worker", suggest_difficulty=1000.5)
    protocol.connection_made("pool.example.com", 3333, 0.0)
    assert sent(protocol)[3] == '{"id":4,"method":"mining.suggest_difficulty","params":[1000]}'
    pool(protocol, result(1, {"version-rolling": True, "version-rolling.mask": "00ffe000"}))
    pool(protocol, subscribe_result(2), result(3), notify("j1"))
    bits = {protocol.next_chunk(0.0).version_bits for _ in range(600)}  # type: ignore[union-attr]
    assert len(bits) == 600 and all(b & ~0x00FFE000 == 0 for b in bits)  # type: ignore[operator]
    pool(protocol, request("mining.set_version_mask", ["00006000"]))
    assert {protocol.next_chunk(0.0).version_bits for _ in range(8)} == {0, 0x2000, 0x4000, 0x6000}  # type: ignore[union-attr]


# --------------------------------------------------------------------------- pool requests per profile


@pytest.mark.parametrize(
    ("profile", "ping", "version"),
    [
        (Profile.CGMINER, '{"id": 42, "result": "pong", "error": null}', '{"id": 0, "result": "cgminer/4.11.1", "error": null}'),
        (Profile.BMMINER, '{"id": 42, "result": "pong", "error": null}', '{"id": 0, "result": "bmminer/2.0.0", "error": null}'),
        (Profile.CPUMINER, None, '{"id": "gv1", "error": null, "result": "cpuminer/2.5.1"}'),
        (Profile.BFGMINER, None, '{"id": "gv1", "result": "bfgminer/5.5.0", "error": null}'),
        (Profile.BITAXE, '{"id":42,"method":"pong","params":[]}', None),
    ],
)
def test_ping_and_get_version_answers(profile: Profile, ping: str | None, version: str | None) -> None:
    protocol = miner(profile)
    handshake(protocol)
    events = pool(protocol, request("mining.ping", [], 42))
    assert sent(protocol) == ([ping] if ping else [])
    assert (events == []) == (ping is not None)
    pool(protocol, request("client.get_version", [], "gv1"))  # ESP-Miner refuses string ids
    assert sent(protocol) == ([version] if version else [])
    pool(protocol, request("client.get_version", [], None), request("mining.ping", [], None))
    assert sent(protocol) == []


def test_bitaxe_answers_get_version_with_an_integer_id() -> None:
    protocol = miner(Profile.BITAXE)
    handshake(protocol)
    pool(protocol, request("client.get_version", [], 9))
    assert sent(protocol) == ['{"id":9,"result":"v2.9.0","error":null}']


def test_show_message_replies() -> None:
    for profile, reply in [
        (Profile.CPUMINER, '{"id": 7, "error": null, "result": true}'),
        (Profile.BFGMINER, '{"id": 7, "result": true, "error": null}'),
        (Profile.CGMINER, None),
    ]:
        protocol = miner(profile)
        handshake(protocol)
        events = pool(protocol, request("client.show_message", ["hello"], 7), request("client.show_message", ["x"]))
        assert [e.text for e in events] == ["hello", "x"]
        assert sent(protocol) == ([reply] if reply else [])


def test_unknown_methods_are_not_answered() -> None:
    protocol = miner(Profile.CGMINER)
    handshake(protocol)
    assert pool(protocol, request("mining.foo", [], 3)) == [Ignored("mining.foo", "unknown method, not answered")]
    assert sent(protocol) == []


# --------------------------------------------------------------------------- response matching


def test_cpuminer_matches_its_repeated_id_4_first_in_first_out() -> None:
    protocol = miner(Profile.CPUMINER)
    handshake(protocol)
    pool(protocol, notify("j1"))
    chunk = protocol.next_chunk(0.0)
    assert chunk is not None
    protocol.chunk_done(chunk, [(1, 0), (2, 0), (3, 0)], 0.0)
    assert [json.loads(line)["id"] for line in sent(protocol)] == [4, 4, 4]
    events = pool(
        protocol,
        '{"result":true,"error":null,"id":4}',
        '{"reject-reason":"Above target","result":false,"error":null,"id":4}',
        '{"result":true,"error":null,"id":4}',
        now=1.0,
    )
    answered = [e.share for e in events if isinstance(e, ShareAnswered)]
    assert [s.nonce for s in answered] == ["00000001", "00000002", "00000003"]
    assert [(s.verdict.accepted, s.verdict.code, s.verdict.message) for s in answered] == [  # type: ignore[union-attr]
        (True, 0, ""),
        (False, 23, "Above target"),
        (True, 0, ""),
    ]
    assert pool(protocol, '{"result":true,"error":null,"id":4}') == []
    stats = protocol.statistics()
    assert (stats.accepted, stats.rejected, stats.pending, stats.unmatched_replies) == (2, 1, 0, 1)


def test_reject_dialects_are_read() -> None:
    protocol = miner(Profile.CGMINER)
    handshake(protocol)
    pool(protocol, notify("j1"))
    chunk = protocol.next_chunk(0.0)
    assert chunk is not None
    protocol.chunk_done(chunk, [(1, 0), (2, 0), (3, 0)], 0.0)
    ids = [json.loads(line)["id"] for line in sent(protocol)]
    events = pool(
        protocol,
        json.dumps({"id": ids[0], "result": None, "error": [21, "Job not found", None]}),
        json.dumps({"id": ids[1], "error": {"code": 23, "message": "low difficulty share (0.1)", "data": None}}),
        json.dumps({"id": ids[2], "result": False, "error": "Worker mismatch"}),
    )
    verdicts = [e.share.verdict for e in events]
    assert [(v.code, v.message) for v in verdicts] == [
        (21, "Job not found"),
        (23, "low difficulty share (0.1)"),
        (20, "Worker mismatch"),
    ]


# --------------------------------------------------------------------------- difficulty, jobs, extranonce


def test_set_difficulty_is_queued_one_per_notify() -> None:
    protocol = miner(Profile.CGMINER)
    handshake(protocol)
    events = pool(protocol, notify("j0"))
    assert events[0].difficulty == 1.0  # a new subscription starts at 1
    events = pool(protocol, set_difficulty(0.5), set_difficulty(0.25), notify("j1", clean=False))
    assert events == [NewJob("j1", False, 0.5)]
    assert protocol.next_chunk(0.0).target == difficulty_to_target(0.5)  # type: ignore[union-attr]
    assert pool(protocol, notify("j2", clean=False)) == [NewJob("j2", False, 0.25)]
    assert pool(protocol, notify("j3", clean=False)) == [NewJob("j3", False, 0.25)]
    # a third pending value replaces the second
    events = pool(
        protocol, set_difficulty(2), set_difficulty(3), set_difficulty(4), notify("j4", clean=False), notify("j5", clean=False)
    )
    assert [e.difficulty for e in events] == [2, 4]
    # shares keep the difficulty of their own job
    assert protocol.next_chunk(0.0).difficulty == 4  # type: ignore[union-attr]


def test_clean_jobs_abandon_work_and_stale_shares_follow_the_profile() -> None:
    for profile, submits_stale in [(Profile.CGMINER, True), (Profile.CPUMINER, False)]:
        protocol = miner(profile)
        handshake(protocol)
        pool(protocol, notify("j1"))
        chunk1 = protocol.next_chunk(0.0)
        assert pool(protocol, notify("j2", clean=False)) == [NewJob("j2", False, 1.0)]
        chunk2 = protocol.next_chunk(0.0)
        assert chunk1 is not None and chunk2 is not None and chunk2.job_id == "j2"
        [event] = protocol.chunk_done(chunk1, [(5, 0)], 0.0)  # j1 is still valid
        assert isinstance(event, ShareSubmitted) and not event.share.stale
        assert pool(protocol, notify("j3", clean=True)) == [NewJob("j3", True, 1.0)]
        events = protocol.chunk_done(chunk2, [(6, 0)], 0.0)
        chunk3 = protocol.next_chunk(0.0)
        assert chunk3 is not None and chunk3.job_id == "j3" and chunk3.extranonce2 == bytes(8)
        stats = protocol.statistics()
        if submits_stale:
            [event] = events
            assert isinstance(event, ShareSubmitted) and event.share.stale and stats.stale_submitted == 1
        else:
            assert events == [] and stats.stale_discarded == 1
        assert len(sent(protocol)) == (2 if submits_stale else 1)


def test_a_new_prevhash_is_a_clean_job_whatever_the_flag() -> None:
    protocol = miner(Profile.CGMINER)
    handshake(protocol)
    pool(protocol, notify("j1"), notify("j2", clean=False))
    assert pool(protocol, notify("j3", prevhash=PREVHASH_B, clean=False)) == [NewJob("j3", True, 1.0)]
    assert protocol.statistics().clean_jobs == 2


def test_extranonce2_counts_on_and_restarts_on_clean_jobs() -> None:
    protocol = miner(Profile.CGMINER)
    handshake(protocol)
    pool(protocol, notify("j1"), notify("j2", clean=False), notify("j3", clean=False))
    assert protocol.next_chunk(0.0).extranonce2 == bytes([2]) + bytes(7)  # type: ignore[union-attr]
    pool(protocol, notify("j4"))
    assert protocol.next_chunk(0.0).extranonce2 == bytes(8)  # type: ignore[union-attr]


def test_set_extranonce_is_ignored_by_cgminer() -> None:
    protocol = miner(Profile.CGMINER)
    handshake(protocol)
    events = pool(protocol, request("mining.set_extranonce", ["deadbeef", 4]), notify("j1"))
    assert isinstance(events[0], Ignored)
    assert protocol.next_chunk(0.0).extranonce1 == bytes.fromhex("5ad7056b")  # type: ignore[union-attr]


def test_set_extranonce_applies_at_the_next_notify_for_bfgminer() -> None:
    protocol = miner(Profile.BFGMINER)
    handshake(protocol)
    pool(protocol, notify("j1"))
    old_chunk = protocol.next_chunk(0.0)
    assert pool(protocol, request("mining.set_extranonce", ["deadbeef", 4])) == []
    chunk = protocol.next_chunk(0.0)
    assert chunk is not None and chunk.extranonce1 == bytes.fromhex("5ad7056b") and len(chunk.extranonce2) == 8
    pool(protocol, notify("j2", clean=False))
    chunk = protocol.next_chunk(0.0)
    assert chunk is not None and chunk.extranonce1 == bytes.fromhex("deadbeef") and len(chunk.extranonce2) == 4
    assert old_chunk is not None and protocol.chunk_done(old_chunk, [(1, 0)], 0.0) == []  # old extranonce1
    assert protocol.statistics().not_submitted == 1


def test_set_extranonce_applies_at_once_for_bmminer() -> None:
    protocol = miner(Profile.BMMINER)
    handshake(protocol)
    pool(protocol, notify("j1"))
    events = pool(protocol, request("mining.set_extranonce", ["deadbeef"]))
    assert events == [NewJob("j1", False, 1.0)]
    chunk = protocol.next_chunk(0.0)
    assert chunk is not None and chunk.extranonce1 == bytes.fromhex("deadbeef") and len(chunk.extranonce2) == 8


def test_ntime_roll_follows_the_clock_up_to_60_seconds() -> None:
    protocol = miner(Profile.CGMINER, ntime_roll=True)
    handshake(protocol)
    pool(protocol, notify("j1", ntime="6b05d915"), now=100.0)
    assert [protocol.next_chunk(t).ntime for t in (100.0, 112.5, 500.0)] == [  # type: ignore[union-attr]
        0x6B05D915,
        0x6B05D915 + 12,
        0x6B05D915 + 60,
    ]


# --------------------------------------------------------------------------- client.reconnect


@pytest.mark.parametrize(
    ("profile", "current", "params", "expected"),
    [
        (Profile.CGMINER, "pool.example.com", [], ("pool.example.com", 3333)),
        (Profile.CGMINER, "pool.example.com", ["eu.example.com", 3334], ("eu.example.com", 3334)),
        (Profile.CGMINER, "pool.example.com", ["eu.example.com", "3335", 0], ("eu.example.com", 3335)),
        (Profile.CGMINER, "pool.example.com", ["evil.example.org", 3333], None),
        (Profile.CGMINER, "127.0.0.1", ["127.0.0.1", "3399", 0], ("127.0.0.1", 3399)),
        (Profile.CGMINER, "localhost", ["localhost", 3334], None),
        (Profile.BMMINER, "pool.example.com", [None, 3334], ("pool.example.com", 3334)),
        (Profile.CPUMINER, "pool.example.com", [], None),
        (Profile.CPUMINER, "pool.example.com", ["anywhere.org", "3399", 0], ("anywhere.org", 3399)),
        (Profile.CPUMINER, "pool.example.com", ["anywhere.org"], None),
        (Profile.BFGMINER, "a.example.com", [], ("a.example.com", 3333)),
        (Profile.BFGMINER, "a.example.com", ["b.example.com", 1], ("b.example.com", 1)),
        (Profile.BFGMINER, "a.example.com", ["b.other.org", 1], None),
        (Profile.BITAXE, "pool.example.com", ["elsewhere.org", 1], (None, None)),
    ],
)
def test_client_reconnect_per_profile(
    profile: Profile, current: str, params: list[Any], expected: tuple[Any, Any] | None
) -> None:
    protocol = miner(profile)
    handshake(protocol, host=current)
    [event] = pool(protocol, request("client.reconnect", params))
    if expected is None:
        assert isinstance(event, ReconnectRefused)
    else:
        assert event == ReconnectRequested(*expected)
    assert protocol.statistics().reconnect_requests == 1


def test_bfgminer_follows_any_redirect_with_the_redirect_fragment() -> None:
    protocol = miner(Profile.BFGMINER, allow_redirect=True)
    handshake(protocol, host="a.example.com")
    assert pool(protocol, request("client.reconnect", ["b.other.org", 1])) == [ReconnectRequested("b.other.org", 1)]


# --------------------------------------------------------------------------- losing answers, limits


def test_a_lost_connection_loses_the_outstanding_shares() -> None:
    protocol = miner(Profile.CGMINER)
    handshake(protocol)
    pool(protocol, notify("j1"))
    fake_share(protocol, 1)
    fake_share(protocol, 2)
    ids = [json.loads(line)["id"] for line in sent(protocol)]
    pool(protocol, result(ids[0]))
    closed = protocol.connection_lost(3.0)
    assert closed.lost_shares == 1
    [lost] = [s for s in protocol.submitted if s.verdict is None]
    assert lost.lost and lost.nonce == "00000002"
    assert protocol.next_chunk(3.0) is None  # no work without a connection


def test_answers_that_never_come_time_out() -> None:
    protocol = miner(Profile.CGMINER, share_timeout=120.0)
    handshake(protocol)
    pool(protocol, notify("j1"))
    fake_share(protocol, 1, now=10.0)
    assert protocol.expire(100.0) == 0
    assert protocol.expire(131.0) == 1
    assert protocol.statistics().lost == 1 and protocol.statistics().pending == 0


def test_max_shares_stops_submitting_and_finishes_when_answered() -> None:
    protocol = miner(Profile.CGMINER, max_shares=2)
    handshake(protocol)
    pool(protocol, notify("j1"))
    chunk = protocol.next_chunk(0.0)
    assert chunk is not None
    protocol.chunk_done(chunk, [(1, 0), (2, 0), (3, 0)], 0.0)
    assert protocol.quota_reached and not protocol.finished
    assert protocol.next_chunk(0.0) is None
    ids = [json.loads(line)["id"] for line in sent(protocol)]
    assert len(ids) == 2
    pool(protocol, result(ids[0]), result(ids[1]))
    assert protocol.finished


def test_records_are_bounded() -> None:
    protocol = miner(Profile.CGMINER, max_records=3)
    handshake(protocol)
    pool(protocol, notify("j1"))
    chunk = protocol.next_chunk(0.0)
    assert chunk is not None
    protocol.chunk_done(chunk, [(n, 0) for n in range(10)], 0.0)
    assert [s.nonce for s in protocol.submitted] == ["00000007", "00000008", "00000009"]
    assert protocol.statistics().submitted == 10


# --------------------------------------------------------------------------- real hashing


@pytest.mark.parametrize("profile", [Profile.CGMINER, Profile.BMMINER])
def test_the_nonce_search_finds_shares_that_verify(profile: Profile) -> None:
    difficulty = 2e-6  # about one share per 2 150 hashes
    protocol = MinerProtocol(MinerConfig(user="u.w", profile=profile, chunk_size=1024))
    handshake(protocol)
    line = notify("j1")
    pool(protocol, set_difficulty(difficulty), line)
    fields = json.loads(line)["params"]
    job = Job.from_notify_fields(*fields[:8])
    versions = set()
    while len(protocol.submitted) < 4:
        chunk = protocol.next_chunk(0.0)
        assert chunk is not None
        versions.add(chunk.version)
        hits = scan_nonces(chunk.header76, chunk.start, chunk.count, chunk.target)
        protocol.chunk_done(chunk, hits, 0.0)
    mask = protocol.version_mask
    for share in protocol.submitted:
        bits = int(share.version_bits, 16) if share.version_bits is not None else None
        version = job.version_int if bits is None else roll_version(job.version_int, bits, mask)
        header_hash = job.share_hash(
            bytes.fromhex(share.extranonce1),
            bytes.fromhex(share.extranonce2),
            int(share.ntime, 16),
            int(share.nonce, 16),
            version,
        )
        assert header_hash <= difficulty_to_target(difficulty)
        assert share.difficulty == difficulty and share.share_difficulty >= difficulty
    if profile is Profile.BMMINER:
        assert len(versions) > 1 and all(v & ~mask == job.version_int for v in versions)
        assert len({s.version_bits for s in protocol.submitted}) > 1
    else:
        assert versions == {job.version_int}
    stats = protocol.statistics()
    assert stats.hashes % 1024 == 0 and stats.shares_found >= 4


# --------------------------------------------------------------------------- against the reference pool


async def start_pool(nursery: trio.Nursery, **config: Any) -> tuple[ReferencePool, str]:
    # ~8,600 hashes per share: the shares a test waits for come within milliseconds
    settings: dict[str, Any] = {"difficulty": 0.000002, "seed": 7}
    settings.update(config)
    reference = ReferencePool(PoolConfig(**settings))
    port = await nursery.start(reference.serve, LOCALHOST, 0)
    return reference, f"stratum+tcp://{LOCALHOST}:{port}"


def accepted_keys(reference: ReferencePool, worker: str) -> set[tuple[Any, ...]]:
    return {
        (r.job_id, r.extranonce1, r.extranonce2, r.ntime, r.nonce, r.version_bits)
        for r in reference.accepted
        if r.worker == worker
    }


async def test_every_profile_mines_against_the_reference_pool() -> None:
    async with trio.open_nursery() as nursery:
        reference, url = await start_pool(nursery)
        miners = [Miner(url, f"rig.{profile.value}", profile=profile, max_shares=3, reconnect_delay=0.1) for profile in Profile]
        with trio.fail_after(20):
            async with trio.open_nursery() as mining:
                for each in miners:
                    await mining.start(each.run)  # started once authorized
        for each in miners:
            stats = each.statistics()
            assert len(each.accepted) == 3 and not each.rejected and not each.unanswered(), stats
            assert {s.key for s in each.accepted} == accepted_keys(reference, each.config.user)
            assert stats.hashrate > 100_000 and stats.connections == 1
        rolled = [s.version_bits for m in miners if m.config.profile is Profile.BMMINER for s in m.accepted]
        assert all(bits is not None for bits in rolled)
        nursery.cancel_scope.cancel()


async def test_client_reconnect_resumes_the_session() -> None:
    async with trio.open_nursery() as nursery:
        reference, url = await start_pool(nursery)
        cgminer = Miner(url, "rig.cg", profile="cgminer", reconnect_delay=0.1)
        cpuminer = Miner(url, "rig.cpu", profile="cpuminer", reconnect_delay=0.1)
        await nursery.start(cgminer.run)
        await nursery.start(cpuminer.run)
        first = cgminer.statistics().extranonce1
        assert first is not None
        reference.request_reconnect([])
        with trio.fail_after(5):
            while cgminer.statistics().connections < 2 or not cgminer.protocol.authorized:
                await trio.sleep(0.01)
        # cgminer asks for its session again (bytes.fromhex(extranonce1) byte-swapped: the
        # pool's session id). Whether the pool resumes it depends on whether it has seen the
        # old connection close first: ckpool alike, it does not hand out a session in use.
        asked = [c.state.requested_session for c in reference.connections if c.state.requested_session]
        assert asked == [bytes.fromhex(first)[::-1].hex()], asked
        assert cpuminer.statistics().connections == 1  # cpuminer ignores []
        count = len(reference.accepted)
        await reference.wait_for_accepted(count + 2)
        cgminer.stop()
        cpuminer.stop()
        nursery.cancel_scope.cancel()


async def test_a_dropped_pool_is_reconnected_after_the_delay() -> None:
    async with trio.open_nursery() as nursery:
        reference, url = await start_pool(nursery)
        events: list[Any] = []
        bfgminer = Miner(url, "rig.bfg", profile="bfgminer", reconnect_delay=0.2, on_event=lambda m, e: events.append(e))
        await nursery.start(bfgminer.run)
        await reference.wait_for_accepted(1)
        reference.drop_connections(rst=True)
        with trio.fail_after(5):
            while bfgminer.statistics().connections < 2 or not bfgminer.protocol.authorized:
                await trio.sleep(0.01)
            before = bfgminer.statistics().accepted
            while bfgminer.statistics().accepted < before + 1:
                await trio.sleep(0.01)
        stats = bfgminer.statistics()
        assert stats.disconnects == 1 and stats.connections == 2
        assert any(isinstance(e, ShareAnswered) for e in events)
        bfgminer.stop()
        nursery.cancel_scope.cancel()


async def test_hashrate_cap_and_stop() -> None:
    async with trio.open_nursery() as nursery:
        _reference, url = await start_pool(nursery, difficulty=1.0, maximum_difficulty=1.0)
        capped = Miner(url, "rig.slow", profile="cgminer", hashrate=20_000, hash_in_thread=True)
        await nursery.start(capped.run)
        started = trio.current_time()
        await trio.sleep(0.5)
        capped.stop()
        elapsed = trio.current_time() - started
        hashes = capped.statistics().hashes
        assert 0 < hashes <= 20_000 * elapsed + 2_000
        nursery.cancel_scope.cancel()


def self_signed_contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for 127.0.0.1 and a client context that trusts exactly it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reference pool")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOCALHOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "pool.pem", directory / "pool.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


async def test_stratum_ssl(tmp_path: Path) -> None:
    server_context, client_context = self_signed_contexts(tmp_path)
    async with trio.open_nursery() as nursery:
        reference = ReferencePool(PoolConfig(difficulty=0.000002))
        port = await nursery.start(functools.partial(reference.serve, LOCALHOST, 0, ssl_context=server_context))
        tls_miner = Miner(
            f"stratum+ssl://{LOCALHOST}:{port}", "rig.tls", profile="bitaxe", max_shares=2, ssl_context=client_context
        )
        with trio.fail_after(10):
            await tls_miner.run()
        assert len(tls_miner.accepted) == 2
        assert {s.key for s in tls_miner.accepted} == accepted_keys(reference, "rig.tls")
        # without the pool's certificate in the trust store the handshake fails
        untrusting = Miner(f"stratum+ssl://{LOCALHOST}:{port}", "rig.tls2", reconnect_delay=0.05)
        with trio.move_on_after(0.5):
            await untrusting.run()
        assert untrusting.statistics().connect_failures >= 1 and untrusting.statistics().connections == 0
        nursery.cancel_scope.cancel()


async def test_unreachable_pool_counts_connect_failures() -> None:
    listener = trio.socket.socket()
    await listener.bind((LOCALHOST, 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    lonely = Miner(f"stratum+tcp://{LOCALHOST}:{port}", "u.w", reconnect_delay=0.05)
    with trio.move_on_after(0.3):
        await lonely.run()
    assert lonely.statistics().connect_failures >= 2


# --------------------------------------------------------------------------- the command


def test_testminer_command_prints_verdicts_and_a_summary() -> None:
    ready: list[int] = []
    stop = threading.Event()

    async def serve_pool() -> None:
        async with trio.open_nursery() as nursery:
            reference = ReferencePool(PoolConfig(difficulty=0.000002))
            ready.append(await nursery.start(reference.serve, LOCALHOST, 0))
            while not stop.is_set():
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(serve_pool,))
    thread.start()
    try:
        while not ready:
            thread.join(0.01)
        outcome = CliRunner().invoke(
            miner_cli,
            [
                "--url",
                f"stratum+tcp://{LOCALHOST}:{ready[0]}",
                "--user",
                "addr.rig",
                "--profile",
                "bmminer",
                "--count",
                "2",
                "--max-shares",
                "2",
                "--duration",
                "20",
            ],
        )
    finally:
        stop.set()
        thread.join()
    assert outcome.exit_code == 0, outcome.output
    lines = outcome.output.splitlines()
    assert sum(" Accepted " in line for line in lines) == 4
    assert any(line.startswith("bmminer#2") for line in lines)
    total = lines[-1].split()
    assert total[:4] == ["total", "4", "4", "0"]
