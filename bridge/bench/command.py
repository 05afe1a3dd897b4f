"""``stratumrm bench``: the benchmarks, as a click group.

- ``stratumrm bench codec``: SV1 decode/re-encode cost per message (:mod:`bridge.bench.codec`);
- ``stratumrm bench transport``: the same share load straight to the pool, through the
  SV1 relay, through SV1 in TLS and through StratumRM (:mod:`bridge.bench.transport`);
- ``stratumrm bench farm``: link bytes per miner per hour for 500 miners behind one proxy
  (:mod:`bridge.bench.farm`);
- ``stratumrm bench flood``: forged datagrams dropped per sidecar CPU-second, honest shares
  during the flood (:mod:`bridge.bench.flood`); ``stratumrm bench pending``: memory per
  connection that has not finished its TLS handshake (:mod:`bridge.bench.pending`);
- ``stratumrm bench scale``: 1,000 to 10,000 rigs behind one proxy and one sidecar:
  memory per rig, reconnect storm, shares/s, CPU per share (:mod:`bridge.bench.scale`);
- ``stratumrm bench loss``: lone shares through a real lossy link (a TUN link between two
  network namespaces, :mod:`bridge.bench.loss`), SV1 over TLS against StratumRM; needs root;
- ``stratumrm bench`` or ``stratumrm bench all``: all three, tables at the end.

``--quick`` makes one short run with small loads (a check that everything works, not a
measurement); ``--runs N`` sets how many runs the medians are taken over. Progress goes
to standard error, one line per phase; the tables go to standard output. The benchmark
starts its own processes (pool, proxies, sidecar) on 127.0.0.1; ``--keep-logs DIR``
keeps their logs (``--verbose-logs``: at info level; ``--profile``: with a cProfile
dump of each process, to see where a path spends its time).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from bridge.bench import codec, farm, transport
from bridge.bench.load import LoadError
from bridge.bench.roles import RoleError

F = TypeVar("F", bound=Callable[..., Any])

QUICK_CODEC_ITERATIONS = 5000
QUICK_CODEC_REPEATS = 3


def _common_options(function: F) -> F:
    options = [
        click.option("--quick", is_flag=True, help="One short run with small loads: checks that it all works."),
        click.option(
            "--runs", type=click.IntRange(1), default=None, help="Runs to take medians over [default: 3; 1 with --quick]."
        ),
        click.option(
            "--keep-logs",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Keep the logs of the benchmark's processes in this directory.",
        ),
        click.option("--verbose-logs", is_flag=True, help="The processes log at info level (with --keep-logs)."),
        click.option("--profile", is_flag=True, help="Run the processes under cProfile; NAME.pstats files go with the logs."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _progress_printer() -> Callable[[str], None]:
    started = time.monotonic()

    def progress(line: str) -> None:
        click.echo(f"[{time.monotonic() - started:6.1f}s] {line}", err=True)

    return progress


def _run(function: Callable[[], Any]) -> Any:
    """Run a benchmark coroutine; turn its known failures into a clean error message."""
    try:
        return trio.run(function)
    except (RoleError, LoadError, RuntimeError, OSError, trio.BrokenResourceError) as exc:
        raise click.ClickException(f"benchmark failed: {exc}") from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted") from None


def _transport_settings(quick: bool, runs: int | None, **overrides: Any) -> transport.TransportSettings:
    base = transport.TransportSettings.quick() if quick else transport.TransportSettings()
    return transport.with_overrides(base, runs=runs, **overrides)


def _farm_settings(quick: bool, runs: int | None, **overrides: Any) -> farm.FarmSettings:
    base = farm.FarmSettings.quick() if quick else farm.FarmSettings()
    return farm.with_overrides(base, runs=runs, **overrides)


def _codec_report(iterations: int, repeats: int) -> str:
    return f"SV1 codec, median of {repeats} runs of {iterations} messages (python {sys.version.split()[0]})\n" + codec.report(
        codec.run(iterations, repeats)
    )


@dataclass(frozen=True)
class LogOptions:
    """Where the processes' logs go, and what goes in them."""

    keep: Path | None = None
    verbose: bool = False
    profile: bool = False

    def check(self) -> None:
        if self.profile and self.keep is None:
            raise click.UsageError("--profile needs --keep-logs DIR: the profiles are written there")


