"""The protocol core does no I/O and reads no clock (architecture rule)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = ["sv1", "mining", "wire", "relay"]
#: sans-IO modules outside the core packages: the bounded map, the reference pool's core
CORE_MODULES = ["bounded.py", "testing/pool_core.py"]
ROOT = Path(__file__).parent.parent / "bridge"
FORBIDDEN_MODULES = {"trio", "socket", "ssl", "asyncio", "time", "select", "selectors"}


def core_files() -> list[Path]:
    return sorted([*(p for package in CORE for p in (ROOT / package).rglob("*.py")), *(ROOT / name for name in CORE_MODULES)])


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{path} imports {name}"
        for name in names:
            if name.startswith("bridge."):
                assert name.split(".")[1] not in {"net", "cli", "testing", "pki", "stats"}, (
                    f"{path} imports {name}: the core must not depend on drivers"
                )
    source = path.read_text()
    for clock in ("time.time(", "time.monotonic(", "datetime.now(", "perf_counter("):
        assert clock not in source, f"{path} reads the clock ({clock})"


def test_there_is_a_core_to_check() -> None:
    assert len(core_files()) >= 8
