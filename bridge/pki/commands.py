"""``stratumrm pki``: the command group that runs the private CA.

Register it with ``cli.add_command(pki)``. Every command works on ``--dir DIR`` (default
``./pki``; layout in :mod:`bridge.pki.authority`), prints what it did and where the files
are, and on failure exits with status 1 and a one-line message saying what to do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from bridge.errors import PKIError
from bridge.pki.authority import (
    DEFAULT_CA_COMMON_NAME,
    DEFAULT_CA_DAYS,
    DEFAULT_CRL_DAYS,
    DEFAULT_MINER_DAYS,
    DEFAULT_POOL_DAYS,
    CertificateAuthority,
    Issuance,
    IssuedCertificate,
)
from bridge.pki.bundle import read_bundle
from bridge.pki.identity import (
    CertificateIdentity,
    format_serial,
    identity_of,
    key_type_of,
    public_key_fingerprint,
)
from bridge.pki.issuing import (
    DEFAULT_KEY_TYPE,
    KEY_TYPES,
    REVOCATION_REASONS,
    KeyType,
    RevocationReason,
)
from bridge.pki.revocation import crl_number_of

KEY_TYPE_NAMES = {"p256": "ECDSA P-256", "ed25519": "Ed25519"}

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class _PKIDirectory:
    path: Path

    def open(self) -> CertificateAuthority:
        return CertificateAuthority.open(self.path)


_pass_directory = click.make_pass_decorator(_PKIDirectory)


def _reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn PKIError and OS errors into a one-line ``Error: ...`` and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except PKIError as error:
            raise click.ClickException(str(error)) from None
        except BrokenPipeError:
            raise  # the reader went away (`| head`): not a file problem
        except OSError as error:
            where = f": {error.filename}" if error.filename else ""
            raise click.ClickException(f"{error.strerror or error}{where}; check the path and its permissions") from None

    return wrapper


def _now() -> datetime:
    return datetime.now(UTC)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _key_type_name(key_type: str) -> str:
    return KEY_TYPE_NAMES.get(key_type, key_type)


def _print_fields(fields: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        click.echo(f"  {label:<{width}}  {value}")


# --------------------------------------------------------------------------- group


@click.group("pki")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default="./pki",
    show_default=True,
    help="Directory holding the CA, its index and everything it issued.",
)
@click.pass_context
def pki(context: click.Context, directory: Path) -> None:
    """Run the private CA: certificates for sidecars and miner-side proxies, revocation."""
    context.obj = _PKIDirectory(directory)


_key_type_option = click.option(
    "--key-type",
    type=click.Choice(KEY_TYPES),
    default=DEFAULT_KEY_TYPE,
    show_default=True,
    help="Key algorithm (P-256 suits embedded TLS stacks and secure elements).",
)


# --------------------------------------------------------------------------- init


@pki.command("init")
@_key_type_option
@click.option("--common-name", default=DEFAULT_CA_COMMON_NAME, show_default=True, help="Subject CN of the CA.")
@click.option("--days", type=click.IntRange(min=1), default=DEFAULT_CA_DAYS, show_default=True, help="CA lifetime.")
@click.option(
    "--crl-days",
    type=click.IntRange(min=1),
    default=DEFAULT_CRL_DAYS,
    show_default=True,
    help="nextUpdate of the revocation list, counted from each publication.",
)
@_pass_directory
@_reports_errors
def init_command(directory: _PKIDirectory, key_type: KeyType, common_name: str, days: int, crl_days: int) -> None:
    """Create a CA (key, certificate, empty revocation list) in DIR; never overwrites."""
    authority = CertificateAuthority.create(
        directory.path, key_type=key_type, common_name=common_name, days=days, crl_days=crl_days
    )
    certificate = authority.ca_certificate
    click.echo(f"Created CA {common_name!r} ({_key_type_name(key_type)}) in {authority.directory}")
    _print_fields(
        [
            ("CA certificate", f"{authority.ca_certificate_path}  (give it to every proxy and sidecar)"),
            ("CA private key", f"{authority.ca_key_path}  (mode 0600; keep it off the network)"),
            (
                "revocations",
                f"{authority.revocations_path}  (empty; `stratumrm sidecar --revocations` watches it)",
            ),
            ("index", str(authority.index_path)),
            ("valid until", _when(certificate.not_valid_after_utc)),
        ]
    )
    click.echo(f"Next: stratumrm pki --dir {authority.directory} issue-pool NAME --dns HOST")


# --------------------------------------------------------------------------- issuing


def _echo_issuance(verb: str, authority: CertificateAuthority, issuance: Issuance) -> None:
    record = issuance.record
    click.echo(f"{verb} {record.role} certificate {record.name!r} (serial {record.serial}, {_key_type_name(record.key_type)})")
    fields = [("valid", f"{_when(record.not_before)} to {_when(record.not_after)} ({record.days} days)")]
    if record.role == "pool":
        fields.append(("hosts", ", ".join((*record.dns_names, *record.ip_addresses))))
        fields.append(("certificate", str(issuance.pool_certificate_path)))
        fields.append(("private key", f"{issuance.key_path}  (mode 0600)"))
    else:
        fields.append(("accounts", ", ".join(record.accounts)))
        fields.append(("bundle", f"{issuance.bundle_path}  (certificate, CA, private key; mode 0600)"))
    fields.append(("copy", str(issuance.certificate_path)))
    _print_fields(fields)
    if record.role == "pool":
        click.echo(
            f"Run: stratumrm sidecar --cert {issuance.pool_certificate_path} --key {issuance.key_path} "
            f"--ca {authority.ca_certificate_path} --revocations {authority.revocations_path} "
            "--pool stratum+tcp://POOL:PORT"
        )
    else:
        click.echo(
            f"Install on the rig or gateway: stratumrm proxy --bundle {issuance.bundle_path} "
            "--upstream stratumrm://SIDECAR:PORT (copy the bundle there; it holds the private key)"
        )


@pki.command("issue-pool")
@click.argument("name")
@click.option("--dns", "dns_names", multiple=True, metavar="HOST", help="DNS name miners dial (repeatable).")
@click.option("--ip", "ip_addresses", multiple=True, metavar="ADDRESS", help="IP address miners dial (repeatable).")
@click.option("--days", type=click.IntRange(min=1), default=DEFAULT_POOL_DAYS, show_default=True, help="Lifetime.")
@_key_type_option
@_pass_directory
@_reports_errors
def issue_pool_command(
    directory: _PKIDirectory,
    name: str,
    dns_names: tuple[str, ...],
    ip_addresses: tuple[str, ...],
    days: int,
    key_type: KeyType,
) -> None:
    """Issue a certificate for the pool-side sidecar NAME."""
    authority = directory.open()
    issuance = authority.issue_pool(name, dns_names=dns_names, ip_addresses=ip_addresses, days=days, key_type=key_type)
    _echo_issuance("Issued", authority, issuance)


@pki.command("issue-miner")
@click.argument("name")
@click.option(
    "--account",
    "accounts",
    multiple=True,
    required=True,
    metavar="ACCOUNT",
    help="Account (the user before '.' in user.worker) this proxy may authorize (repeatable).",
)
@click.option("--days", type=click.IntRange(min=1), default=DEFAULT_MINER_DAYS, show_default=True, help="Lifetime.")
@_key_type_option
@_pass_directory
@_reports_errors
def issue_miner_command(directory: _PKIDirectory, name: str, accounts: tuple[str, ...], days: int, key_type: KeyType) -> None:
    """Issue a certificate and one-file bundle for the miner-side proxy NAME."""
    authority = directory.open()
    issuance = authority.issue_miner(name, accounts=accounts, days=days, key_type=key_type)
    _echo_issuance("Issued", authority, issuance)


@pki.command("renew")
@click.argument("name")
@click.option("--days", type=click.IntRange(min=1), default=None, help="New lifetime [default: the previous one].")
@click.option("--revoke-previous", is_flag=True, help="Revoke the certificate being replaced right away.")
@_pass_directory
@_reports_errors
def renew_command(directory: _PKIDirectory, name: str, days: int | None, revoke_previous: bool) -> None:
    """Issue NAME again: new key and serial, same accounts or hosts."""
    authority = directory.open()
    previous = authority.latest(name)
    issuance = authority.renew(name, days=days, revoke_previous=revoke_previous)
    _echo_issuance("Renewed", authority, issuance)
    if revoke_previous and not previous.is_revoked:
        click.echo(f"Revoked the previous certificate {previous.serial}; {authority.revocations_path} updated.")
    elif not previous.is_revoked and not previous.is_expired(_now()):
        click.echo(
            f"The previous certificate {previous.serial} stays valid until {_when(previous.not_after)}; "
            "once the new one is installed: "
            f"stratumrm pki --dir {authority.directory} revoke {previous.serial}"
        )


# --------------------------------------------------------------------------- revocation


@pki.command("revoke")
@click.argument("name_or_serial", metavar="NAME|SERIAL")
@click.option(
    "--reason",
    type=click.Choice(REVOCATION_REASONS),
    default="unspecified",
    show_default=True,
    help="Reason recorded in the revocation list.",
)
@_pass_directory
@_reports_errors
def revoke_command(directory: _PKIDirectory, name_or_serial: str, reason: RevocationReason) -> None:
    """Revoke every certificate of NAME, or the one with SERIAL (hex, unique prefix ok)."""
    authority = directory.open()
    revoked = authority.revoke(name_or_serial, reason=reason)
    for record in revoked:
        click.echo(f"Revoked {record.role} certificate {record.name!r} (serial {record.serial}).")
    click.echo(
        f"Updated {authority.revocations_path}; sidecars watching it refuse "
        f"{'this certificate' if len(revoked) == 1 else 'these certificates'} within seconds."
    )


@pki.command("crl")
@click.option("--crl-days", type=click.IntRange(min=1), default=None, help="New nextUpdate interval in days.")
@_pass_directory
@_reports_errors
def crl_command(directory: _PKIDirectory, crl_days: int | None) -> None:
    """Re-publish the revocation list with a fresh nextUpdate (run it before it is due)."""
    authority = directory.open()
    path = authority.publish_revocations(crl_days=crl_days)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    click.echo(
        f"Published {path}: CRL number {crl_number_of(crl)}, {len(list(crl))} revoked, "
        f"next update due {_when(crl.next_update_utc or _now())}."
    )


# --------------------------------------------------------------------------- list and show


@pki.command("list")
@_pass_directory
@_reports_errors
def list_command(directory: _PKIDirectory) -> None:
    """List every certificate issued: serial, name, role, accounts, not-after, status."""
    authority = directory.open()
    records = authority.certificates()
    if not records:
        click.echo(
            f"No certificates issued yet by the CA in {authority.directory}; "
            "issue one with `stratumrm pki issue-pool` or `issue-miner`."
        )
        return
    now = _now()
    rows = [("SERIAL", "NAME", "ROLE", "ACCOUNTS", "NOT AFTER", "STATUS")]
    for record in records:
        rows.append(
            (
                record.serial,
                record.name,
                record.role,
                ",".join(record.accounts) or "-",
                _when(record.not_after),
                _status_text(record, now),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    _warn_if_revocations_due(authority, now)


def _status_text(record: IssuedCertificate, now: datetime) -> str:
    if record.revoked_at is not None:
        reason = "" if record.revocation_reason in (None, "unspecified") else f" ({record.revocation_reason})"
        return f"revoked {record.revoked_at:%Y-%m-%d}{reason}"
    return record.status(now)


def _warn_if_revocations_due(authority: CertificateAuthority, now: datetime) -> None:
    try:
        crl = x509.load_pem_x509_crl(authority.revocations_path.read_bytes())
    except (OSError, ValueError):
        click.echo(
            f"Warning: {authority.revocations_path} is missing or unreadable; run `stratumrm pki crl`.",
            err=True,
        )
        return
    next_update = crl.next_update_utc
    if next_update is not None and (next_update - now).total_seconds() < 3 * 86400:
        click.echo(
            f"Warning: the revocation list is due for re-publication at {_when(next_update)}; run `stratumrm pki crl`.",
            err=True,
        )


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in data)


def _certificate_fields(certificate: x509.Certificate, now: datetime) -> list[tuple[str, str]]:
    try:
        identity: CertificateIdentity | None = identity_of(certificate)
        problem = None
    except PKIError as error:
        identity, problem = None, str(error)
    fields: list[tuple[str, str]] = []
    if identity is not None:
        fields.append(("role", identity.role))
        fields.append(("name", identity.name))
    else:
        fields.append(("subject", certificate.subject.rfc4514_string()))
        fields.append(("note", f"not a StratumRM certificate: {problem}"))
    fields.append(("serial", format_serial(certificate.serial_number)))
    if identity is not None and identity.role == "miner":
        fields.append(("accounts", ", ".join(identity.accounts)))
    if identity is not None and identity.role == "pool":
        fields.append(("hosts", ", ".join((*identity.dns_names, *identity.ip_addresses))))
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    status = "not yet valid" if now < start else "expired" if now > end else f"valid, {(end - now).days} days left"
    fields.append(("valid", f"{_when(start)} to {_when(end)}  ({status})"))
    fields.append(("key", _key_type_name(key_type_of(certificate.public_key()))))
    fields.append(("issuer", certificate.issuer.rfc4514_string()))
    fields.append(("SHA-256", _colon_hex(certificate.fingerprint(hashes.SHA256()))))
    fields.append(("SPKI SHA-256", public_key_fingerprint(certificate)))
    return fields


def _standing_with_authority(directory: Path, certificate: x509.Certificate, now: datetime) -> tuple[str, str] | None:
    """A ("status", ...) line from DIR's index when DIR holds the CA that issued it."""
    try:
        authority = CertificateAuthority.open(directory)
    except PKIError:
        return None
    if certificate.serial_number == authority.ca_certificate.serial_number:
        return None
    try:
        certificate.verify_directly_issued_by(authority.ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        return ("issued by", f"another CA, not the one in {directory}")
    serial = format_serial(certificate.serial_number)
    record = next((r for r in authority.certificates() if r.serial == serial), None)
    if record is None:
        return ("status", f"unknown: signed by the CA in {directory} but missing from its index")
    return ("status", f"{_status_text(record, now)} (per {authority.index_path})")


def _show_certificate(
    path: Path,
    directory: Path,
    certificate: x509.Certificate,
    heading: str,
    extra_fields: tuple[tuple[str, str], ...] = (),
) -> None:
    now = _now()
    click.echo(f"{path}: {heading}")
    fields = _certificate_fields(certificate, now)
    standing = _standing_with_authority(directory, certificate, now)
    if standing is not None:
        fields.append(standing)
    _print_fields([*fields, *extra_fields])


def _show_revocation_list(path: Path, directory: Path, data: bytes) -> None:
    crl = x509.load_pem_x509_crl(data) if b"-----BEGIN X509 CRL-----" in data else x509.load_der_x509_crl(data)
    click.echo(f"{path}: revocation list (CRL)")
    next_update = crl.next_update_utc
    fields = [
        ("issuer", crl.issuer.rfc4514_string()),
        ("CRL number", str(crl_number_of(crl))),
        ("this update", _when(crl.last_update_utc)),
        ("next update", _when(next_update) if next_update else "-"),
        ("revoked", str(len(list(crl)))),
    ]
    try:
        authority = CertificateAuthority.open(directory)
        signed = crl.is_signature_valid(authority.ca_certificate.public_key())  # type: ignore[arg-type]
        fields.append(("signature", f"{'valid' if signed else 'NOT valid'} for the CA in {directory}"))
        names = {record.serial: record.name for record in authority.certificates()}
    except PKIError:
        names = {}
    _print_fields(fields)
    for entry in sorted(crl, key=lambda entry: entry.revocation_date_utc):
        serial = format_serial(entry.serial_number)
        name = names.get(serial, "?")
        click.echo(f"    {serial}  {name}  revoked {_when(entry.revocation_date_utc)}")


@pki.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_pass_directory
@_reports_errors
def show_command(directory: _PKIDirectory, file: Path) -> None:
    """Describe a certificate, miner bundle or revocation list in FILE."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{file} not found; pass a certificate, bundle or revocations.pem") from None
    if b"-----BEGIN X509 CRL-----" in data:
        _show_revocation_list(file, directory.path, data)
        return
    if b"PRIVATE KEY-----" in data:
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise PKIError(f"{file} holds a private key only; show the matching certificate instead")
        contents = read_bundle(file)
        certificate = x509.load_pem_x509_certificate(contents.certificate_pem)
        ca_certificate = x509.load_pem_x509_certificate(contents.ca_certificate_pem)
        _show_certificate(
            file,
            directory.path,
            certificate,
            "miner bundle (certificate, CA certificate, private key)",
            (
                ("bundle CA", ca_certificate.subject.rfc4514_string()),
                ("private key", "matches the certificate"),
            ),
        )
        return
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            certificate = x509.load_pem_x509_certificate(data)
        else:
            certificate = x509.load_der_x509_certificate(data)
    except ValueError:
        raise PKIError(f"{file} is not a certificate, bundle or revocation list (PEM or DER)") from None
    _show_certificate(file, directory.path, certificate, "certificate")
