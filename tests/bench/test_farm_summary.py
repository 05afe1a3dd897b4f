"""``stratumrm bench farm``: the summary's ratio is per run, against the TLS variant of the same run."""

from __future__ import annotations

import random

import pytest
import trio

from bridge.bench import farm
from bridge.bench.load import LoadGenerator
from bridge.bench.measure import LinkTraffic


def _window(variant: str, total: int, shares: int = 1000) -> farm.FarmWindow:
    return farm.FarmWindow(
        variant=variant,
        tcp_traffic=LinkTraffic(payload_up=total // 2, payload_down=total - total // 2),
        udp_traffic=LinkTraffic(),
        shares=shares,
        jobs=20,
        blocks=1,
        accepted=shares,
        rejected=0,
        results_lines=0,
        job_lines=40,
        verdict_datagrams=shares // 2,
    )


def test_the_target_is_the_median_of_per_run_ratios_to_tls_of_the_same_run() -> None:
    settings = farm.FarmSettings(runs=3)
    # The TLS baseline moves between runs; each StratumRM run is compared with its own.
    runs = [
        {
            farm.SV1: _window(farm.SV1, 9000),
            farm.SV1_TLS: _window(farm.SV1_TLS, 10_000),
            farm.STRATUMRM: _window(farm.STRATUMRM, 1000),
        },
        {
            farm.SV1: _window(farm.SV1, 18_000),
            farm.SV1_TLS: _window(farm.SV1_TLS, 20_000),
            farm.STRATUMRM: _window(farm.STRATUMRM, 3000),
        },
        {
            farm.SV1: _window(farm.SV1, 4500),
            farm.SV1_TLS: _window(farm.SV1_TLS, 5000),
            farm.STRATUMRM: _window(farm.STRATUMRM, 1500),
        },
    ]
    summary = farm.summarize(settings, runs)
    assert summary.ratios_to_tls == pytest.approx([0.1, 0.15, 0.3])
    assert summary.ratio_to_tls == pytest.approx(0.15)
    text = farm.report(summary)
    assert "median 0.150x (runs: 0.100, 0.150, 0.300) -> met" in text
    assert "10 farm minutes" in text
    assert "2.00 verdicts per VERDICT datagram" in text


class _Miner:
    def __init__(self) -> None:
        self.submitted: list[int] = []
        self.has_output = False

    def submit(self, serial: int) -> None:
        self.submitted.append(serial)


class _Connection:
    def __init__(self) -> None:
        self.miner = _Miner()

    async def flush(self) -> None:
        pass


def test_random_offer_spreads_shares_over_every_rig_at_the_offered_rate() -> None:
    async def main() -> tuple[int, list[int]]:
        load = LoadGenerator(iter(range(1, 1 << 30)))
        rigs = [_Connection() for _ in range(20)]
        result = await load.offer(2000.0, 0.5, rigs, randomly=random.Random(1))  # type: ignore[arg-type]
        return result.sent, [len(r.miner.submitted) for r in rigs]

    # The moments are drawn from the seed, so the count does not depend on the machine.
    sent, per_rig = trio.run(main)
    assert sent == sum(per_rig)
    assert 850 < sent < 1150  # a Poisson process of 2000/s over 0.5 s
    assert min(per_rig) > 20 and max(per_rig) < 90  # every rig submits, at random moments
