"""The proxy's upstream list and TOML configuration file."""

from __future__ import annotations

import pytest

from bridge.config import parse_upstream_entry
from bridge.errors import ConfigError
from bridge.settings import load


def test_upstream_entries_take_priority_weight_and_name_fragments() -> None:
    entry = parse_upstream_entry("stratum+tcp://eu.pool.example:3333#xnsub#weight=70#name=eu", 3)
    assert entry.url.host == "eu.pool.example" and entry.url.xnsub
    assert (entry.priority, entry.weight, entry.label) == (3, 70.0, "eu")
    plain = parse_upstream_entry("stratumrm://[2001:db8::1]:3334#priority=0", 5)
    assert plain.priority == 0 and plain.label == "[2001:db8::1]:3334" and not plain.url.xnsub
    with pytest.raises(ConfigError):
        parse_upstream_entry("stratum+tcp://a:1#weight=lots", 0)
    with pytest.raises(ConfigError):
        parse_upstream_entry("stratum+tcp://a:1#weight=-1", 0)


def test_the_toml_file_lists_upstreams_in_order_and_resolves_paths(tmp_path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        """
listen = "0.0.0.0:3335"
bundle = "farm1.bundle.pem"

[[upstream]]
url = "stratumrm://sidecar.example:3334"
name = "main"

[[upstream]]
url = "stratum+tcp://backup.example:3333#xnsub"
weight = 2.0

[[upstream]]
url = "stratum+tcp://other.example:3333"
priority = 1

[failover]
strategy = "weighted"
silence_timeout = 2.0
no_upstream = "keep"
"""
    )
    config = load(path, "proxy")
    assert config.listen == "0.0.0.0:3335" and config.bundle == str(tmp_path / "farm1.bundle.pem")
    entries = config.entries()
    assert [(e.label, e.priority, e.weight) for e in entries] == [
        ("main", 0, 1.0),
        ("backup.example:3333", 1, 2.0),
        ("other.example:3333", 1, 1.0),
    ]
    assert entries[1].url.xnsub
    assert config.failover.strategy == "weighted" and config.failover.silence_timeout == 2.0


def test_a_misspelt_key_is_refused_with_its_name(tmp_path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text("[failover]\nsilence_timout = 2.0\n")
    with pytest.raises(ConfigError, match="silence_timout"):
        load(path, "proxy")
    path.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(path, "proxy")
