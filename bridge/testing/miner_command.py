"""``stratumrm testminer``: run reference miners against a pool from the command line.

Each miner is a :class:`~bridge.testing.miner.Miner` that hashes for real, so
this is the quickest way to see a pool (or the bridge in front of one) accept
or reject real shares. Every verdict is printed as it arrives, in the spirit
of cgminer's ``Accepted``/``Rejected`` lines, and a summary per miner and in
total is printed at the end (after ``--duration`` seconds, once every miner has
had ``--max-shares`` answered, or on Ctrl-C).

With ``--count N`` the miners share one process and one event loop; worker
names get a number appended (``USER.WORKER1``, ``USER.WORKER2`` ...) so the
pool sees N rigs. CPython hashes about 1.7 MH/s per core, so use a pool
difficulty around 0.0001 or lower, and ``--hashrate`` to share the CPU fairly.
"""

from __future__ import annotations

import ssl

import click
import trio

from bridge.errors import BridgeError
from bridge.runtime import run_until_interrupted
from bridge.testing.miner import (
    AuthorizationFailed,
    Miner,
    MinerEvent,
    MinerStatistics,
    Profile,
    ReconnectRefused,
    ReconnectRequested,
    ShareAnswered,
    SubscribeFailed,
)


def verdict_line(miner: Miner, event: ShareAnswered) -> str:
    """One cgminer-style line for a pool's answer to a share."""
    share = event.share
    verdict = share.verdict
    latency = ""
    if share.answered_at is not None:
        latency = f" ({(share.answered_at - share.sent_at) * 1000:.0f} ms)"
    stale = " stale" if share.stale else ""
    head = (
        f"[{miner.name}] {{}} {share.nonce} Diff {share.share_difficulty:.3g}/{share.difficulty:g}"
        f" job {share.job_id}{stale}{latency}"
    )
    if verdict is not None and verdict.accepted:
        return head.format("Accepted")
    reason = f"{verdict.code} {verdict.message}" if verdict is not None else "no answer"
    return head.format("Rejected") + f" ({reason})"


def summary_lines(statistics: list[MinerStatistics], duration: float) -> list[str]:
    """The end-of-run table: one line per miner and a total."""
    header = (
        f"{'miner':<28} {'submitted':>9} {'accepted':>8} {'rejected':>8} {'unanswered':>10} "
        f"{'stale':>5} {'hashes':>12} {'MH/s':>6}"
    )
    lines = [header]
    for stats in statistics:
        unanswered = stats.pending + stats.lost
        rate = stats.hashes / duration / 1e6 if duration > 0 else 0.0
        lines.append(
            f"{stats.name:<28} {stats.submitted:>9} {stats.accepted:>8} {stats.rejected:>8} "
            f"{unanswered:>10} {stats.stale_submitted:>5} {stats.hashes:>12} {rate:>6.2f}"
        )
    total_hashes = sum(s.hashes for s in statistics)
    lines.append(
        f"{'total':<28} {sum(s.submitted for s in statistics):>9} {sum(s.accepted for s in statistics):>8} "
        f"{sum(s.rejected for s in statistics):>8} {sum(s.pending + s.lost for s in statistics):>10} "
        f"{sum(s.stale_submitted for s in statistics):>5} {total_hashes:>12} "
        f"{(total_hashes / duration / 1e6 if duration > 0 else 0.0):>6.2f}"
    )
    return lines


def print_event(miner: Miner, event: MinerEvent) -> None:
    """Print the events a person running the command wants to see."""
    if isinstance(event, ShareAnswered):
        click.echo(verdict_line(miner, event))
    elif isinstance(event, (SubscribeFailed, AuthorizationFailed)):
        click.echo(f"[{miner.name}] {type(event).__name__}: {event.message}")
    elif isinstance(event, ReconnectRequested):
        where = "the configured pool" if event.host is None else f"{event.host}:{event.port}"
        click.echo(f"[{miner.name}] client.reconnect: reconnecting to {where}")
    elif isinstance(event, ReconnectRefused):
        click.echo(f"[{miner.name}] client.reconnect refused: {event.reason}")


