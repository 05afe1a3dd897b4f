"""The management port and ``stratumrm ping`` as an operator runs them: real processes."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from processes import STRATUMRM, free_port, wait_for_port


def get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_proxy_config_http_listen_serves_metrics_status_and_ping_times_the_pool(tmp_path: Path) -> None:
    pool_port, proxy_port, http_port = free_port(), free_port(), free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:{proxy_port}"\nhttp_listen = "127.0.0.1:{http_port}"\nmetrics_per_worker = true\n'
        f'[[upstream]]\nurl = "stratum+tcp://127.0.0.1:{pool_port}"\n'
    )
    pool = subprocess.Popen(
        [*STRATUMRM, "testpool", "--listen", f"127.0.0.1:{pool_port}", "--difficulty", "0.000002"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proxy = subprocess.Popen(
        [*STRATUMRM, "proxy", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pinging = None
    try:
        for port in (pool_port, proxy_port, http_port):
            wait_for_port(port, timeout=30)
        # ping times the pool on its own connection, beside the rig (one Python start-up fewer to wait for)
        pinging = subprocess.Popen(
            [*STRATUMRM, "ping", f"stratum+tcp://127.0.0.1:{pool_port}", "-c", "2", "-i", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
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
        _status, body = get(f"http://127.0.0.1:{http_port}/metrics")
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }
        assert samples[("stratumrm_shares_accepted_total", ())] >= 2
        assert samples[("stratumrm_shares_submitted_total", ())] >= 2
        assert ("stratumrm_worker_series_dropped", ()) in samples  # per-worker series on, from the file
        assert get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200
        shown = subprocess.run(
            [*STRATUMRM, "status", "--url", f"http://127.0.0.1:{http_port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert shown.returncode == 0 and shown.stdout.startswith("proxy (stratumrm"), shown.stdout + shown.stderr
        ping_out, ping_err = pinging.communicate(timeout=60)
        assert pinging.returncode == 0, ping_out + ping_err
        assert "2 attempts, 2 answered, 0% failed" in ping_out
    finally:
        for process in (proxy, pool, pinging):
            if process is not None and process.poll() is None:
                process.terminate()
        proxy_log = proxy.communicate(timeout=10)[0]
        pool.communicate(timeout=10)
    assert f"proxy management on http://127.0.0.1:{http_port}/" in proxy_log
