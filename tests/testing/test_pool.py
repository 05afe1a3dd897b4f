"""The reference pool over real sockets: handshake, share validation, failure modes, CLI.

Shares are crafted from the notify the pool sent, with bridge.mining's header
math and nonce scanner, at difficulty 1e-6 (a few thousand hashes per share).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import ssl
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.errors import ConfigError
from bridge.mining.share import (
    Job,
    difficulty_to_target,
    hash_difficulty,
    roll_version,
    scan_nonces,
)
from bridge.testing.commands import parse_listen
from bridge.testing.pool import PoolConfig, ReferencePool

ROOT = Path(__file__).resolve().parents[2]
DIFFICULTY = 1e-6
READ_TIMEOUT = 5.0


# --------------------------------------------------------------------------- helpers


class FakeClock:
    """Wall-clock stand-in: tests move time by hand."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def start_pool(
    nursery: trio.Nursery,
    *,
    clock: FakeClock | None = None,
    ssl_context: ssl.SSLContext | None = None,
    **fields: Any,
) -> ReferencePool:
    fields.setdefault("difficulty", DIFFICULTY)
    fields.setdefault("seed", 7)
    pool = ReferencePool(PoolConfig(**fields), clock=clock or FakeClock())
    await nursery.start(lambda task_status: pool.serve("127.0.0.1", 0, ssl_context=ssl_context, task_status=task_status))
    return pool


@dataclass
class Subscribed:
    extranonce1: bytes
    extranonce2_size: int
    session_id: str
    difficulty: float
    notify: list[Any]


