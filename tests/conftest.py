"""Suite-wide options: the opt-in slow tier and the fault-injection tally table.

``python3 -m pytest`` runs the default tier (every test must be bounded and
must not depend on how loaded the machine is); ``--run-slow`` adds the tests
marked ``@pytest.mark.slow`` (soaks, many seeds, the full benchmark run).
Every test has a per-test timeout (``timeout`` in pyproject.toml, from
pytest-timeout), so a hang fails with the test's name and a stack dump.

Tests that need time to pass without waiting for it take pytest-trio's
``autojump_clock`` fixture (``trio.testing.MockClock(autojump_threshold=0)``):
whenever every task is blocked, the clock jumps to the next deadline, so a
30 s blackhole costs no real 30 s. The fault-injection tests
(:mod:`bridge.testing.faults`) record one tally row per scenario and seed with
the ``fault_tally`` fixture; the rows are printed as a markdown table at the
end of the run.
"""

from __future__ import annotations

import hypothesis
import pytest

from bridge.testing.faults import Tally, tally_table

_TALLY_ROWS = pytest.StashKey[list[Tally]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the slow tier (tests marked @pytest.mark.slow: soaks, many seeds, full benchmarks)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TALLY_ROWS] = []
    if config.getoption("--run-slow"):
        # Property tests that leave the number of examples to the profile (hypothesis's
        # default is 100) try ten times as many in the slow tier.
        hypothesis.settings.register_profile("slow", max_examples=1000)
        hypothesis.settings.load_profile("slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow tier: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fault_tally(request: pytest.FixtureRequest):
    """Record a fault scenario's :class:`~bridge.testing.faults.Tally` for the end-of-run table."""
    rows = request.config.stash[_TALLY_ROWS]
    return rows.append


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(_TALLY_ROWS, [])
    if not rows:
        return
    terminalreporter.section("fault injection tally")
    for line in tally_table(rows).splitlines():
        terminalreporter.write_line(line)
