"""``stratumrm pki token|enrollments|issue-operator`` and ``stratumrm proxy enroll``.

The ``pki`` ones attach to the ``pki`` group on import (the CLI imports this module
next to :mod:`bridge.pki.commands`); :data:`enroll_command` is added to ``proxy``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from bridge.errors import PKIError
from bridge.pki.bundle import read_bundle
from bridge.pki.commands import (
    _key_type_option,
    _pass_directory,
    _PKIDirectory,
    _reports_errors,
    _when,
    pki,
)
from bridge.pki.enrollment import (
    DATABASE_FILE,
    EnrollmentStore,
    ca_fingerprint,
    parse_ttl,
)
from bridge.pki.issuing import KEY_TYPES, KeyType

__all__ = ["enroll_command"]


def _store(directory: _PKIDirectory) -> EnrollmentStore:
    directory.open()  # refuse a directory without a CA, with CertificateAuthority's advice
    return EnrollmentStore(directory.path / DATABASE_FILE)


@pki.command("token")
@click.argument("name")
@click.option(
    "--account",
    "accounts",
    multiple=True,
    required=True,
    help="Account (the user part of worker names) the certificate may mine for; repeatable.",
)
@click.option("--ttl", default="1h", show_default=True, help="How long the token can be used: 30m, 1h, 2d (at most 30d).")
@_pass_directory
@_reports_errors
def token_command(directory: _PKIDirectory, name: str, accounts: tuple[str, ...], ttl: str) -> None:
    """Create a one-time enrollment token for the miner-side proxy NAME.

    Hand the token and the CA fingerprint to the farm; there, `stratumrm proxy enroll`
    makes the key, and the sidecar's management port signs its request. The token is
    shown once and stored hashed; using it, or letting it expire, ends it.
    """
    authority = directory.open()
    store = _store(directory)
    try:
        token, expires = store.create(name, accounts, parse_ttl(ttl))
    finally:
        store.close()
    fingerprint = ca_fingerprint(authority.ca_certificate)
    click.echo(f"Enrollment token for {name!r} (accounts {', '.join(accounts)}), single use, until {_when(expires)}:")
    click.echo(f"  token        {token}")
    click.echo(f"  fingerprint  {fingerprint}")
    click.echo(
        "On the farm: stratumrm proxy enroll https://SIDECAR:MANAGEMENT_PORT "
        f"--token {token} --fingerprint {fingerprint} --out {name}.bundle.pem"
    )


@pki.command("enrollments")
@_pass_directory
@_reports_errors
def enrollments_command(directory: _PKIDirectory) -> None:
    """The enrollment audit trail: tokens created (by whom), certificates enrolled and refusals (from where)."""
    store = _store(directory)
    try:
        entries = store.audit()
    finally:
        store.close()
    if not entries:
        click.echo("No enrollment tokens yet: `stratumrm pki token NAME --account ACCOUNT`.")
        return
    for entry in entries:
        click.echo(
            f"{entry.at:%Y-%m-%d %H:%M:%S}  {entry.event:<13}  {entry.name or '-':<20}  {entry.actor or '-':<22}  {entry.detail}"
        )


@pki.command("issue-operator")
@click.argument("name")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True, help="Lifetime.")
@_key_type_option
@_pass_directory
@_reports_errors
def issue_operator_command(directory: _PKIDirectory, name: str, days: int, key_type: KeyType) -> None:
    """Issue a person's certificate for management ports that require one (--http-require-operator).

    Writes operators/NAME.bundle.pem (for curl: --cert) and operators/NAME.p12 for a
    browser, protected by the passphrase printed here once. It cannot mine: sidecars
    accept only proxy certificates.
    """
    authority = directory.open()
    issuance = authority.issue_operator(name, days=days, key_type=key_type)
    assert issuance.bundle_path is not None
    contents = read_bundle(issuance.bundle_path)
    key = serialization.load_pem_private_key(contents.private_key_pem, password=None)
    passphrase = secrets.token_urlsafe(12)
    p12 = pkcs12.serialize_key_and_certificates(
        name.encode(),
        key,
        issuance.certificate,
        [authority.ca_certificate],
        serialization.BestAvailableEncryption(passphrase.encode()),
    )
    p12_path = issuance.bundle_path.with_name(f"{name}.p12")
    from bridge.pki._files import replace_secret_file

    replace_secret_file(p12_path, p12)
    record = issuance.record
    click.echo(f"Issued operator certificate {name!r} (serial {record.serial}), valid until {_when(record.not_after)}")
    click.echo(f"  bundle      {issuance.bundle_path}  (certificate, CA, private key; mode 0600)")
    click.echo(f"  browser     {p12_path}  (PKCS#12, passphrase {passphrase})")
    click.echo("Import the .p12 in the browser's certificate settings, then open the management port over https://.")


@click.command("enroll")
@click.argument("url")
@click.option("--token", required=True, help="The one-time token from `stratumrm pki token`.")
@click.option("--fingerprint", required=True, help="The CA fingerprint printed with the token (SHA-256).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default="proxy.bundle.pem",
    show_default=True,
    help="Where to write the bundle (certificate, CA, the new private key; mode 0600).",
)
@click.option("--key-type", type=click.Choice(KEY_TYPES), default="p256", show_default=True, help="Key algorithm.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
def enroll_command(url: str, token: str, fingerprint: str, out: Path, key_type: KeyType, force: bool) -> None:
    """Get this proxy's certificate from the sidecar's management port URL (https://HOST:PORT).

    The private key is made here and never sent; the server must present a
    certificate from the CA with --fingerprint.
    """
    from bridge.pki.enroll_client import enroll

    try:
        response = enroll(url, token, fingerprint, out, key_type=key_type, force=force)
    except PKIError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"Enrolled {response.name!r} (serial {response.serial}, accounts {', '.join(response.accounts)}, "
        f"valid until {_when(response.not_after)}); bundle written to {out} (mode 0600)."
    )
    click.echo(f"Run: stratumrm proxy --bundle {out} --upstream stratumrm://SIDECAR:PORT")
