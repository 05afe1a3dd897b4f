"""The sidecar treats the proxy as untrusted: only canonical SV1 requests, re-encoded, reach the pool.

ckpool matches methods case-insensitively by prefix (stratifier.c), so a compromised
proxy certified for ``alice`` that spells a method loosely must not get a request for
``mallory`` past the account check (issue 9, item 3).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_sidecar_core import Harness

from bridge.relay.sidecar.channels import RELAYED_PARAMS, AccountRefused, RequestRefused

SUBMIT_PARAMS = ["mallory.worker", "j1", "0000002a", "6554a2c1", "00000001"]


def alice() -> Harness:
    harness = Harness(accounts={"alice"})
    harness.hello()
    harness.open_channel(3, "alice.rig1")
    return harness


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("Mining.Authorize", ["mallory.worker", "x"]),
        ("mining.auth", ["mallory.worker", "x"]),
        ("MINING.AUTHORIZE", ["mallory.worker", "x"]),
        ("mining.authorize ", ["mallory.worker", "x"]),
        (" mining.authorize", ["mallory.worker", "x"]),
        ("mining.authorize\u0000", ["mallory.worker", "x"]),
        ("MINING.SUBMIT", SUBMIT_PARAMS),
        ("mining.sub", SUBMIT_PARAMS),
        ("mining.submit ", SUBMIT_PARAMS),
        ("Mining.Submit", SUBMIT_PARAMS),
        ("mining.submitx", SUBMIT_PARAMS),
        ("mining.foo", []),
        ("client.reconnect", ["evil.example", 3333, 0]),
    ],
)
def test_a_loosely_spelled_method_never_reaches_the_pool(method: str, params: list[Any]) -> None:
    harness = alice()
    harness.send({"ch": 3, "id": 40, "method": method, "params": params})
    harness.advance(0.01)
    assert harness.to_pool[3] == []
    [answer] = [m for m in harness.take() if m.get("id") == 40]
    assert answer["error"][0] == 20 and "method not allowed" in answer["error"][1]
    assert "mining.authorize" in answer["error"][1]  # the message says what is allowed
    [refusal] = harness.session.refusals()
    assert isinstance(refusal, RequestRefused) and refusal.method == method and refusal.ch == 3
    assert harness.session.statistics().requests_refused == 1


def test_repeated_refusals_are_answered_each_time_and_reported_once() -> None:
    harness = alice()
    for request_id in range(50, 60):
        harness.send({"ch": 3, "id": request_id, "method": "MINING.SUBMIT", "params": SUBMIT_PARAMS})
    answers = [m for m in harness.take() if m.get("ch") == 3]
    assert [m["id"] for m in answers] == list(range(50, 60)) and all(m["result"] is False for m in answers)
    assert len(harness.session.refusals()) == 1
    assert harness.session.statistics().requests_refused == 10 and harness.to_pool[3] == []


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("mining.authorize", []),
        ("mining.authorize", [12345, "x"]),
        ("mining.authorize", {"user": "mallory.worker"}),
        ("mining.submit", ["mallory.worker", "j1"]),
        ("mining.submit", {"worker": "mallory.worker"}),
        ("mining.suggest_difficulty", ["lots"]),
        ("mining.subscribe", {"agent": "x"}),
    ],
)
def test_malformed_params_are_refused_by_the_sidecar_not_left_to_the_pool(method: str, params: Any) -> None:
    harness = alice()
    harness.send({"ch": 3, "id": 41, "method": method, "params": params})
    assert harness.to_pool[3] == []
    [answer] = [m for m in harness.take() if m.get("id") == 41]
    assert answer["error"][0] == 20 and "malformed params" in answer["error"][1]


def test_the_pool_gets_canonical_params_re_encoded_not_the_proxys_bytes() -> None:
    harness = alice()
    harness.send(
        {"ch": 3, "id": 42, "method": "mining.authorize", "params": ["alice.rig2", "x", {"smuggled": "mallory.w"}]},
        {"ch": 3, "id": 43, "method": "mining.extranonce.subscribe", "params": ["mallory.w"]},
        {
            "ch": 3,
            "id": 44,
            "method": "mining.submit",
            "params": ["alice.rig1", "j1", "0000002a", "6554a2c1", "00000001", "00c00000", "mallory.w"],
        },
    )
    sent = {m["method"]: m["params"] for m in harness.to_pool[3]}
    assert sent == {
        "mining.authorize": ["alice.rig2", "x"],
        "mining.extranonce.subscribe": [],
        "mining.submit": ["alice.rig1", "j1", "0000002a", "6554a2c1", "00000001", "00c00000"],
    }
    assert harness.session.refusals() == []


def test_every_canonical_method_is_relayed() -> None:
    harness = alice()
    harness.send(
        {"ch": 3, "id": 60, "method": "mining.configure", "params": [["version-rolling"], {"version-rolling.mask": "1fffe000"}]},
        {"ch": 3, "id": 61, "method": "mining.suggest_difficulty", "params": [4]},
        {"ch": 3, "id": 62, "method": "mining.suggest_target", "params": ["00" * 32]},
        {"ch": 3, "id": 63, "method": "mining.multi_version", "params": [1]},
        {"ch": 3, "id": 64, "method": "mining.get_transactions", "params": ["j1"]},
        {"ch": 3, "id": 65, "method": "mining.extranonce.subscribe", "params": []},
        {"ch": 3, "id": 66, "method": "mining.subscribe", "params": ["cgminer/4.11.1", "6b05d758"]},
    )
    relayed = {m["method"] for m in harness.to_pool[3]}
    assert relayed | {"mining.authorize", "mining.submit"} == set(RELAYED_PARAMS)


def test_a_canonical_authorize_for_another_account_is_still_refused_with_24() -> None:
    harness = alice()
    harness.send({"ch": 3, "id": 45, "method": "mining.authorize", "params": ["mallory.worker", "x"]})
    [answer] = [m for m in harness.take() if m.get("id") == 45]
    assert answer["error"][0] == 24 and harness.to_pool[3] == []
    assert harness.session.refusals() == [AccountRefused(3, "mining.authorize", "mallory.worker", "mallory")]
