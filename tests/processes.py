"""Helpers for tests that run stratumrm as real processes."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time

STRATUMRM = [sys.executable, "-m", "bridge"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


class LoggedProcess:
    """A stratumrm process whose log lines are collected as they come."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(STRATUMRM + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, *needles: str, timeout: float = 60.0) -> str:
        """The first line containing every needle (waits for it, generously)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if all(needle in line for needle in needles):
                    return line
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line with {needles} in:\n" + "\n".join(self.lines)
            try:
                self.lines.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                pass

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return "\n".join(self.lines)
