"""Arbitrary bytes and arbitrary JSON never make a session raise."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sv1.client import ClientSession
from bridge.sv1.server import ServerSession

METHODS = st.sampled_from(
    [
        "mining.subscribe",
        "mining.authorize",
        "mining.submit",
        "mining.configure",
        "mining.notify",
        "mining.set_difficulty",
        "mining.set_extranonce",
        "client.reconnect",
        "mining.extranonce.subscribe",
        "mining.suggest_difficulty",
        "mining.suggest_target",
        "mining.multi_version",
        "mining.get_transactions",
        "client.get_version",
        "mining.ping",
        "mining.set_version_mask",
        "client.show_message",
        "x",
    ]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
MESSAGES = st.fixed_dictionaries(
    {}, optional={"id": JSON, "method": METHODS | JSON, "params": JSON, "result": JSON, "error": JSON}
)


def drive_server(chunks: list[bytes]) -> None:
    s = ServerSession(max_line=512)
    for chunk in chunks:
        s.receive_data(chunk)
        s.data_to_send()


def drive_client(chunks: list[bytes]) -> None:
    c = ClientSession(max_line=512)
    c.subscribe("fuzz/1")
    c.authorize("u", "p")
    for chunk in chunks:
        c.receive_data(chunk)
        c.data_to_send()


@settings(deadline=None)  # examples: the profile (100; 1000 with --run-slow)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_bytes(chunks) -> None:
    drive_server(chunks)
    drive_client(chunks)


@settings(deadline=None)  # examples: the profile (100; 1000 with --run-slow)
@given(st.lists(MESSAGES, max_size=10))
def test_arbitrary_json_messages(messages) -> None:
    data = [json.dumps(m).encode() + b"\n" for m in messages]
    drive_server(data)
    drive_client(data)
    # Also answer whatever the server session produced as events, the way a pool would.
    s = ServerSession()
    for chunk in data:
        for event in s.receive_data(chunk):
            request_id = getattr(event, "id", None)
            if isinstance(request_id, (int, str)):
                s.respond(request_id, True)
        s.data_to_send()