def _transport_report(settings: transport.TransportSettings, logs: LogOptions, progress: Callable[[str], None]) -> str:
    runs = _run(lambda: transport.run(settings, progress, logs.keep, verbose_logs=logs.verbose, profile=logs.profile))
    return transport.report(transport.summarize(settings, runs))


def _farm_report(settings: farm.FarmSettings, logs: LogOptions, progress: Callable[[str], None]) -> str:
    runs = _run(lambda: farm.run(settings, progress, logs.keep, verbose_logs=logs.verbose, profile=logs.profile))
    return farm.report(farm.summarize(settings, runs))


@click.group("bench", invoke_without_command=True)
@_common_options
@click.pass_context
def bench(
    context: click.Context, quick: bool, runs: int | None, keep_logs: Path | None, verbose_logs: bool, profile: bool
) -> None:
    """Benchmarks: SV1 codec, transports side by side, farm bandwidth (all of them by default)."""
    if context.invoked_subcommand is None:
        context.invoke(all_benchmarks, quick=quick, runs=runs, keep_logs=keep_logs, verbose_logs=verbose_logs, profile=profile)


@bench.command("codec")
@click.option("--iterations", type=click.IntRange(1000), default=50_000, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=7, show_default=True, help="Runs per measure; the median is printed.")
def codec_command(iterations: int, repeats: int) -> None:
    """SV1 decode/re-encode cost per message."""
    click.echo(_codec_report(iterations, repeats))


@bench.command("transport")
@_common_options
@click.option("--connections", type=click.IntRange(1), default=None, help="Miners per path [default: 20].")
@click.option(
    "--latency-rate", type=click.FloatRange(min=1), default=None, help="Shares/s for bytes and latency [default: 1000]."
)
@click.option(
    "--latency-seconds", type=click.FloatRange(min=0.1), default=None, help="Measured seconds at that rate [default: 5]."
)
@click.option(
    "--step-seconds", type=click.FloatRange(min=0.1), default=None, help="Measured seconds per throughput step [default: 2]."
)
@click.option("--max-rate", type=click.FloatRange(min=100), default=None, help="Highest rate offered [default: 80000].")
@click.option(
    "--loss",
    "lossy_percent",
    type=click.FloatRange(0, 100),
    default=None,
    help="UDP loss (percent, each way) of the lossy StratumRM run; 0 skips it [default: 2].",
)
@click.option(
    "--lone-seconds",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Measured seconds of the lone-share closed loop [default: 5].",
)
@click.option(
    "--closed-seconds",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Measured seconds of the rigs x 4 in flight closed loop [default: 3].",
)
@click.option("--search/--no-search", default=None, help="Also search the highest open-loop rate with zero loss [default: on].")
@click.option(
    "--pair-only",
    is_flag=True,
    default=None,
    help="Measure only the stunnel pair and StratumRM (throughput and CPU per share side by side).",
)
def transport_command(
    quick: bool, runs: int | None, keep_logs: Path | None, verbose_logs: bool, profile: bool, **overrides: Any
) -> None:
    """Direct, SV1 relay, SV1 in TLS and StratumRM: bytes, latency, throughput, CPU per share."""
    logs = LogOptions(keep_logs, verbose_logs, profile)
    logs.check()
    settings = _transport_settings(quick, runs, **overrides)
    click.echo(_transport_report(settings, logs, _progress_printer()))


