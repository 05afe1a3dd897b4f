"""Shared setup of the namespace tests: skip with the reason when they cannot run, the PKI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.netlib import ROOT, missing, unavailable


@pytest.fixture(scope="session")
def netns_reason() -> str | None:
    return unavailable()


#: The sidecars' addresses in the namespace tests (test_balancer's pool namespace, test_gateway's).
SIDECAR_IPS = ("10.213.0.1", "10.214.2.2")


@pytest.fixture(scope="session")
def netns_pki(netns_reason, tmp_path_factory) -> Path:
    """Made once by ``stratumrm pki`` for every namespace test (each copies it): one sidecar
    certificate naming every sidecar address in :data:`SIDECAR_IPS`."""
    require(netns_reason)
    directory = tmp_path_factory.mktemp("netns-pki") / "pki"
    make_pki(directory, *SIDECAR_IPS)
    return directory


def make_pki(directory: Path, *sidecar_ips: str) -> dict[str, Path]:
    """The operator's CA, one sidecar certificate (shared by every sidecar) and a farm bundle."""

    def pki(*args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "bridge", "pki", "--dir", str(directory), *args],
            check=True,
            capture_output=True,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )

    pki("init")
    pki("issue-pool", "sidecar", *(option for ip in sidecar_ips for option in ("--ip", ip)))
    pki("issue-miner", "farm1", "--account", "alice")
    return pki_files(directory)


def copy_pki(source: Path, directory: Path) -> dict[str, Path]:
    """A copy of a directory :func:`make_pki` wrote: each test's roles get their own files."""
    shutil.copytree(source, directory)
    return pki_files(directory)


def pki_files(directory: Path) -> dict[str, Path]:
    files = {
        "cert": directory / "pools" / "sidecar.pem",
        "key": directory / "pools" / "sidecar.key",
        "ca": directory / "ca.pem",
        "revocations": directory / "revocations.pem",
        "bundle": directory / "miners" / "farm1.bundle.pem",
    }
    for name, path in files.items():
        assert path.exists(), f"stratumrm pki did not write the {name} file {path}"
    return files


def require(netns_reason: str | None, *programs: str) -> None:
    reason = netns_reason or missing(*programs)
    if reason:
        pytest.skip(reason)
