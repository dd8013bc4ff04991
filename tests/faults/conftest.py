"""The fault matrix: root only; its sites; the table of trials, written to a file and printed at the end.

Each trial adds its row (step, fault, what was run after, outcome) through the ``matrix`` fixture, pass or
fail; the table is printed after the run (CI logs keep it) with where the file is.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import after_the_run, live_processes_mentioning
from tests.faults.faultlib import Baseline, Site, kill_strays, set_up, table

pytestmark = pytest.mark.functional

ROWS: list[tuple[str, ...]] = []
WRITTEN: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("fault tests run real sites, Heat and images and need root")


class Matrix:
    """The table of trials as it is filled in: in memory for the summary, and in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, row: tuple[str, ...]) -> None:
        ROWS.append(row)
        self.path.write_text("\n".join(table(ROWS)) + "\n")


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    path = tmp_path_factory.mktemp("faults") / "matrix.md"
    WRITTEN.append(path)
    return Matrix(path)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The table, printed after the run (``after_the_run``)."""
    if ROWS:
        after_the_run(f"fault matrix: {len(ROWS)} trials",
                      "\n".join([*table(ROWS), *(f"(also in {p})" for p in WRITTEN[:1])]))


def _site(path: Path, store: Path, forward: str | None) -> Iterator[tuple[Site, Baseline]]:
    site = Site(path, store)
    try:
        baseline = set_up(site, nodes=2, forward=forward)
        yield site, baseline
    finally:
        kill_strays(site)  # the trial that left one failed on it; the next ones start clean
        site.destroy()
        left = live_processes_mentioning(str(path))
        assert not left, left
        assert not path.exists(), f"{path} not removed"


@pytest.fixture(scope="module")
def fault_site(releases: dict, store_dir: Path,  # type: ignore[type-arg]
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Baseline]]:
    """One 2-node site for the whole R1 <-> R2 matrix, with data on each node; left on R2 by a clean rollout
    (the baseline of each node's state on R1 and on R2 is taken on the way)."""
    yield from _site(tmp_path_factory.mktemp("fault-site") / "site", store_dir, forward="R2")


@pytest.fixture(scope="module")
def upgrade_site(upgrade_releases: dict, store_dir: Path,  # type: ignore[type-arg]
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Baseline]]:
    """A 2-node site on R1 with data on each node, for the R1 -> R4 trials (which all end back on R1)."""
    yield from _site(tmp_path_factory.mktemp("upgrade-site") / "site", store_dir, forward=None)

