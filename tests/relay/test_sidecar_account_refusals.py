"""The sidecar core reports each account it refused, once per channel, for the driver's log."""

from __future__ import annotations

from test_sidecar_core import Harness

from bridge.relay.sidecar.channels import AccountRefused


def test_refused_accounts_are_reported_once_per_account_and_channel() -> None:
    harness = Harness(accounts={"alice"})
    harness.hello()
    harness.open_channel(3, "alice.rig1", "bob.rig1")  # bob's authorize is refused
    assert harness.session.refusals() == [AccountRefused(3, "mining.authorize", "bob.rig1", "bob")]
    assert harness.session.refusals() == []  # taken
    harness.send({"ch": 3, "id": 20, "method": "mining.authorize", "params": ["bob.rig2", "x"]})
    harness.send(
        {
            "ch": 3,
            "id": 21,
            "method": "mining.submit",
            "params": ["bob.rig1", "j1", "0000002a", "6554a2c1", "00000001"],
        }
    )
    harness.datagram(harness.seal(harness.share(worker_index=1)))
    assert harness.session.refusals() == []  # bob again, on the same channel: counted, not reported
    harness.send(
        {
            "ch": 3,
            "id": 22,
            "method": "mining.submit",
            "params": ["carol.rig1", "j1", "0000002b", "6554a2c1", "00000001"],
        }
    )
    assert harness.session.refusals() == [AccountRefused(3, "mining.submit", "carol.rig1", "carol")]
    harness.open_channel(4, "bob.rig9")  # another channel: reported again
    assert harness.session.refusals() == [AccountRefused(4, "mining.authorize", "bob.rig9", "bob")]
    assert harness.session.statistics().authorizations_refused == 3


def test_nothing_is_reported_when_accounts_are_not_enforced() -> None:
    harness = Harness()
    harness.hello()
    harness.open_channel(3, "anyone.rig1")
    assert harness.session.refusals() == [] and harness.session.statistics().authorizations_refused == 0