@bench.command("farm")
@_common_options
@click.option("--miners", type=click.IntRange(1), default=None, help="Miners behind the proxy [default: 500].")
@click.option("--time-scale", type=click.FloatRange(min=1), default=None, help="How much faster than real time [default: 10].")
@click.option("--seconds", type=click.FloatRange(min=0.5), default=None, help="Measured seconds per variant [default: 60].")
def farm_command(
    quick: bool, runs: int | None, keep_logs: Path | None, verbose_logs: bool, profile: bool, **overrides: Any
) -> None:
    """Bytes per miner per hour: a farm behind StratumRM against SV1 and SV1 in TLS."""
    logs = LogOptions(keep_logs, verbose_logs, profile)
    logs.check()
    settings = _farm_settings(quick, runs, **overrides)
    click.echo(_farm_report(settings, logs, _progress_printer()))


@bench.command("handshake")
@click.option(
    "--repeats", type=click.IntRange(1), default=200, show_default=True, help="Full and resumed handshakes per key type."
)
def handshake_command(repeats: int) -> None:
    """Control-channel TLS 1.3 handshake: full versus resumed (P-256, Ed25519)."""
    from bridge.bench import handshake

    click.echo(handshake.report(handshake.run(repeats)))


def _register_failover() -> None:
    from bridge.bench import failover

    bench.add_command(failover.command)


_register_failover()


def _register_flood() -> None:
    from bridge.bench import flood, pending

    bench.add_command(flood.command)
    bench.add_command(pending.command)


_register_flood()


@bench.command("loss")
@click.option("--quick", is_flag=True, help="One short run (40 shares per path): checks that it all works.")
@click.option("--runs", type=click.IntRange(1), default=None, help="Runs to take medians over [default: 3; 1 with --quick].")
@click.option("--loss", type=click.FloatRange(0, 100), default=None, help="Percent of packets dropped each way [default: 2].")
@click.option("--delay-ms", type=click.FloatRange(min=0), default=None, help="One-way delay [default: 10].")
@click.option("--jitter-ms", type=click.FloatRange(min=0), default=None, help="Delay varies by up to this [default: 0].")
@click.option("--shares", type=click.IntRange(1), default=None, help="Measured lone shares per path and run [default: 400].")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Unmeasured shares first [default: 50].")
@click.option("--seed", type=int, default=None, help="Seed of the link's random streams [default: random].")
@click.option(
    "--keep-logs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the logs of the benchmark's processes in this directory.",
)
def loss_command(quick: bool, runs: int | None, keep_logs: Path | None, **overrides: Any) -> None:
    """Lone shares through a real lossy link (TUN, two namespaces): SV1 over TLS against StratumRM (needs root)."""
    from bridge.bench import loss

    base = loss.LossSettings.quick() if quick else loss.LossSettings()
    settings = loss.with_overrides(base, runs=runs, **overrides)
    progress = _progress_printer()

    click.echo(loss.report(settings, _run(lambda: loss.run(settings, progress, keep_logs))))


def _register_scale() -> None:
    from bridge.bench import scale

    bench.add_command(scale.command)


_register_scale()


@bench.command("all")
@_common_options
def all_benchmarks(quick: bool, runs: int | None, keep_logs: Path | None, verbose_logs: bool, profile: bool) -> None:
    """Every benchmark in one run; the tables are printed at the end."""
    logs = LogOptions(keep_logs, verbose_logs, profile)
    logs.check()
    iterations, repeats = (QUICK_CODEC_ITERATIONS, QUICK_CODEC_REPEATS) if quick else (50_000, 7)
    progress = _progress_printer()
    progress(f"[codec] {repeats} runs of {iterations} messages")
    codec_text = _codec_report(iterations, repeats)
    transport_text = _transport_report(_transport_settings(quick, runs), logs, progress)
    farm_text = _farm_report(_farm_settings(quick, runs), logs, progress)
    from bridge.bench import handshake

    progress("[handshake] full versus resumed TLS 1.3")
    handshake_text = handshake.report(handshake.run(20 if quick else 200))
    from bridge.bench import failover

    progress("[failover] 100 rigs, RST and blackhole")
    failover_text = failover.report(failover.run(100, runs=1 if quick else runs or 3))
    click.echo(f"{codec_text}\n\n{transport_text}\n\n{farm_text}\n\n{handshake_text}\n\n{failover_text}")
