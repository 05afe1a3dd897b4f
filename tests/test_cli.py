"""The command line as a user runs it: real processes, real sockets."""

from __future__ import annotations

import subprocess

import pytest
from processes import STRATUMRM, free_port, wait_for_port


def test_help_lists_every_command() -> None:
    out = subprocess.run([*STRATUMRM, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("proxy", "sidecar", "demo", "bench", "status", "testpool", "testminer", "pki"):
        assert command in out


def test_python_m_bridge_cli_runs_the_command_line_too() -> None:
    out = subprocess.run(
        [STRATUMRM[0], "-m", "bridge.cli", "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "sidecar" in out and "proxy" in out


def test_demo_runs_the_chain_and_reports_a_clean_tally() -> None:
    # A tenth of the default difficulty: shares from every profile within the 1.5 s
    done = subprocess.run(
        [*STRATUMRM, "demo", "--duration", "1.5", "--difficulty", "0.00001"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tally OK" in done.stdout and "shares submitted" in done.stdout
    for profile in ("cgminer", "cpuminer", "bfgminer", "bmminer", "bitaxe"):
        assert profile in done.stdout


def test_bench_prints_microseconds_per_message() -> None:
    done = subprocess.run(
        [*STRATUMRM, "bench", "codec", "--iterations", "2000", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "submit codec" in done.stdout and "notify relay" in done.stdout


def test_proxy_testpool_and_testminer_as_separate_processes() -> None:
    pool_port, proxy_port = free_port(), free_port()
    pool = subprocess.Popen(
        [*STRATUMRM, "testpool", "--listen", f"127.0.0.1:{pool_port}", "--difficulty", "0.000002"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proxy = subprocess.Popen(
        [*STRATUMRM, "proxy", "--listen", f"127.0.0.1:{proxy_port}", "--upstream", f"stratum+tcp://127.0.0.1:{pool_port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(pool_port)
        wait_for_port(proxy_port)
        miner = subprocess.run(
            [
                *STRATUMRM,
                "testminer",
                "--url",
                f"stratum+tcp://127.0.0.1:{proxy_port}",
                "--user",
                "alice.rig1",
                "--profile",
                "cgminer",
                "--max-shares",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert miner.returncode == 0, miner.stdout + miner.stderr
        assert miner.stdout.count("Accepted") >= 2
    finally:
        for process in (proxy, pool):
            process.terminate()
        proxy_log = proxy.communicate(timeout=10)[0]
        pool_log = pool.communicate(timeout=10)[0]
    assert "proxy listening" in proxy_log and "alice.rig1" in proxy_log + pool_log


@pytest.mark.parametrize(
    "args, message",
    [
        (["proxy", "--upstream", "pool:3333"], "no scheme"),
        (["proxy", "--upstream", "http://pool:3333"], "unknown scheme"),
        (["proxy", "--upstream", "stratum+tcp://pool"], "needs a host and a port"),
    ],
)
def test_bad_upstream_urls_say_what_to_write(args, message) -> None:
    done = subprocess.run(STRATUMRM + args, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0 and message in done.stderr
