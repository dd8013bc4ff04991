from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageupdate.site import procs

pytestmark = pytest.mark.functional


def imageupdate(*args: str, env: dict[str, str] | None = None, check: bool = False,
                timeout: int = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "imageupdate", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"imageupdate {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def live_processes_mentioning(*needles: str) -> list[str]:
    """Live (non-zombie) processes whose command line contains any of ``needles``."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles) and procs.alive(int(p.name)):
            found.append(f"process {p.name}: {cmd[:120]}")
    return found


def mounts_mentioning(path: Path) -> list[str]:
    return [f"mount {m}" for m in Path("/proc/mounts").read_text().splitlines() if str(path) in m]


@pytest.fixture(scope="session", autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("functional tests build real images and need root")


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


def build_all(store_dir: Path, *pairs: tuple[str, str]) -> dict[str, dict]:  # type: ignore[type-arg]
    """Build each (release, element) with the real disk-image-create; each build's JSON result by release."""
    return {release: json.loads(imageupdate("build", release, "-e", element, "--store", str(store_dir), "--json",
                                            check=True).stdout)
            for release, element in pairs}


@pytest.fixture(scope="session")
def releases(store_dir: Path) -> Iterator[dict[str, dict]]:  # type: ignore[type-arg]
    """R1, R2 and the broken release, built once with the real disk-image-create."""
    yield build_all(store_dir, ("R1", "sample-workload-v1"), ("R2", "sample-workload-v2"),
                    ("R-broken", "sample-workload-broken"))


@pytest.fixture(scope="session")
def upgrade_releases(releases: dict, store_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """R3, R4 and R4-badmig (R4 with a contract migration that fails half way) on top of R1 and R2."""
    return build_all(store_dir, ("R3", "sample-workload-v3"), ("R4", "sample-workload-v4"),
                     ("R4-badmig", "sample-workload-broken-migration"))


@pytest.fixture(scope="session")
def gate_releases(releases: dict, store_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """Releases the built-in checks alone must stop (both at R2's state version): R-500 answers HTTP 500
    to everything and ships no tests; R-stale runs code from /tmp, /mnt/state and a deleted /dev/shm library."""
    return build_all(store_dir, ("R-500", "sample-workload-http500"), ("R-stale", "sample-workload-stale"))


@pytest.fixture(scope="session")
def pg_releases(store_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """The database workload (PostgreSQL 15 from Debian, an app behind nginx): PG1, PG2 (expand migration),
    PG3 (contract migration) and PG2-rerun (PG2 whose migration inserts a row on every run)."""
    return build_all(store_dir, ("PG1", "pgweb-v1"), ("PG2", "pgweb-v2"), ("PG3", "pgweb-v3"),
                     ("PG2-rerun", "pgweb-rerun-insert"))
