"""Config files for both roles: one model per role, the generated example, errors, merging."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import click
import msgspec
import pytest
from click.testing import CliRunner
from processes import free_port, wait_for_port

from bridge import settings
from bridge.cli import _register_optional, cli
from bridge.errors import ConfigError
from bridge.testing.pki import make_test_pki

_register_optional()

# Options of the role commands that are not settings (they say what to run, not how).
NOT_SETTINGS = {"config_file", "verbose", "upstreams", "backups"}
RENAMED = {"sidecar": {"pool_url": "pool", "no_udp": "udp"}, "proxy": {}}


def _keys(model: type) -> set[str]:
    keys = set()
    for field in msgspec.structs.fields(model):
        keys.add(field.name)
        base = settings._struct_at(model, [field.name])
        if base is not None and field.name != "upstream":
            keys |= {inner.name for inner in msgspec.structs.fields(base)}
    return keys


@pytest.mark.parametrize("role", sorted(settings.ROLES))
def test_the_example_parses_to_the_defaults_and_documents_every_key(role: str) -> None:
    text = settings.example(role)
    model = settings.ROLES[role]
    parsed = settings.parse(text, model, f"{role}.toml")
    parsed.validate()
    defaults = model()
    for field in msgspec.structs.fields(model):
        if field.name in ("upstream", "intercept"):
            continue
        value = getattr(parsed, field.name)
        _, meta = settings._unwrap(field.type)
        if (meta.extra or {}).get("required"):
            assert value is not None, field.name
        else:
            assert value == getattr(defaults, field.name), field.name
    for key in _keys(model):
        if key in ("upstream", "failover", "intercept"):
            assert f"\n[{key}]" in text or f"\n[[{key}]]" in text or f"\n# [[{key}]]" in text
            continue
        assert f"\n{key} = " in text or f"\n# {key} = " in text, f"{key} missing from the example"
    # Every key says what it does, its default and what breaks.
    assert text.count("# default: ") == text.count("# if wrong: ") >= len(_keys(model)) - 2


@pytest.mark.parametrize("role", sorted(settings.ROLES))
def test_every_option_of_the_role_is_a_setting_with_the_same_default(role: str) -> None:
    command = cli.commands[role]
    keys = _keys(settings.ROLES[role])
    defaults = settings.ROLES[role]()
    failover = getattr(defaults, "failover", None)
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in NOT_SETTINGS:
            continue
        key = RENAMED.get(role, {}).get(param.name, param.name)
        assert key in keys, (
            f"`stratumrm {role} --{param.name.replace('_', '-')}` has no key in bridge/settings.py: add it to "
            f"{settings.ROLES[role].__name__} (with its description) so --config files can set it"
        )
        if key in {"udp", "log_format"}:
            continue
        model_default = getattr(defaults, key) if hasattr(defaults, key) else getattr(failover, key)
        default = None if param.default is None or type(param.default).__name__ == "Sentinel" else param.default
        if param.multiple:
            default = list(default or ())
        assert default == model_default, f"--{param.name}: {default!r} != {model_default!r}"


def test_errors_name_the_file_the_key_and_the_valid_choices(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    cases = {
        '[failover]\nstrategy = "fail-over"\n': ["proxy.toml", "failover.strategy", "failover, weighted"],
        "[failover]\nhold_dwn = 5\n": ["proxy.toml", "failover.hold_dwn", "did you mean 'hold_down'"],
        "hold_down = 5\n": ["hold_down", "[failover] table"],
        '[[upstream]]\nurl = "stratum+tcp://pool:3333#xnusb"\n': ["upstream[0].url", "#xnusb", "#xnsub"],
        'listen = "0.0.0.0:99999"\n': ["key listen", "0 to 65535"],
        "listen = \n": ["proxy.toml", "not valid TOML"],
        'submit_timeout = "soon"\n': ["key submit_timeout", "expected `float`"],
    }
    for text, needles in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            settings.load(path, "proxy")
        for needle in needles:
            assert needle in str(caught.value), (text, str(caught.value))


def test_defaults_then_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text('listen = "127.0.0.1:4000"\ndead_after = 9.0\ncert = "certs/sidecar.crt"\n')
    merged = settings.merge(
        "sidecar", str(path), {"dead_after": 2.0, "pool_url": "stratum+tcp://p:1"}, rename={"pool_url": "pool"}
    )
    assert merged.listen == "127.0.0.1:4000"  # file over default
    assert merged.dead_after == 2.0  # flag over file
    assert merged.pool == "stratum+tcp://p:1"
    assert merged.rekey_interval == 3600.0  # default
    assert merged.cert == str(tmp_path / "certs" / "sidecar.crt")  # relative to the file
    proxy = settings.merge("proxy", None, {"hold_down": 1.0, "strategy": "weighted"})
    assert proxy.failover.hold_down == 1.0 and proxy.failover.strategy == "weighted"


def test_secrets_are_redacted_when_described() -> None:
    chosen = settings.merge("proxy", None, {"probe_password": "hunter2", "probe_user": "farm.probe"})
    described = settings.describe(chosen)
    assert described["failover"]["probe_password"] == "***"
    assert described["failover"]["probe_user"] == "farm.probe"
    assert "hunter2" not in repr(described)


def test_config_commands_print_an_example_and_check_files(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "example", "proxy"])
    assert result.exit_code == 0
    tomllib.loads(result.output)
    path = tmp_path / "proxy.toml"
    path.write_text(result.output.replace('# probe_password = "x"', 'probe_password = "s3cret"'))
    result = runner.invoke(cli, ["config", "check", str(path), "--show"])
    assert result.exit_code == 0, result.output
    assert "a valid proxy configuration" in result.output
    assert "s3cret" not in result.output and '"probe_password": "***"' in result.output
    path.write_text('[failover]\nno_upstream = "wait"\n')
    result = runner.invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: {path}: key failover.no_upstream: invalid enum value 'wait'; valid choices: disconnect, keep"
    ]


def test_the_sidecar_runs_from_a_config_file_and_flags_win(tmp_path: Path) -> None:
    """End to end: `stratumrm sidecar --config FILE` listens where the file says, unless --listen says otherwise."""
    pki = make_test_pki(tmp_path / "pki", accounts=("alice",))
    file_port, flag_port = free_port(), free_port()
    path = tmp_path / "sidecar.toml"
    text = settings.example("sidecar")
    text = text.replace('listen = "0.0.0.0:3334"', f'listen = "127.0.0.1:{file_port}"')
    text = text.replace('cert = "sidecar.crt"', f'cert = "{pki.pool_certificate}"')
    text = text.replace('key = "sidecar.key"', f'key = "{pki.pool_key}"')
    text = text.replace('ca = "ca.crt"', f'ca = "{pki.ca_certificate}"')
    text = text.replace("udp = true", "udp = false")
    path.write_text(text)
    # The check and both sidecars (one from the file alone, one with --listen) start side
    # by side: three Python start-ups at once rather than one after another.
    check = subprocess.Popen(
        [sys.executable, "-m", "bridge", "config", "check", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    runs = [
        (
            subprocess.Popen(
                [sys.executable, "-m", "bridge", "sidecar", "--config", str(path), *extra],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
            port,
        )
        for extra, port in (([], file_port), (["--listen", f"127.0.0.1:{flag_port}"], flag_port))
    ]
    try:
        for _process, port in runs:
            wait_for_port(port, timeout=30)
    finally:
        errors = []
        for process, _port in runs:
            process.terminate()
            errors.append(process.communicate(timeout=30)[1])
        check_err = check.communicate(timeout=60)[1]
    assert check.returncode == 0, check_err
    for (process, _port), err in zip(runs, errors, strict=True):
        assert process.returncode == 0, err
        assert "shutting down (SIGTERM)" in err and "Traceback" not in err
