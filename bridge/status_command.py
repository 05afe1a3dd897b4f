"""``stratumrm status``: print what a running proxy or sidecar reports on --status-listen.

The lead registers it with ``cli.add_command(status)``.
"""

from __future__ import annotations

import sys

import click
import msgspec

from bridge.errors import BridgeError

__all__ = ["status"]

#: Exit status when the role reports warnings (an expiring certificate ...), for monitoring.
WARNINGS_EXIT_STATUS = 3


@click.command("status")
@click.option(
    "--url",
    required=True,
    metavar="URL",
    help="The role's status address, as given to its --status-listen: http://127.0.0.1:PORT.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON document instead.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds to wait.")
def status(url: str, as_json: bool, timeout: float) -> None:
    """Show a running proxy's or sidecar's statistics, certificates and warnings.

    Exit status: 0 when all is well, 3 when the role reports warnings (for example a
    certificate that expires soon), 1 when the status cannot be fetched.
    """
    from bridge.stats.status import fetch_status, format_status, status_url

    try:
        document = fetch_status(url, timeout)
    except BridgeError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(document), indent=2).decode())
    else:
        click.echo(format_status(document, status_url(url)))
    if document.get("warnings"):
        sys.exit(WARNINGS_EXIT_STATUS)
