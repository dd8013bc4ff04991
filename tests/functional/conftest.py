"""Functional tests need root; the releases and the CLI helpers they use live in ``tests/conftest.py``
(shared with ``tests/faults``) and are re-exported here for the modules that import them from this one."""
from __future__ import annotations

import os

import pytest

from tests.conftest import (  # noqa: F401 - re-exported
    build_all,
    imageupdate,
    live_processes_mentioning,
    mounts_mentioning,
)

pytestmark = pytest.mark.functional


@pytest.fixture(scope="session", autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("functional tests build real images and need root")
