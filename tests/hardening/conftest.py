"""Fixtures for the hardening tests: the roles running on a thread (:mod:`hardening_stack`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hardening_stack import Stack

from bridge.testing.pki import make_test_pki


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pki = make_test_pki(Path(tmp_path_factory.mktemp("pki")), accounts=("honest",))
    roles = Stack(pki)
    roles.start()
    roles.honest_shares_still_accepted()
    try:
        yield roles
    finally:
        roles.stop()