class Miner:
    """A bare-hands Stratum V1 client: JSON lines in and out, nothing hidden."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = b""
        self.backlog: deque[dict[str, Any]] = deque()
        self.last_line = b""

    @classmethod
    async def connect(cls, target: ReferencePool | int, ssl_context: ssl.SSLContext | None = None) -> Miner:
        """Connect to a running pool (or a port on 127.0.0.1)."""
        port = target if isinstance(target, int) else target.port
        assert port is not None, "the pool is not serving"
        if ssl_context is None:
            return cls(await trio.open_tcp_stream("127.0.0.1", port))
        return cls(await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ssl_context))

    async def send(self, request_id: Any, method: str, params: Any) -> None:
        line = json.dumps({"id": request_id, "method": method, "params": params})
        await self.stream.send_all(line.encode() + b"\n")

    async def call(self, request_id: Any, method: str, params: Any) -> dict[str, Any]:
        await self.send(request_id, method, params)
        return await self.response(request_id)

    async def read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the pool closed the connection")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        self.last_line = line
        return line

    async def read(self) -> dict[str, Any]:
        """The next message, in arrival order (the backlog first)."""
        if self.backlog:
            return self.backlog.popleft()
        with trio.fail_after(READ_TIMEOUT):
            return await self._read_message()

    async def _read_message(self) -> dict[str, Any]:
        message = json.loads(await self.read_line())
        assert isinstance(message, dict), message
        return message

    async def _find(self, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        for message in self.backlog:
            if matches(message):
                self.backlog.remove(message)
                return message
        with trio.fail_after(READ_TIMEOUT):
            while True:
                message = await self._read_message()
                if matches(message):
                    return message
                self.backlog.append(message)

    async def response(self, request_id: Any) -> dict[str, Any]:
        return await self._find(lambda m: "method" not in m and m.get("id") == request_id)

    async def notification(self, method: str) -> dict[str, Any]:
        return await self._find(lambda m: m.get("method") == method)

    async def drain(self, seconds: float) -> None:
        """Forget the backlog and whatever arrives within ``seconds`` (data already in flight)."""
        self.backlog.clear()
        with trio.move_on_after(seconds):
            while True:
                await self.read_line()

    async def expect_silence(self, seconds: float) -> None:
        assert not self.backlog, self.backlog
        with trio.move_on_after(seconds):
            line = await self.read_line()
            pytest.fail(f"expected silence, got {line!r}")

    async def handshake(self, worker: str = "w1", user_agent: str = "testminer/1.0") -> Subscribed:
        result = (await self.call(1, "mining.subscribe", [user_agent]))["result"]
        set_difficulty = await self.read()
        assert set_difficulty["method"] == "mining.set_difficulty"
        notify = await self.read()
        assert notify["method"] == "mining.notify"
        assert (await self.call(2, "mining.authorize", [worker, "x"]))["result"] is True
        return Subscribed(
            extranonce1=bytes.fromhex(result[1]),
            extranonce2_size=result[2],
            session_id=result[0][1][1],
            difficulty=set_difficulty["params"][0],
            notify=notify["params"],
        )

    async def aclose(self) -> None:
        await self.stream.aclose()


def job_of(notify: list[Any]) -> Job:
    return Job.from_notify_fields(*notify[:8])


def find_nonces(
    notify: list[Any],
    extranonce1: bytes,
    extranonce2: bytes,
    difficulty: float,
    *,
    count: int = 1,
    ntime: int | None = None,
    version: int | None = None,
) -> list[int]:
    """Nonces whose share meets ``difficulty``."""
    job = job_of(notify)
    header76 = job.header76(extranonce1, extranonce2, job.ntime_int if ntime is None else ntime, version)
    target = difficulty_to_target(difficulty)
    found: list[int] = []
    start = 0
    while len(found) < count:
        found += [nonce for nonce, _ in scan_nonces(header76, start, 1 << 16, target)]
        start += 1 << 16
    return found[:count]


def failing_nonce(notify: list[Any], extranonce1: bytes, extranonce2: bytes, difficulty: float) -> int:
    """A nonce whose share does not meet ``difficulty``."""
    job = job_of(notify)
    target = difficulty_to_target(difficulty)
    nonce = 0
    while job.share_hash(extranonce1, extranonce2, job.ntime_int, nonce) <= target:
        nonce += 1
    return nonce


def submit_params(
    worker: str,
    notify: list[Any],
    extranonce2: bytes,
    nonce: int,
    *,
    ntime: int | None = None,
    version_bits: str | None = None,
) -> list[str]:
    ntime_hex = notify[7] if ntime is None else f"{ntime:08x}"
    params = [worker, notify[0], extranonce2.hex(), ntime_hex, f"{nonce:08x}"]
    if version_bits is not None:
        params.append(version_bits)
    return params


async def valid_share(miner: Miner, sub: Subscribed, request_id: int, *, worker: str = "w1") -> dict[str, Any]:
    en2 = bytes(sub.extranonce2_size)
    (nonce,) = find_nonces(sub.notify, sub.extranonce1, en2, sub.difficulty)
    return await miner.call(request_id, "mining.submit", submit_params(worker, sub.notify, en2, nonce))


async def wait_until_closed(pool: ReferencePool) -> None:
    with trio.fail_after(READ_TIMEOUT):
        while pool.statistics().connections:
            await trio.sleep(0.01)


def reject(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"id": request_id, "result": False, "error": [code, message, None]}


# --------------------------------------------------------------------------- handshake and jobs


async def test_handshake_is_ckpool_like_and_jobs_are_real(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.send(1, "mining.subscribe", ["testminer/1.0"])
    first = await miner.read()
    assert first["id"] == 1 and first["error"] is None
    subscriptions, en1_hex, en2_size = first["result"]
    sid = bytes.fromhex(en1_hex)[::-1].hex()
    assert subscriptions == [["mining.set_difficulty", sid], ["mining.notify", sid]]
    assert len(en1_hex) == 8 and en2_size == 8

    set_difficulty = await miner.read()
    assert set_difficulty == {"id": None, "method": "mining.set_difficulty", "params": [1e-06]}
    notify = await miner.read()
    assert notify["id"] is None and notify["method"] == "mining.notify"
    job_id, prevhash, coinb1, coinb2, branches, version, nbits, ntime, clean = notify["params"]
    assert isinstance(job_id, str) and clean is True
    assert len(prevhash) == 64 and prevhash.endswith("00000000" * 2)  # zero display prefix
    assert (version, nbits, ntime) == ("20000000", "17034219", f"{int(pool.clock()):08x}")
    assert 0 <= len(branches) <= 12 and all(len(b) == 64 for b in branches)

    # a real coinbase: null outpoint, BIP34 height push, extranonce space counted in the scriptSig
    cb1, cb2 = bytes.fromhex(coinb1), bytes.fromhex(coinb2)
    assert cb1[:5] == bytes.fromhex("0100000001") and cb1[5:37] == bytes(32) and cb1[37:41] == b"\xff" * 4
    script_length = cb1[41]
    assert cb1[42] == 3 and int.from_bytes(cb1[43:46], "little") == pool.height
    assert script_length == len(cb1) - 42 + 4 + en2_size
    assert cb2[:4] == b"\xff" * 4 and cb2[4] == 1 and cb2[-4:] == bytes(4)

    assert await miner.call(2, "mining.authorize", ["w1", "x"]) == {
        "id": 2,
        "result": True,
        "error": None,
    }
    stats = pool.statistics()
    assert (stats.connections, stats.subscribed, stats.jobs_sent) == (1, 1, 1)


async def test_integer_difficulty_is_written_without_a_fraction(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, difficulty=1.0)
    miner = await Miner.connect(pool)
    await miner.call(1, "mining.subscribe", [])
    await miner.notification("mining.set_difficulty")
    assert b'"params":[1]' in miner.last_line


async def test_notify_interval_sends_fresh_jobs_without_clean(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, notify_interval=0.1)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    ids = {sub.notify[0]}
    for _ in range(2):
        notify = (await miner.notification("mining.notify"))["params"]
        assert notify[8] is False and notify[1] == sub.notify[1]
        ids.add(notify[0])
    assert len(ids) == 3


async def test_new_block_sends_clean_notify_to_every_miner(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miners = [await Miner.connect(pool) for _ in range(2)]
    subs = [await m.handshake(f"w{i}") for i, m in enumerate(miners)]
    height = pool.height
    pool.new_block()
    assert pool.height == height + 1
    for miner, sub in zip(miners, subs, strict=True):
        notify = (await miner.notification("mining.notify"))["params"]
        assert notify[8] is True and notify[1] != sub.notify[1]
        assert int.from_bytes(bytes.fromhex(notify[2])[43:46], "little") == height + 1


async def test_block_interval_moves_the_chain(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, block_interval=0.1)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    notify = (await miner.notification("mining.notify"))["params"]
    assert notify[8] is True and notify[1] != sub.notify[1]


# --------------------------------------------------------------------------- shares


@pytest.mark.parametrize("extranonce2_size", [4, 8])
async def test_valid_share_is_accepted_and_recorded(nursery: trio.Nursery, extranonce2_size: int) -> None:
    pool = await start_pool(nursery, extranonce2_size=extranonce2_size)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    assert sub.extranonce2_size == extranonce2_size
    en2 = bytes.fromhex("01" + "00" * (extranonce2_size - 1))
    (nonce,) = find_nonces(sub.notify, sub.extranonce1, en2, DIFFICULTY)
    answer = await miner.call(4, "mining.submit", submit_params("w1", sub.notify, en2, nonce))
    assert answer == {"id": 4, "result": True, "error": None}

    with trio.fail_after(1):
        await pool.wait_for_accepted(1)
    (record,) = pool.accepted
    job = job_of(sub.notify)
    hash_int = job.share_hash(sub.extranonce1, en2, job.ntime_int, nonce)
    assert record.worker == "w1" and record.job_id == sub.notify[0]
    assert (record.extranonce1, record.extranonce2) == (sub.extranonce1.hex(), en2.hex())
    assert (record.ntime, record.nonce, record.version_bits) == (
        sub.notify[7],
        f"{nonce:08x}",
        None,
    )
    assert int(record.hash_hex, 16) == hash_int
    assert record.difficulty == DIFFICULTY and record.share_difficulty == hash_difficulty(hash_int)
    assert record.block is False
    assert pool.accepted_by_worker == {"w1": [record]}
    stats = pool.statistics()
    assert (stats.accepted, stats.rejected, stats.blocks) == (1, {}, 0)
    assert stats.accepted_by_worker == {"w1": 1}


async def test_every_reject_path_answers_its_code(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    notify, en1 = sub.notify, sub.extranonce1
    en2 = bytes(8)
    (nonce,) = find_nonces(notify, en1, en2, DIFFICULTY)
    ntime = job_of(notify).ntime_int

    def params(**changes: Any) -> list[str]:
        return submit_params("w1", notify, en2, nonce, **changes)

    unknown = ["w1", "deadbeef", en2.hex(), notify[7], f"{nonce:08x}"]
    assert await miner.call(10, "mining.submit", unknown) == reject(10, 21, "Job not found")
    short_en2 = ["w1", notify[0], "00000000", notify[7], f"{nonce:08x}"]
    assert await miner.call(11, "mining.submit", short_en2) == reject(11, 20, "Incorrect size of extranonce2")
    assert await miner.call(12, "mining.submit", params(ntime=ntime - 1)) == reject(12, 20, "Ntime out of range")
    assert await miner.call(13, "mining.submit", params(ntime=ntime + 7001)) == reject(13, 20, "Ntime out of range")
    assert await miner.call(14, "mining.submit", params(version_bits="ffffffff")) == reject(14, 20, "Invalid version mask")
    low = submit_params("w1", notify, en2, failing_nonce(notify, en1, en2, DIFFICULTY))
    assert await miner.call(15, "mining.submit", low) == reject(15, 23, "Low difficulty share")
    other_worker = ["w2", *params()[1:]]
    assert await miner.call(16, "mining.submit", other_worker) == reject(16, 24, "Unauthorized worker")
    assert (await miner.call(17, "mining.submit", params()))["result"] is True
    assert await miner.call("dup1", "mining.submit", params()) == reject("dup1", 22, "Duplicate share")
    # the same share in upper-case hex is the same share
    upper = [p.upper() if i >= 2 else p for i, p in enumerate(params())]
    assert await miner.call(18, "mining.submit", upper) == reject(18, 22, "Duplicate share")
    # version bits 0 is the unrolled version: still the same header
    assert await miner.call(19, "mining.submit", params(version_bits="00000000")) == reject(19, 22, "Duplicate share")

    pool.new_block()
    await miner.notification("mining.notify")
    en2b = bytes.fromhex("0100000000000000")
    (late,) = find_nonces(notify, en1, en2b, DIFFICULTY)
    stale = submit_params("w1", notify, en2b, late)
    assert await miner.call(20, "mining.submit", stale) == reject(20, 21, "Stale")

    stats = pool.statistics()
    assert stats.accepted == 1 and stats.duplicates == 3
    assert stats.rejected == {20: 4, 21: 2, 22: 3, 23: 1, 24: 1}
    assert [r.code for r in pool.rejected] == [21, 20, 20, 20, 20, 23, 24, 22, 22, 22, 21]


async def test_ntime_window_edges(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    en2 = bytes(8)
    late = job_of(sub.notify).ntime_int + 7000
    (nonce,) = find_nonces(sub.notify, sub.extranonce1, en2, DIFFICULTY, ntime=late)
    answer = await miner.call(4, "mining.submit", submit_params("w1", sub.notify, en2, nonce, ntime=late))
    assert answer["result"] is True


async def test_submit_before_subscribe_and_before_authorize(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, ckpool_methods=False)  # a pool that answers everything
    miner = await Miner.connect(pool)
    params = ["w1", "1", "0000000000000000", "00000000", "00000000"]
    assert await miner.call(1, "mining.submit", params) == reject(1, 25, "Not subscribed")
    await miner.call(2, "mining.subscribe", [])
    assert await miner.call(3, "mining.submit", params) == reject(3, 24, "Unauthorized worker")
    answer = await miner.call(4, "mining.authorize", ["_bad", "x"])
    assert answer == reject(4, 24, "Invalid worker name")


async def test_fractional_difficulty_decides_acceptance(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, difficulty=0.00002)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    assert sub.difficulty == 0.00002
    en2 = bytes(8)
    # a share good enough for 1e-6 but not for 2e-5 is low difficulty here
    job = job_of(sub.notify)
    weak = next(
        n
        for n in find_nonces(sub.notify, sub.extranonce1, en2, DIFFICULTY, count=40)
        if job.share_hash(sub.extranonce1, en2, job.ntime_int, n) > difficulty_to_target(0.00002)
    )
    answer = await miner.call(4, "mining.submit", submit_params("w1", sub.notify, en2, weak))
    assert answer == reject(4, 23, "Low difficulty share")
    assert (await valid_share(miner, sub, 5))["result"] is True


async def test_old_jobs_keep_the_difficulty_they_were_sent_with(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, maximum_difficulty=1.0)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    job_a = sub.notify
    assert await miner.call(3, "mining.suggest_difficulty", [0.001]) == {
        "id": 3,
        "result": True,
        "error": None,
    }
    assert (await miner.read())["params"] == [0.001]  # set_difficulty first ...
    job_b = (await miner.read())["params"]  # ... then the job it applies to
    assert job_b[8] is False and job_b[0] != job_a[0]

    en2 = bytes(8)
    (nonce_a,) = find_nonces(job_a, sub.extranonce1, en2, DIFFICULTY)
    answer = await miner.call(4, "mining.submit", submit_params("w1", job_a, en2, nonce_a))
    assert answer["result"] is True
    assert pool.accepted[-1].difficulty == DIFFICULTY and pool.accepted[-1].share_difficulty < 0.001

    (nonce_b,) = find_nonces(job_b, sub.extranonce1, en2, DIFFICULTY)
    answer = await miner.call(5, "mining.submit", submit_params("w1", job_b, en2, nonce_b))
    assert answer == reject(5, 23, "Low difficulty share")


async def test_pool_wide_difficulty_change_announces_before_a_job(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.handshake()
    pool.set_difficulty(0.5)
    assert await miner.read() == {"id": None, "method": "mining.set_difficulty", "params": [0.5]}
    assert (await miner.read())["method"] == "mining.notify"
    late = await Miner.connect(pool)
    assert (await late.handshake("w2")).difficulty == 0.5


async def test_suggested_difficulty_is_clamped_to_the_bounds(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, difficulty=0.0001, minimum_difficulty=DIFFICULTY, maximum_difficulty=0.5)
    miner = await Miner.connect(pool)
    await miner.handshake()
    await miner.send(None, "mining.suggest_difficulty", [1e-9])  # bfgminer style: id null
    assert (await miner.read())["params"] == [DIFFICULTY]
    assert (await miner.read())["method"] == "mining.notify"
    target = "0" * 8 + "ffff" + "0" * 52  # difficulty 1 as a target
    assert (await miner.call(5, "mining.suggest_target", [target]))["result"] is True
    assert (await miner.read())["params"] == [0.5]


async def test_a_fixed_difficulty_pool_stays_fixed(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.send(None, "mining.suggest_target", ["00000000ffff" + "0" * 52])  # bfgminer
    sub = await miner.handshake()
    assert sub.difficulty == DIFFICULTY
    assert (await miner.call(3, "mining.suggest_difficulty", [1000]))["result"] is True  # bitaxe
    await miner.expect_silence(0.1)


async def test_version_rolling_within_the_negotiated_mask(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    answer = await miner.call(
        0,
        "mining.configure",
        [
            ["version-rolling"],
            {"version-rolling.mask": "ffffffff", "version-rolling.min-bit-count": 2},
        ],
    )
    assert answer == {
        "id": 0,
        "result": {"version-rolling": True, "version-rolling.mask": "1fffe000"},
        "error": None,
    }
    sub = await miner.handshake()
    en2 = bytes(8)
    job = job_of(sub.notify)
    rolled = roll_version(job.version_int, 0x00002000, 0x1FFFE000)
    (nonce,) = find_nonces(sub.notify, sub.extranonce1, en2, DIFFICULTY, version=rolled)
    params = submit_params("w1", sub.notify, en2, nonce, version_bits="00002000")
    assert (await miner.call(4, "mining.submit", params))["result"] is True
    assert pool.accepted[-1].version_bits == "00002000"
    # the unrolled header is a different share, and it does not meet the target
    assert (await miner.call(5, "mining.submit", params[:5]))["error"][0] == 23
    # bmminer's multi_version sends the whole version: the same header, so a duplicate
    full = [*params[:5], f"{rolled:08x}"]
    assert await miner.call(6, "mining.submit", full) == reject(6, 22, "Duplicate share")


async def test_configure_answers_with_the_mask_intersection(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    extensions = ["version-rolling", "minimum-difficulty", "subscribe-extranonce", "x-unknown"]
    answer = await miner.call(
        0,
        "mining.configure",
        [extensions, {"version-rolling.mask": "0000ffff", "minimum-difficulty.value": 0.00001}],
    )
    assert answer["result"] == {
        "version-rolling": True,
        "version-rolling.mask": "0000e000",
        "minimum-difficulty": True,
        "subscribe-extranonce": True,
        "x-unknown": False,
    }
    sub = await miner.handshake()
    assert sub.difficulty == 0.00001  # raised to the miner's own minimum
    params = submit_params("w1", sub.notify, bytes(8), 0, version_bits="00100000")  # pool mask, not ours
    assert await miner.call(4, "mining.submit", params) == reject(4, 20, "Invalid version mask")


async def test_vardiff_moves_difficulty_and_announces_it(nursery: trio.Nursery) -> None:
    clock = FakeClock()
    pool = await start_pool(
        nursery,
        clock=clock,
        vardiff=True,
        vardiff_retarget_shares=2,
        vardiff_retarget_time=30,
        minimum_difficulty=1e-8,
        notify_interval=0.05,
    )
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    pool.stop_jobs()  # keep the timer out of the way while shares go in
    await miner.drain(0.1)
    en2 = bytes(8)
    nonces = find_nonces(sub.notify, sub.extranonce1, en2, DIFFICULTY, count=3)
    for request_id, nonce in zip((4, 5), nonces[:2], strict=True):
        answer = await miner.call(request_id, "mining.submit", submit_params("w1", sub.notify, en2, nonce))
        assert answer["result"] is True
    pool.stop_jobs(False)
    # two shares in no time: difficulty x4, announced right before a job
    assert await miner.notification("mining.set_difficulty") == {
        "id": None,
        "method": "mining.set_difficulty",
        "params": [4e-06],
    }
    assert (await miner.read())["method"] == "mining.notify"
    # the old job is still judged at the old difficulty
    answer = await miner.call(6, "mining.submit", submit_params("w1", sub.notify, en2, nonces[2]))
    assert answer["result"] is True and pool.accepted[-1].difficulty == DIFFICULTY
    # a quiet minute: the timer lowers it
    clock.now += 60
    assert (await miner.notification("mining.set_difficulty"))["params"] == [1e-06]


async def test_easy_nbits_makes_every_share_a_block(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, nbits="207fffff", send_show_message=True)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    assert (await miner.notification("client.show_message"))["params"][0].startswith("Authorised")
    height = pool.height
    assert (await valid_share(miner, sub, 4))["result"] is True
    assert (await miner.read())["params"] == [f"Block {height} solved by w1!"]
    notify = (await miner.read())["params"]
    assert notify[8] is True and notify[1] != sub.notify[1]
    assert pool.height == height + 1
    assert pool.statistics().blocks == 1 and pool.accepted[-1].block is True
    assert list(pool.blocks) == [pool.accepted[-1]]


async def test_session_resume_returns_the_same_extranonce1(nursery: trio.Nursery) -> None:
    clock = FakeClock()
    pool = await start_pool(nursery, clock=clock)
    first = await Miner.connect(pool)
    sub = await first.handshake()
    # while the first connection is open, its session cannot be taken
    other = await Miner.connect(pool)
    taken = (await other.call(1, "mining.subscribe", ["m/1", sub.session_id]))["result"]
    assert taken[1] != sub.extranonce1.hex()
    await first.aclose()
    await other.aclose()
    await wait_until_closed(pool)

    again = await Miner.connect(pool)
    resumed = (await again.call(1, "mining.subscribe", ["m/1", sub.session_id]))["result"]
    assert resumed[1] == sub.extranonce1.hex()
    unknown = await Miner.connect(pool)
    fresh = (await unknown.call(1, "mining.subscribe", ["m/1", "zz"]))["result"]
    assert fresh[1] not in (sub.extranonce1.hex(), resumed[1])

    await again.aclose()
    await wait_until_closed_except(pool, 1)
    clock.now += 601
    late = await Miner.connect(pool)
    expired = (await late.call(1, "mining.subscribe", ["m/1", sub.session_id]))["result"]
    assert expired[1] != sub.extranonce1.hex()


async def wait_until_closed_except(pool: ReferencePool, remaining: int) -> None:
    with trio.fail_after(READ_TIMEOUT):
        while pool.statistics().connections > remaining:
            await trio.sleep(0.01)


async def test_other_methods_are_answered(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.handshake()
    assert (await miner.call("txlist1", "mining.get_transactions", ["1"]))["result"] == []
    assert (await miner.call(5, "mining.multi_version", [1]))["result"] is True
    assert (await miner.call("xnsub", "mining.extranonce.subscribe", []))["result"] is True


async def unanswered(miner: Miner, request_id: Any, method: str, params: Any) -> bool:
    """Send a request, then one ckpool answers; True when only the second got an answer."""
    await miner.send(request_id, method, params)
    await miner.call("after", "mining.get_transactions", ["1"])
    return not any("method" not in m and m.get("id") == request_id for m in miner.backlog)


async def test_like_ckpool_a_second_authorize_and_a_second_subscribe_are_never_answered(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.handshake()
    assert await unanswered(miner, 3, "mining.authorize", ["w1", "x"])
    assert await unanswered(miner, 4, "mining.authorize", ["w2", "x"])
    assert await unanswered(miner, 5, "mining.subscribe", ["again/1.0"])
    assert pool.statistics().unanswered == {"authorise twice": 2, "subscribe twice": 1}


async def test_like_ckpool_an_authorize_after_a_refused_one_is_never_answered(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.call(1, "mining.subscribe", [])
    assert (await miner.call(2, "mining.authorize", ["", "x"]))["result"] is False
    assert await unanswered(miner, 3, "mining.authorize", ["good.w1", "x"])


async def test_like_ckpool_unknown_methods_and_early_submits_get_no_answer(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.call(1, "mining.subscribe", [])
    params = ["w1", "1", "0000000000000000", "00000000", "00000000"]
    assert await unanswered(miner, 2, "mining.submit", params)  # before authorize
    assert await unanswered(miner, 7, "mining.foo", [])
    assert pool.statistics().unanswered == {"submit before authorize": 1, "unknown method": 1}


async def test_like_ckpool_methods_match_case_insensitively_by_prefix(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    assert (await miner.call(1, "MINING.SUBSCRIBE", []))["result"][2] == 8
    assert (await miner.call(2, "mining.auth", ["mallory.w1", "x"]))["result"] is True
    assert pool.connections and next(iter(pool.connections)).workers == ("mallory.w1",)
    answer = await miner.call(3, "Mining.Submit ", ["mallory.w1", "1", "0000000000000000", "00000000", "00000000"])
    assert answer["result"] is False  # judged as a submit (an unknown method gets no answer)


async def test_like_ckpool_a_request_before_subscribe_closes_the_connection(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.send(1, "mining.submit", ["w1", "1", "00", "00000000", "00000000"])
    with pytest.raises(EOFError):
        with trio.fail_after(READ_TIMEOUT):
            await miner.read_line()


async def test_a_pool_that_answers_everything_is_one_option_away(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, ckpool_methods=False)
    miner = await Miner.connect(pool)
    await miner.handshake()
    assert (await miner.call(3, "mining.authorize", ["w2", "x"]))["result"] is True
    assert (await miner.call(7, "mining.foo", []))["error"][0] == 20


async def test_oversized_line_closes_the_connection(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.stream.send_all(b"x" * 2000)
    with pytest.raises(EOFError):
        with trio.fail_after(READ_TIMEOUT):
            await miner.read_line()


# --------------------------------------------------------------------------- failure modes


async def test_reject_all_and_reject_next(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    en2 = bytes(8)
    nonces = find_nonces(sub.notify, sub.extranonce1, en2, DIFFICULTY, count=4)
    shares = [submit_params("w1", sub.notify, en2, n) for n in nonces]

    pool.reject_all(23)
    assert await miner.call(4, "mining.submit", shares[0]) == reject(4, 23, "Low difficulty share")
    pool.reject_all(None)
    pool.reject_next(1, 21)
    assert await miner.call(5, "mining.submit", shares[1]) == reject(5, 21, "Job not found")
    for request_id, share in zip((6, 7, 8), shares[1:], strict=True):
        assert (await miner.call(request_id, "mining.submit", share))["result"] is True
    assert len(pool.accepted) == 3
    with pytest.raises(ValueError):
        pool.reject_all(99)


async def test_stall_is_a_blackhole_until_released(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, notify_interval=0.05)
    miner = await Miner.connect(pool)
    await miner.handshake()
    pool.stall()
    await miner.drain(0.1)  # a job in flight when the stall began may still arrive
    await miner.send(9, "mining.get_transactions", [])
    await miner.expect_silence(0.3)
    pool.stall(False)
    assert (await miner.response(9))["result"] == []
    assert (await miner.notification("mining.notify"))["method"] == "mining.notify"


async def test_stop_jobs_silences_notifies(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery, notify_interval=0.05)
    miner = await Miner.connect(pool)
    sub = await miner.handshake()
    pool.stop_jobs()
    await miner.drain(0.1)
    await miner.expect_silence(0.3)
    # still answering shares
    assert (await valid_share(miner, sub, 4))["result"] is True
    pool.stop_jobs(False)
    assert (await miner.read())["method"] == "mining.notify"


async def test_jobs_stopped_before_subscribe_arrive_on_restart(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    pool.stop_jobs()
    miner = await Miner.connect(pool)
    await miner.call(1, "mining.subscribe", [])
    await miner.expect_silence(0.1)
    pool.stop_jobs(False)
    assert (await miner.read())["method"] == "mining.set_difficulty"
    assert (await miner.read())["params"][8] is True


async def test_drop_connections_with_reset(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.handshake()
    assert pool.drop_connections(rst=True) == 1
    with pytest.raises(trio.BrokenResourceError) as caught:
        with trio.fail_after(READ_TIMEOUT):
            await miner.stream.receive_some(1024)
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    await wait_until_closed(pool)


async def test_drop_connections_gracefully(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.handshake()
    pool.drop_connections(rst=False)
    with trio.fail_after(READ_TIMEOUT):
        assert await miner.stream.receive_some(1024) == b""


async def test_request_reconnect(nursery: trio.Nursery) -> None:
    pool = await start_pool(nursery)
    miner = await Miner.connect(pool)
    await miner.handshake()
    pool.request_reconnect()
    assert await miner.read() == {"id": None, "method": "client.reconnect", "params": []}


# --------------------------------------------------------------------------- TLS, config, CLI


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
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
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "pool.pem", tmp_path / "pool.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_stratum_over_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    pool = await start_pool(nursery, ssl_context=server_context)
    client_context = ssl.create_default_context(cafile=str(cert_path))
    miner = await Miner.connect(pool, client_context)
    sub = await miner.handshake()
    assert (await valid_share(miner, sub, 4))["result"] is True
    pool.drop_connections(rst=True)
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(READ_TIMEOUT):
            await miner.stream.receive_some(1024)


def test_listen_addresses_are_parsed() -> None:
    assert parse_listen("127.0.0.1:3333") == ("127.0.0.1", 3333)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":3334") == ("0.0.0.0", 3334)
    for bad in ("3333", "host:port", "host:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="extranonce2_size"):
        PoolConfig(extranonce2_size=3)
    with pytest.raises(ConfigError, match="nbits"):
        PoolConfig(nbits="zz")
    with pytest.raises(ConfigError, match="difficulty"):
        PoolConfig(difficulty=0)
    assert PoolConfig().effective_minimum_difficulty == 1.0


async def test_testpool_command_serves_and_prints_a_summary() -> None:
    # Ctrl-C as a terminal sends it. A job started in the background by a shell without
    # job control inherits SIGINT ignored (and Python keeps it so); a test run like that
    # must not decide whether Ctrl-C works, so the child starts from the default.
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from bridge.testing.commands import testpool; "
        "testpool.main(['--listen', '127.0.0.1:0', '--difficulty', '0.000001',"
        " '--nbits', '207fffff'], standalone_mode=False)"
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(45):
            while b"testpool: listening on" not in output or not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
            port = int(output.split(b"stratum+tcp://127.0.0.1:")[1].split(b",")[0])
            miner = await Miner.connect(port)
            sub = await miner.handshake("rig1")
            assert (await valid_share(miner, sub, 4, worker="rig1"))["result"] is True
            await miner.aclose()
            process.send_signal(signal.SIGINT)
            while chunk := await process.stdout.receive_some(4096):
                output += chunk
            assert await process.wait() == 0, output.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode()
    assert "authorized rig1" in text and "BLOCK" in text
    assert "testpool: 1 accepted, 0 rejected, 1 blocks, 1 connections" in text
    assert "  rig1: 1 accepted, 0 rejected" in text
