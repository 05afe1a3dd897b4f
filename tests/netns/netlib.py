"""Network namespaces for the deployment tests: namespaces, veth links, processes, state files.

Names carry this process's pid and a random tag, so several test sessions on one
machine never collide. Everything created is removed on exit, processes first.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.testing.tun_link import namespaces_unavailable

ROOT = Path(__file__).resolve().parents[2]


def unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    return namespaces_unavailable("network namespace tests")


def missing(*programs: str) -> str | None:
    absent = [p for p in programs if shutil.which(p) is None]
    if absent:
        return f"{', '.join(absent)} not installed; run tests/setup-system.sh (apt-get install -y haproxy nftables iproute2)"
    return None


def run(*args: str) -> str:
    result = subprocess.run(list(args), check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


class Lab:
    """Namespaces, links between them and the processes inside, torn down by :meth:`close`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self._links = 0

    def namespace(self, role: str) -> str:
        name = f"srm-{role}-{self.tag}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def link(self, a: str, address_a: str, b: str, address_b: str) -> None:
        """A veth pair between namespaces a and b with these CIDR addresses."""
        self._links += 1
        left, right = f"v{self.tag}{self._links}a", f"v{self.tag}{self._links}b"
        run("ip", "link", "add", left, "type", "veth", "peer", "name", right)
        run("ip", "link", "set", left, "netns", a)
        run("ip", "link", "set", right, "netns", b)
        for namespace, device, address in ((a, left, address_a), (b, right, address_b)):
            run("ip", "-n", namespace, "addr", "add", address, "dev", device)
            run("ip", "-n", namespace, "link", "set", device, "up")

    def route(self, namespace: str, destination: str, via: str) -> None:
        run("ip", "-n", namespace, "route", "add", destination, "via", via)

    def exec(self, namespace: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(["ip", "netns", "exec", namespace, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        process.log_name = name  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def python(self, namespace: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.exec(namespace, name, sys.executable, *args)

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, lab: Lab | None = None, step: float = 0.1) -> Any:
    """Poll ``condition`` until it is truthy; fail with ``what`` (and the logs' tails) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = ""
            if lab is not None:
                for process in lab.processes:
                    name = getattr(process, "log_name", "?")
                    tails += f"\n--- {name} (exit {process.poll()}) ---\n" + "\n".join(lab.log(name).splitlines()[-15:])
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{tails}")
        time.sleep(step)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
