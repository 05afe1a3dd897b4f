"""``stratumrm config``: print a commented example file for a role, or check a file."""

from __future__ import annotations

import click

from bridge import settings
from bridge.errors import BridgeError
from bridge.runtime import OptionProblem

__all__ = ["config"]


@click.group("config")
def config() -> None:
    """Configuration files: `config example ROLE > FILE`, then `config check FILE`."""


@config.command("example")
@click.argument("role", type=click.Choice(sorted(settings.ROLES)))
def example(role: str) -> None:
    """Print a complete TOML file for ROLE, every key with what it does, its default and what breaks."""
    click.echo(settings.example(role), nl=False)


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--role", type=click.Choice(sorted(settings.ROLES)), help="proxy or sidecar (default: told by the keys).")
@click.option("--no-files", is_flag=True, help="Do not check that certificate and key files can be read.")
@click.option("--show", is_flag=True, help="Print the effective settings (defaults filled in, secrets as ***).")
def check(file: str, role: str | None, no_files: bool, show: bool) -> None:
    """Validate FILE: TOML syntax, known keys, types, choices, addresses, URLs and certificate paths.

    Exit status 0 when the file is usable, 2 with one line naming the key otherwise.
    """
    try:
        role, chosen, warnings = settings.check_file(file, role, files=not no_files)
    except BridgeError as exc:
        raise OptionProblem(str(exc)) from None
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{file}: a valid {role} configuration")
    if show:
        import json

        click.echo(json.dumps(settings.describe(chosen), indent=2))