def _worker_name(user: str, index: int, count: int) -> str:
    return user if count == 1 else f"{user}{index + 1}"


async def run_miners(miners: list[Miner], duration: float | None) -> float:
    """Run the miners until they finish or ``duration`` passes; return the seconds taken."""
    started = trio.current_time()
    with trio.move_on_after(duration if duration is not None else float("inf")):
        async with trio.open_nursery() as nursery:
            for miner in miners:
                nursery.start_soon(miner.run)
    return trio.current_time() - started


@click.command("testminer")
@click.option("--url", required=True, help="Pool URL: stratum+tcp://HOST:PORT or stratum+ssl://HOST:PORT (#xnsub allowed).")
@click.option("--user", required=True, help="USER.WORKER to authorize as (a number is appended with --count > 1).")
@click.option("--password", default="x", show_default=True)
@click.option(
    "--profile",
    type=click.Choice([profile.value for profile in Profile]),
    default=Profile.CGMINER.value,
    show_default=True,
    help="Which real miner's wire behaviour to reproduce.",
)
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 100_000), help="Miners in this process.")
@click.option("--hashrate", type=click.FloatRange(min=1.0), help="Cap per miner, hashes per second.")
@click.option("--duration", type=click.FloatRange(min=0.0), help="Stop after this many seconds.")
@click.option("--max-shares", type=click.IntRange(min=1), help="Each miner stops after this many shares are answered.")
@click.option(
    "--suggest-difficulty",
    type=click.FloatRange(min=0.0, min_open=True),
    help="Difficulty the miner suggests (profile permitting).",
)
@click.option("--ntime-roll", is_flag=True, help="Roll ntime forward with the clock, up to 60 s.")
@click.option(
    "--reconnect-delay",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Seconds before reconnecting after a lost connection.",
)
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False), help="CA file to verify a stratum+ssl pool.")
@click.option("-q", "--quiet", is_flag=True, help="Only the summary.")
@click.option("-v", "--verbose", count=True, help="Log protocol details (-vv for debug).")
def testminer(
    url: str,
    user: str,
    password: str,
    profile: str,
    count: int,
    hashrate: float | None,
    duration: float | None,
    max_shares: int | None,
    suggest_difficulty: float | None,
    ntime_roll: bool,
    reconnect_delay: float,
    ca_file: str | None,
    quiet: bool,
    verbose: int,
) -> None:
    """Mine for real against a pool with reference miners and report every verdict."""
    if verbose:  # each -v one level more than the default (warnings only)
        from bridge import logs

        logs.setup(verbose - 1)
    if duration is None and max_shares is None:
        click.echo("mining until interrupted (Ctrl-C); use --duration or --max-shares to stop on your own", err=True)
    printer = None if quiet else print_event
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    try:
        miners = [
            Miner(
                url,
                _worker_name(user, index, count),
                password,
                profile=profile,
                name=f"{profile}#{index + 1}",
                hashrate=hashrate,
                max_shares=max_shares,
                suggest_difficulty=suggest_difficulty,
                ntime_roll=ntime_roll,
                ssl_context=context,
                reconnect_delay=reconnect_delay,
                on_event=printer,
            )
            for index in range(count)
        ]
    except BridgeError as exc:
        raise click.UsageError(str(exc)) from None
    elapsed = 0.0

    async def mine() -> None:
        nonlocal elapsed
        elapsed = await run_miners(miners, duration)

    run_until_interrupted(mine)
    statistics = [miner.statistics() for miner in miners]
    if elapsed <= 0:
        elapsed = max((s.hashes / s.hashrate for s in statistics if s.hashrate > 0), default=0.0)
    for line in summary_lines(statistics, elapsed):
        click.echo(line)
