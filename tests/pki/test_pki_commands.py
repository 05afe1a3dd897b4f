"""``stratumrm pki`` through click's CliRunner."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from bridge.pki.authority import CertificateAuthority
from bridge.pki.bundle import load_bundle
from bridge.pki.commands import pki
from bridge.pki.identity import identity_from_pem
from bridge.pki.revocation import RevocationList


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "pki"


def run(directory: Path, *arguments: str) -> Result:
    return CliRunner().invoke(pki, ["--dir", str(directory), *arguments], catch_exceptions=False)


def ok(directory: Path, *arguments: str) -> str:
    result = run(directory, *arguments)
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(directory: Path, *arguments: str) -> str:
    """Run a command that must fail; return its one-line error."""
    result = run(directory, *arguments)
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_creates_the_ca_and_says_where(directory: Path) -> None:
    output = ok(directory, "init")
    assert f"{directory / 'ca.pem'}" in output
    assert f"{directory / 'ca.key'}" in output and "0600" in output
    assert f"{directory / 'revocations.pem'}" in output
    assert "issue-pool" in output  # what to do next
    assert _mode(directory / "ca.key") == 0o600
    assert identity_from_pem((directory / "ca.pem").read_bytes()).role == "ca"


def test_init_refuses_to_overwrite(directory: Path) -> None:
    ok(directory, "init")
    key_before = (directory / "ca.key").read_bytes()
    error = fails(directory, "init")
    assert "already holds a CA" in error and "another --dir" in error
    assert (directory / "ca.key").read_bytes() == key_before


def test_init_with_ed25519_and_a_name(directory: Path) -> None:
    output = ok(directory, "init", "--key-type", "ed25519", "--common-name", "Farm CA", "--days", "365")
    assert "Ed25519" in output
    certificate = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert certificate.subject.rfc4514_string() == "CN=Farm CA"


def test_dir_defaults_to_pki_in_the_working_directory(tmp_path: Path) -> None:
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(pki, ["init"])
        assert result.exit_code == 0, result.output
        assert Path("pki/ca.pem").is_file()


def test_issue_pool(directory: Path) -> None:
    ok(directory, "init")
    output = ok(directory, "issue-pool", "pool-eu1", "--dns", "pool.example.com", "--ip", "10.0.0.5", "--days", "90")
    certificate_path = directory / "pools" / "pool-eu1.pem"
    key_path = directory / "pools" / "pool-eu1.key"
    assert str(certificate_path) in output and str(key_path) in output
    assert "stratumrm sidecar --cert" in output
    assert _mode(key_path) == 0o600
    identity = identity_from_pem(certificate_path.read_bytes())
    assert identity.dns_names == ("pool.example.com",) and identity.ip_addresses == ("10.0.0.5",)


def test_issue_pool_errors(directory: Path) -> None:
    assert "init" in fails(directory, "issue-pool", "pool", "--dns", "x.example")  # no CA yet
    ok(directory, "init")
    assert "--dns NAME or --ip ADDRESS" in fails(directory, "issue-pool", "pool")
    assert "invalid certificate name" in fails(directory, "issue-pool", "../pool", "--dns", "x.example")


def test_issue_miner_writes_one_bundle(directory: Path) -> None:
    ok(directory, "init")
    output = ok(directory, "issue-miner", "rig07", "--account", "alice", "--account", "bob", "--days", "7")
    bundle = directory / "miners" / "rig07.bundle.pem"
    assert str(bundle) in output and "stratumrm proxy --bundle" in output
    assert _mode(bundle) == 0o600
    certificate_pem, _key_pem, ca_pem = load_bundle(bundle)
    assert ca_pem == (directory / "ca.pem").read_bytes()
    identity = identity_from_pem(certificate_pem)
    assert identity.accounts == ("alice", "bob")
    assert (identity.not_valid_after - identity.not_valid_before).days == 7


def test_issue_miner_errors(directory: Path) -> None:
    ok(directory, "init")
    result = run(directory, "issue-miner", "rig07")
    assert result.exit_code == 2 and "--account" in result.stderr  # click usage error
    assert "pass --account 'alice'" in fails(directory, "issue-miner", "rig07", "--account", "alice.rig07")
    ok(directory, "issue-miner", "rig07", "--account", "alice")
    assert "renew rig07" in fails(directory, "issue-miner", "rig07", "--account", "alice")


def _list_rows(directory: Path) -> list[list[str]]:
    output = ok(directory, "list")
    lines = output.strip().splitlines()
    assert lines[0].split()[:4] == ["SERIAL", "NAME", "ROLE", "ACCOUNTS"]
    return [re.split(r"\s{2,}", line) for line in lines[1:]]


def test_list_shows_serial_name_accounts_not_after_and_revocation(directory: Path) -> None:
    ok(directory, "init")
    assert "No certificates issued yet" in ok(directory, "list")
    ok(directory, "issue-pool", "pool", "--ip", "127.0.0.1")
    ok(directory, "issue-miner", "rig07", "--account", "alice", "--account", "bob")
    ok(directory, "revoke", "pool")
    rows = _list_rows(directory)
    authority = CertificateAuthority.open(directory)
    serials = [record.serial for record in authority.certificates()]
    assert [row[0] for row in rows] == serials
    assert rows[0][1:4] == ["pool", "pool", "-"]
    assert rows[0][5].startswith("revoked ")
    assert rows[1][1:4] == ["rig07", "miner", "alice,bob"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", rows[1][4])
    assert rows[1][5] == "valid"


def test_revoke_by_name_and_by_serial_updates_the_list_the_sidecar_reads(directory: Path) -> None:
    ok(directory, "init")
    ok(directory, "issue-miner", "rig07", "--account", "alice")
    ok(directory, "issue-miner", "rig08", "--account", "alice")
    revocations = RevocationList(directory / "revocations.pem", directory / "ca.pem")
    authority = CertificateAuthority.open(directory)
    rig07, rig08 = authority.latest("rig07"), authority.latest("rig08")

    output = ok(directory, "revoke", "rig07")
    assert rig07.serial in output and str(directory / "revocations.pem") in output
    assert revocations.reload_if_changed() and revocations.is_revoked(rig07.serial_number)
    assert not revocations.is_revoked(rig08.serial_number)

    ok(directory, "revoke", rig08.serial, "--reason", "key_compromise")
    assert revocations.reload_if_changed() and revocations.is_revoked(rig08.serial_number)

    assert "already revoked" in fails(directory, "revoke", "rig07")
    assert "pki list" in fails(directory, "revoke", "ghost")


def test_renew_keeps_name_and_accounts_with_a_new_serial(directory: Path) -> None:
    ok(directory, "init")
    ok(directory, "issue-miner", "rig07", "--account", "alice", "--account", "bob", "--days", "10")
    bundle = directory / "miners" / "rig07.bundle.pem"
    before = identity_from_pem(load_bundle(bundle)[0])
    output = ok(directory, "renew", "rig07")
    after = identity_from_pem(load_bundle(bundle)[0])
    assert after.serial != before.serial
    assert (after.name, after.accounts) == (before.name, before.accounts)
    assert after.not_valid_after - after.not_valid_before == before.not_valid_after - before.not_valid_before
    assert before.serial_hex in output and "stays valid" in output  # how to retire the old one
    assert _mode(bundle) == 0o600

    output = ok(directory, "renew", "rig07", "--revoke-previous", "--days", "3")
    assert "Revoked the previous certificate" in output
    assert "no certificate named 'ghost'" in fails(directory, "renew", "ghost")


def test_show_certificate_bundle_and_revocation_list(directory: Path) -> None:
    ok(directory, "init")
    ok(directory, "issue-pool", "pool", "--dns", "pool.example.com")
    ok(directory, "issue-miner", "rig07", "--account", "alice")
    serial = CertificateAuthority.open(directory).latest("rig07").serial

    output = ok(directory, "show", str(directory / "miners" / "rig07.bundle.pem"))
    assert "miner bundle" in output and "rig07" in output and "alice" in output and serial in output
    assert re.search(r"private key\s+matches the certificate", output)
    assert "status" in output and "valid" in output

    output = ok(directory, "show", str(directory / "pools" / "pool.pem"))
    assert "pool.example.com" in output and "role" in output

    ok(directory, "revoke", "rig07")
    output = ok(directory, "show", str(directory / "revocations.pem"))
    assert re.search(r"CRL number\s+2\n", output) and serial in output and "rig07" in output
    assert re.search(r"signature\s+valid", output)

    output = ok(directory, "show", str(directory / "certs" / f"{serial}.pem"))
    assert "revoked" in output

    assert "private key only" in fails(directory, "show", str(directory / "ca.key"))
    assert "not found" in fails(directory, "show", str(directory / "nope.pem"))
    (directory / "junk.txt").write_text("hello")
    assert "not a certificate" in fails(directory, "show", str(directory / "junk.txt"))


def test_show_works_without_a_ca_directory(directory: Path, tmp_path: Path) -> None:
    ok(directory, "init")
    output = ok(tmp_path / "elsewhere", "show", str(directory / "ca.pem"))
    assert re.search(r"role\s+ca\n", output)


def test_crl_republishes(directory: Path) -> None:
    ok(directory, "init")
    output = ok(directory, "crl", "--crl-days", "7")
    assert "CRL number 2" in output and "0 revoked" in output


def test_every_command_has_help() -> None:
    for command in ("init", "issue-pool", "issue-miner", "revoke", "list", "show", "renew", "crl"):
        result = CliRunner().invoke(pki, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
