"""Smoke runs of the benchmarks (the smallest size each takes, on the session's releases): a benchmark that
nobody runs rots, and a change that breaks one is a broken change. Figures are printed by the benchmarks,
never asserted here; only that each runs to its table. bench_verify's smoke run is in test_workloads.py.
Not run here, for CI's hour: bench_build (two more builds), bench_cloud (a second control plane), bench_vm
(VM boots under TCG), bench_rollout (builds R2b) and bench_soak (a soak); run them by hand (see bench/)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.functional

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
    return proc.stdout


def test_bench_site_runs(releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    out = bench("bench_site.py", "--store", str(store_dir), "--nodes", "1", "--big", "2")
    assert "swap R1->R2 per node" in out and "site up, 2 nodes" in out, out


def test_bench_upgrade_runs(upgrade_releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    out = bench("bench_upgrade.py", "--store", str(store_dir), "--nodes", "1", "--state-mb", "1")
    assert "skip-level < sum of single-release rollouts" in out, out
