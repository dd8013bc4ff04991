"""A real database workload on real local nodes (needs root): PostgreSQL 15 from Debian with an HTTP app
behind nginx (``elements/pgweb*``), rolled PG1 -> PG2 (expand) -> PG3 (contract) through a real Heat with
every built-in check and no workaround; the rehearsal judges its migrations by the release's state digest.

The tests share one 3-node site on PG1 and run in file order.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import after_the_run
from tests.functional.test_rollout import cli, fleet, query, releases_of, three_node_site
from tests.functional.test_site import ssh

pytestmark = pytest.mark.functional
BUILTIN = ("facts", "release", "services", "stale-code", "config", "filesystems", "state-version", "health")
SNAKEOIL = "/etc/ssl/private/ssl-cert-snakeoil.key"


@pytest.fixture(scope="module")
def site(pg_releases: dict, store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # type: ignore[type-arg]
    yield from three_node_site(tmp_path_factory.mktemp("pgweb") / "site", store_dir, "PG1")


def web(addr: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{addr}{path}", data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def addresses(site: Path, store: Path) -> dict[str, str]:
    return {n["name"]: n["address"] for n in fleet(site, store)["nodes"]}


def item_names(addr: str) -> set[str]:
    items = web(addr, "/items")
    return {i.get("name") or i.get("title") for i in (items["items"] if isinstance(items, dict) else items)}


def test_the_database_workload_comes_up_with_per_node_identity_and_passes_every_check(site: Path,
                                                                                      store_dir: Path) -> None:
    addrs = addresses(site, store_dir)
    proc = cli(site, store_dir, "check")
    assert proc.returncode == 0, proc.stdout[-3000:]
    for verdict in json.loads(proc.stdout)["nodes"]:
        ran = {c["name"]: c for c in verdict["checks"]}
        for name in BUILTIN:
            assert ran[name]["ok"], (verdict["node"], name, ran.get(name))
        # PostgreSQL maps SysV shared memory and renames its processes: neither is stale code or a dead service
        assert "postgresql" in ran["services"]["output"] and "nginx" in ran["services"]["output"]
    # the snakeoil key is per node, on the state partition, readable by ssl-cert only; the image has none
    keys = {n: ssh(site, a, "sha256sum", SNAKEOIL).stdout.split()[0] for n, a in addrs.items()}
    assert len(set(keys.values())) == 3, keys
    tree_key = site / "releases/PG1" / SNAKEOIL.lstrip("/")
    assert tree_key.is_symlink() and str(tree_key.readlink()).startswith("/mnt/state/")
    mode = ssh(site, addrs["node0"], shlex.join(["stat", "-L", "-c", "%a %U %G", SNAKEOIL])).stdout.split()
    assert mode == ["640", "root", "ssl-cert"], mode
    # each node its own cluster: its own system identifier
    query_id = shlex.join(["runuser", "-u", "postgres", "--", "psql", "-h", "/run/postgresql", "-Atc",
                           "SELECT system_identifier FROM pg_control_system()"])  # ssh hands one line to a shell
    ids = {ssh(site, a, query_id).stdout.strip() for a in addrs.values()}
    assert len(ids) == 3 and "" not in ids, ids


def test_the_rehearsal_judges_database_migrations_by_the_state_digest(site: Path, store_dir: Path) -> None:
    addrs = addresses(site, store_dir)
    for name, addr in addrs.items():
        for i in range(20):
            web(addr, "/items", {"name": f"{name}-row{i}"})
    good = cli(site, store_dir, "rehearse", "--to", "PG2", "--node", "node1")
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr
    report = json.loads(good.stdout)
    assert report["ok"] and [(s["migration"], s["idempotent"], s["digest"]) for s in report["steps"]] == [
        ("0002-add-note", True, "state-digest")], report["steps"]
    bad = cli(site, store_dir, "rehearse", "--to", "PG2-rerun", "--node", "node1")
    assert bad.returncode != 0
    said = json.loads(bad.stdout) if bad.stdout.strip().startswith("{") else {}
    text = bad.stdout + bad.stderr
    assert "is not idempotent" in text and "0002-add-note" in text, text[-2000:]
    assert said == {} or not said.get("ok")
    assert releases_of(site, store_dir) == {"node0": "PG1", "node1": "PG1", "node2": "PG1"}


def test_pg1_to_pg2_to_pg3_keeps_every_row_and_every_builtin_check_passes(site: Path, store_dir: Path) -> None:
    addrs = addresses(site, store_dir)
    before = {n: item_names(a) for n, a in addrs.items()}
    assert all(len(v) >= 20 for v in before.values()), before
    for target in ("PG2", "PG3"):
        proc = cli(site, store_dir, "rollout", target)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        out = json.loads(proc.stdout)
        assert out["status"] == "succeeded", out.get("reason")
        assert releases_of(site, store_dir) == {n: target for n in addrs}
        checks = {(r["node"], r["name"]): r["ok"] for r in
                  query(site, "SELECT * FROM checks WHERE rollout = ?", out["rollout"]["id"])}
        for n in addrs:
            for name in BUILTIN:
                assert checks.get((n, name)) == 1, (target, n, name, checks)
            assert any(k[0] == n and k[1].startswith("test:") for k in checks), checks
        for n, a in addrs.items():
            assert item_names(a) == before[n], (target, n)
    ran = query(site, "SELECT migration, kind, ok FROM migrations WHERE phase = 'migration' ORDER BY id")
    assert {(r["migration"], r["kind"]) for r in ran} == {("0002-add-note", "expand"),
                                                         ("0003-name-to-title", "contract")}
    assert all(r["ok"] for r in ran)


def test_bench_verify_runs_on_the_database_workload(pg_releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    """A smoke run of the benchmark (one node, one round): benchmarks nobody runs rot."""
    bench = Path(__file__).resolve().parents[2] / "bench/bench_verify.py"
    proc = subprocess.run([sys.executable, str(bench), "--store", str(store_dir), "--nodes", "1", "--repeat", "1",
                           "--scenario", "pgweb PG1 -> PG2"], capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after_the_run("bench_verify.py --nodes 1 --repeat 1 --scenario 'pgweb PG1 -> PG2'", proc.stdout)
    assert "pgweb PG1 -> PG2" in proc.stdout and "migrate" in proc.stdout, proc.stdout
