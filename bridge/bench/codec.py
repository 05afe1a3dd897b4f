"""Micro-benchmark: the cost of decoding and re-encoding SV1 lines.

Measures, in microseconds per message (median of several repeats):

- ``submit codec``: msgspec decode of a real cpuminer ``mining.submit`` line into its
  Struct and encode of the relayed request (the bare codec round trip);
- ``submit relay``: the same line through the relay's sessions: the miner-facing
  ``ServerSession.receive_data`` (decode, hex validation) and the pool-facing
  ``ClientSession.submit`` + ``data_to_send`` (id mapping, encode);
- ``notify codec`` / ``notify relay``: a real ckpool ``mining.notify`` line with a
  12-entry merkle branch, decoded, validated and re-encoded toward the miner.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import msgspec

from bridge.sv1.client import ClientSession
from bridge.sv1.framing import BoundedDecoder
from bridge.sv1.messages import (
    MinerRequest,
    Notify,
    OutgoingRequest,
    PoolRequest,
    params_list,
)
from bridge.sv1.server import ServerSession

SUBMIT_LINE = (
    b'{"method": "mining.submit", "params": ["minerd1.rig1", "6b05d75700000009", '
    b'"0000000000000000", "6b05d7a7", "b8acc61a"], "id":4}\n'
)
BRANCH = ",".join(f'"{i:064x}"' for i in range(12))
NOTIFY_LINE = (
    '{"params":["6b05d75700000037","36b6b33055f3556c2919c92af2fc9ddeeee9c69503e3f3e7f193bdcf00000000",'
    '"01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff21016d000415d9056b0447544e010c",'
    '"0a636b706f6f6cffffffff0200f2052a01000000160014751e76e8199196d454941c45d1b3a323f1433bd60000000000000000266a24aa21a9ede2f61c3f71d1defd3fa999dfa36953755c690689799962b48bebd836974e8cf900000000",'
    f'[{BRANCH}],"20000000","207fffff","6b05d915",true],"id":null,"method":"mining.notify"}}\n'
).encode()


def measure(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    """Median microseconds per call over ``repeats`` runs of ``iterations`` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter() - start) / iterations * 1e6)
    return statistics.median(samples)


def run(iterations: int = 50_000, repeats: int = 7) -> dict[str, float]:
    decode_request = BoundedDecoder(MinerRequest).decode
    decode_pool = BoundedDecoder(PoolRequest).decode
    encode = msgspec.json.Encoder().encode
    line = SUBMIT_LINE.rstrip(b"\n")

    def submit_codec() -> bytes:
        submit = decode_request(line)
        return encode(OutgoingRequest(1, "mining.submit", params_list(submit.params)))

    server = ServerSession()
    server.receive_data(
        b'{"id":1,"method":"mining.subscribe","params":[]}\n{"id":2,"method":"mining.authorize","params":["minerd1.rig1","x"]}\n'
    )
    server.subscribe_result(1, "5ad7056b", 8, [["mining.notify", "1"]])
    server.respond(2, True)
    server.data_to_send()
    client = ClientSession(max_pending=10**9)
    client.subscribe("bench")
    client.receive_data(b'{"result":[[["mining.notify","1"]],"5ad7056b",8],"id":1,"error":null}\n')
    client.authorize("minerd1.rig1", "x")
    client.receive_data(b'{"result":true,"error":null,"id":2}\n')
    client.data_to_send()

    def submit_relay() -> bytes:
        for event in server.receive_data(SUBMIT_LINE):
            client.submit(event.params, event.id)
        client._pending.clear()  # the pool's verdict is not part of this measure
        return client.data_to_send()

    notify_line = NOTIFY_LINE.rstrip(b"\n")

    def notify_codec() -> bytes:
        return encode(decode_pool(notify_line))

    def notify_relay() -> bytes:
        for event in client.receive_data(NOTIFY_LINE):
            assert type(event) is Notify
            server.notify(event.params)
        return server.data_to_send()

    return {
        "submit codec (decode + encode)": measure(submit_codec, iterations, repeats),
        "submit relay (server session -> client session)": measure(submit_relay, iterations, repeats),
        "notify codec (decode + encode)": measure(notify_codec, iterations // 5, repeats),
        "notify relay (client session -> server session, validated)": measure(notify_relay, iterations // 5, repeats),
    }


def report(results: dict[str, float]) -> str:
    width = max(len(name) for name in results)
    rows = [f"{'SV1 line':<{width}}  µs/message"]
    rows += [f"{name:<{width}}  {value:10.2f}" for name, value in results.items()]
    return "\n".join(rows)
