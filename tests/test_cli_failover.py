"""stratumrm proxy with a primary and a backup pool, as a user runs them: real processes, a real kill."""

from __future__ import annotations

import signal
import subprocess

from processes import STRATUMRM, free_port, wait_for_port


def test_the_proxy_moves_a_rig_to_the_backup_when_the_primary_process_dies() -> None:
    primary_port, backup_port, proxy_port = free_port(), free_port(), free_port()
    pools = [
        subprocess.Popen(
            [*STRATUMRM, "testpool", "--listen", f"127.0.0.1:{port}", "--difficulty", "0.000004"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in (primary_port, backup_port)
    ]
    # The pools listen before the proxy starts: a probe refused by a primary still starting
    # would mark it failed, put the rig on the backup and hold it there for the hold-down.
    try:
        for port in (primary_port, backup_port):
            wait_for_port(port)
    except AssertionError:
        for pool in pools:
            pool.kill()
        raise
    proxy = subprocess.Popen(
        [
            *STRATUMRM,
            "proxy",
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "-o",
            f"stratum+tcp://127.0.0.1:{primary_port}#name=primary",
            "--backup",
            f"stratum+tcp://127.0.0.1:{backup_port}#name=backup",
            "--silence-timeout",
            "2",
            "--hold-down",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    miner = None
    try:
        wait_for_port(proxy_port)
        miner = subprocess.Popen(
            [
                *STRATUMRM,
                "testminer",
                "--url",
                f"stratum+tcp://127.0.0.1:{proxy_port}#xnsub",
                "--user",
                "alice.rig1",
                "--profile",
                "bmminer",
                "--max-shares",
                "8",
                # ~4.6 shares/s (17k hashes a share), as 400 kH/s at 0.00002, for a fifth of the hashing
                "--hashrate",
                "80000",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert miner.stdout is not None
        lines = []
        for line in miner.stdout:
            lines.append(line)
            if sum("Accepted" in seen for seen in lines) >= 2 and pools[0].poll() is None:
                pools[0].send_signal(signal.SIGKILL)  # the primary pool process dies
                pools[0].wait(timeout=10)
        assert miner.wait(timeout=60) == 0, "".join(lines)
        output = "".join(lines)
        total = next(line for line in lines if line.startswith("total")).split()
        submitted, accepted, rejected, unanswered = (int(x) for x in total[1:5])
        # Every share answered. Shares in flight at the kill, or found on the dead pool's job
        # before the backup's first job arrives, are answered honestly as not confirmed or
        # stale (how many depends on the rig's share rate and the machine's load); the rig
        # then mines on at the backup: more shares accepted after the two before the kill.
        assert submitted == 8 and unanswered == 0 and accepted + rejected == 8, output
        refusals = [line for line in lines if "Rejected" in line]
        assert all("previous upstream pool" in line or "not confirmed" in line for line in refusals), output
        assert accepted >= 3, output
    finally:
        for process in (miner, proxy, *pools):
            if process is not None and process.poll() is None:
                process.terminate()
        proxy_log = proxy.communicate(timeout=10)[0]
        for pool in pools:
            pool.wait(timeout=10)
    assert "upstream primary is down: connection lost" in proxy_log, proxy_log
    assert "failover: moving 1 rig(s) to backup" in proxy_log, proxy_log
