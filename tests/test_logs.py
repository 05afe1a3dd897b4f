"""Logs and errors for people: one set-up, connection ids, JSON, repeat limits, plain error words."""

from __future__ import annotations

import io
import json
import logging
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import trio
from processes import STRATUMRM, free_port, wait_for_port

from bridge import logs
from bridge.net.miner_proxy import explain_authorize_refusal
from bridge.net.tcp import describe_error
from bridge.runtime import describe_bind_problem


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """logs.setup() changes the root logger: give the next tests pytest's set-up back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in ("hpack", "hypercorn.access", "trio_websocket", "asyncio")}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in libraries.items():
        logging.getLogger(name).setLevel(old)


def _record(message: str, *args, level: int = logging.WARNING, name: str = "bridge.sidecar") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_repeats_of_one_template_are_limited_and_summed_up() -> None:
    now = [0.0]
    limiter = logs.RepeatFilter(window=60.0, burst=5, clock=lambda: now[0])
    template = "TLS handshake with %s failed: %s"
    passed = [limiter.filter(_record(template, f"203.0.113.{n}", "garbage")) for n in range(50)]
    assert passed == [True] * 5 + [False] * 45
    assert limiter.filter(_record("another message"))  # other templates are not affected
    assert limiter.filter(_record(template, "x", "y", level=logging.DEBUG))  # debug is never limited
    now[0] = 61.0
    record = _record(template, "203.0.113.99", "garbage")
    assert limiter.filter(record)
    assert "repeated 45 more times in the last 60 s" in record.getMessage()
    now[0] = 200.0
    quiet = _record(template, "203.0.113.100", "garbage")
    assert limiter.filter(quiet) and "repeated" not in quiet.getMessage()


async def test_connection_ids_follow_a_task_and_its_children_in_json() -> None:
    stream = io.StringIO()
    logs.setup(0, log_format="json", stream=stream)
    log = logging.getLogger("bridge.test")

    async def child() -> None:
        log.info("child line")

    async def connection(kind: str) -> None:
        ident = logs.bind_connection(kind)
        log.info("serving %s", ident)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection, "rig")
        nursery.start_soon(connection, "proxy")
    log.info("no connection here")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_conn: dict[str | None, list[str]] = {}
    for line in lines:
        assert set(line) >= {"ts", "level", "logger", "msg"} and line["level"] == "info"
        by_conn.setdefault(line.get("conn"), []).append(line["msg"])
    rig = next(key for key in by_conn if key and key.startswith("rig-"))
    proxy = next(key for key in by_conn if key and key.startswith("proxy-"))
    assert by_conn[rig] == [f"serving {rig}", "child line"]
    assert by_conn[proxy] == [f"serving {proxy}", "child line"]
    assert by_conn[None] == ["no connection here"]


def test_text_lines_carry_the_connection_id() -> None:
    stream = io.StringIO()
    logs.setup(0, stream=stream)
    record = _record("rig %s disconnected", "10.0.0.7:4000", level=logging.INFO, name="bridge.proxy")
    record.conn = "rig-17"
    logging.getLogger("bridge.proxy").handle(record)
    assert "INFO    bridge.proxy [rig-17] rig 10.0.0.7:4000 disconnected" in stream.getvalue()


def test_secrets_are_redacted() -> None:
    assert logs.redact("probe_password", "hunter2") == "***"
    assert logs.redact("token", "abc") == "***"
    assert logs.redact("probe_user", "farm.probe") == "farm.probe"


async def test_a_refused_connection_reads_connection_refused_once() -> None:
    port = free_port()
    with pytest.raises(OSError) as caught:
        await trio.open_tcp_stream("127.0.0.1", port)
    text = describe_error(caught.value)
    assert text.count("connection refused") == 1
    assert "all attempts" not in text and "sub-exception" not in text


def test_bind_problems_name_the_option_and_what_to_do() -> None:
    import errno

    in_use = describe_bind_problem("--listen", "0.0.0.0", 3333, OSError(errno.EADDRINUSE, "Address already in use"))
    assert in_use.startswith("--listen 0.0.0.0:3333:") and "already in use" in in_use
    elsewhere = describe_bind_problem("--status-listen", "192.0.2.1", 9100, OSError(errno.EADDRNOTAVAIL, "x"))
    assert "not an address of this machine" in elsewhere and elsewhere.startswith("--status-listen")
    privileged = describe_bind_problem("--listen", "0.0.0.0", 80, OSError(errno.EACCES, "x"))
    assert "CAP_NET_BIND_SERVICE" in privileged


def test_an_account_refusal_is_explained_at_the_proxy() -> None:
    error = json.dumps([24, "Unauthorized worker: this proxy's certificate does not cover account 'bob'", None])
    text = explain_authorize_refusal(error)
    assert "does not cover account 'bob'" in text and "stratumrm pki issue-miner" in text


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(STRATUMRM + args, capture_output=True, text=True, timeout=60, check=False)


def _one_line_usage_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_a_port_in_use_is_one_line_naming_the_option() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        pool = free_port()
        done = _run(["proxy", "--listen", f"127.0.0.1:{port}", "-o", f"stratum+tcp://127.0.0.1:{pool}"])
        _one_line_usage_error(done, f"--listen 127.0.0.1:{port}", "already in use")
        done = _run(
            [
                "proxy",
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--http-listen",
                f"127.0.0.1:{port}",
                "-o",
                f"stratum+tcp://127.0.0.1:{pool}",
            ]
        )
        _one_line_usage_error(done, "--http-listen", "already in use")


def test_an_address_of_another_machine_is_one_line() -> None:
    done = _run(["proxy", "--listen", "192.0.2.1:3333", "-o", "stratum+tcp://127.0.0.1:3333"])
    _one_line_usage_error(done, "--listen 192.0.2.1:3333", "not an address of this machine")


def test_a_host_name_that_does_not_resolve_is_one_line() -> None:
    try:
        socket.getaddrinfo("no-such-host.invalid", None)
    except socket.gaierror as exc:
        if exc.errno != socket.EAI_NONAME:
            pytest.skip(f"this machine's resolver cannot tell a missing name from a DNS outage ({exc})")
    done = _run(["proxy", "--listen", "no-such-host.invalid:3333", "-o", "stratum+tcp://127.0.0.1:3333"])
    _one_line_usage_error(done, "--listen", "does not resolve")
    done = _run(["proxy", "--listen", f"127.0.0.1:{free_port()}", "-o", "stratum+tcp://no-such-host.invalid:3333"])
    _one_line_usage_error(done, "--upstream", "no-such-host.invalid", "does not resolve")


def test_a_url_fragment_typo_is_refused_with_the_choices() -> None:
    done = _run(["proxy", "--listen", f"127.0.0.1:{free_port()}", "-o", "stratum+tcp://127.0.0.1:3333#xnusb"])
    _one_line_usage_error(done, "#xnusb", "did you mean #xnsub", "#priority=N")


def test_json_logs_with_connection_ids_and_a_shutting_down_line() -> None:
    port, pool = free_port(), free_port()
    process = subprocess.Popen(
        [*STRATUMRM, "proxy", "--listen", f"127.0.0.1:{port}", "-o", f"stratum+tcp://127.0.0.1:{pool}", "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
    reader.start()
    seen: list[dict] = []
    try:
        wait_for_port(port, timeout=30)  # a rig connection, closed at once
        while not any(str(line.get("conn", "")).startswith("rig-") and "disconnected" in line["msg"] for line in seen):
            seen.append(json.loads(lines.get(timeout=30)))
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=30)
    while not lines.empty():
        seen.append(json.loads(lines.get()))
    assert process.returncode == 0, seen
    assert all(set(line) >= {"ts", "level", "logger", "msg"} for line in seen)
    assert any(line["msg"] == "shutting down (SIGTERM): closing connections" for line in seen), seen
    assert seen[-1]["msg"] == "stopped"


def test_every_serving_command_takes_the_same_logging_options() -> None:
    from bridge.cli import _register_optional, cli

    _register_optional()
    for name in ("proxy", "sidecar"):
        options = {param.name: param for param in cli.commands[name].params}
        assert options["verbose"].count and "-v debug" in options["verbose"].help
        assert list(options["log_format"].type.choices) == ["text", "json"]
    assert sys.modules["bridge.logs"] is logs
