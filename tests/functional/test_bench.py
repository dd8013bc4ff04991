"""Smoke runs of every benchmark (the smallest size each takes, on the session's releases): a benchmark that
nobody runs rots, and a change that breaks one is a broken change. Figures are printed by the benchmarks,
never asserted here; only that each runs to its table (printed after the run, so the figures land in the CI
log). bench_verify's smoke run is in test_workloads.py (it needs the pgweb releases).

bench_vm's smoke run boots TCG guests and runs in the VM phase (marker vm, tests/conftest.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imageupdate.build.cache import DEFAULT_CACHE
from tests.conftest import after_the_run

pytestmark = pytest.mark.functional

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
    after_the_run(f"{name} {' '.join(args)}", proc.stdout)
    return proc.stdout


def test_bench_site_runs(releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    out = bench("bench_site.py", "--store", str(store_dir), "--nodes", "1", "--big", "2")
    assert "swap R1->R2 per node" in out and "site up, 2 nodes" in out, out


def test_bench_upgrade_runs(upgrade_releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    out = bench("bench_upgrade.py", "--store", str(store_dir), "--nodes", "1", "--state-mb", "1")
    assert "skip-level < sum of single-release rollouts" in out, out


def test_bench_rollout_runs(upgrade_releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    # one measured rollout per site: R2 -> R3 stands in for the twin R2b (no build)
    out = bench("bench_rollout.py", "--store", str(store_dir), "--nodes", "2", "--batch-sizes", "1", "--twin", "R3")
    assert "scale: what a node step costs" in out and "Heat RSS at most 300 MiB" in out, out


def test_bench_build_runs(releases: dict) -> None:  # type: ignore[type-arg]
    # the session's builds filled the DIB cache: one warm build beside one plain disk-image-create
    out = bench("bench_build.py", "--cache", str(DEFAULT_CACHE), "--rounds", "1")
    assert "imageupdate overhead over plain disk-image-create" in out, out


def test_bench_soak_runs(releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    out = bench("bench_soak.py", "--store", str(store_dir), "--trials", "1", "--seed", "1")
    assert "trials" in out, out


def test_bench_vm_runs(machine_releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    out = bench("bench_vm.py", "--store", str(store_dir), "--nodes", "1", "--skip-builds")
    assert "rebuild M1->M2 to healthy" in out, out


def test_bench_cloud_runs(releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    out = bench("bench_cloud.py", "--store", str(store_dir), "--nodes", "1")
    assert "orchestration per node" in out, out
