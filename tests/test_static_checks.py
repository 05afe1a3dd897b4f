"""The static checks pass on the tree: ruff (lint and format), mypy strict on the
sans-IO packages, and the import contracts. Their configuration is in pyproject.toml;
.pre-commit-config.yaml runs the same commands before a commit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def tool(name: str) -> str:
    """The console script installed with the test extras, next to this Python first."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: run python3 -m pip install -e '.[test]'"
    return found


def test_ruff_finds_nothing() -> None:
    done = run(sys.executable, "-m", "ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_tree_is_formatted() -> None:
    done = run(sys.executable, "-m", "ruff", "format", "--check", "--no-cache", ".")
    assert done.returncode == 0, "run: ruff format .\n" + done.stdout + done.stderr


def test_the_sans_io_packages_type_check_strictly() -> None:
    done = run(sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", "/dev/null")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_import_contracts_hold() -> None:
    done = run(tool("lint-imports"), "--no-cache")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("check", ["ruff check", "ruff format", "mypy", "lint-imports"])
def test_pre_commit_runs_the_same_checks(check: str) -> None:
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    assert f"entry: {check}" in config
