#!/usr/bin/env python3
"""Verification benchmark: per-node downtime of the sample workload during a rollout, and what the gate's
checks cost per node, side by side in one run.

The CLI as a user runs it (``imageupdate rollout R2 --site DIR --json``): each measured rollout is the
upgrade R1 -> R2 on a fresh site (each measured rollout starts from the same state), in these scenarios:

* ``probe 50 ms``: the default probe (an HTTP GET of /health on each node every 50 ms);
* ``probe 20 ms``: a finer probe, to see how much of the figure is probe granularity;
* ``probe 50 ms + hooks``: with the resource survival hooks of ``tools/resources.d`` (create, verify_noapi,
  verify, destroy), to show what the operator's checks add to a gate;
* ``pgweb PG1 -> PG2``: the database workload (PostgreSQL + nginx, ``elements/pgweb*``), whose rebuild runs
  an SQL migration and whose gate asks two health endpoints: what software we did not write costs per node.

Per scenario, from the site's history (``probes``, ``checks``, ``steps``): downtime per node (median and
worst; target under 1 s), probes failed, the swap's phases (stop: from the rebuild's start until the old
release stopped; migrate: the state's migrations; boot: from the switch until the node answered on SSH and
its ports listened inside it), and the checks' run time per node: facts (one SSH call, the health requests
included), built-ins, shipped tests, hooks, and the whole gate's checks.

Run as root from the checkout: ``.venv/bin/python bench/bench_verify.py [--nodes 3 10] [--repeat 2]
[--scenario NAME ...]``. R1 and R2 (and PG1 and PG2 for pgweb) must be in the store. Figures are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_DOWNTIME = 1.0
BUILTIN = ("release", "services", "health", "stale-code", "config", "filesystems", "state-version", "probe")


@dataclass
class Scenario:
    name: str
    args: list[str]
    releases: tuple[str, str] = ("R1", "R2")
    downtime: list[float] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    stop: list[float] = field(default_factory=list)
    migrate: list[float] = field(default_factory=list)
    boot: list[float] = field(default_factory=list)
    facts: list[float] = field(default_factory=list)
    builtins: list[float] = field(default_factory=list)
    tests: list[float] = field(default_factory=list)
    hooks: list[float] = field(default_factory=list)
    gate_checks: list[float] = field(default_factory=list)


def cli(*args: str, timeout: float = 1800) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("imageupdate")
    proc = subprocess.run([str(exe), *args, "--json"], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"imageupdate {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def record(site: Path, rid: int, sc: Scenario) -> None:
    db = sqlite3.connect(f"file:{site / 'history.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        for p in db.execute("SELECT * FROM probes WHERE rollout = ?", (rid,)):
            sc.downtime.append(p["downtime"])
            sc.failed.append(p["failures"])
            sc.requests.append(p["requests"])
        per_node: dict[str, dict[str, float]] = {}
        for c in db.execute("SELECT * FROM checks WHERE rollout = ?", (rid,)):
            kind = ("facts" if c["name"] == "facts" else "builtins" if c["name"] in BUILTIN else
                    "tests" if c["name"].startswith("test:") else "hooks")
            node = per_node.setdefault(c["node"], {"facts": 0.0, "builtins": 0.0, "tests": 0.0, "hooks": 0.0})
            node[kind] += c["seconds"]
        for node in per_node.values():
            sc.facts.append(node["facts"])
            sc.builtins.append(node["builtins"])
            sc.tests.append(node["tests"])
            sc.hooks.append(node["hooks"])
        for s in db.execute("SELECT * FROM steps WHERE rollout = ?", (rid,)):
            data = json.loads(s["data"]) if s["data"] else {}
            if s["step"] == "rebuild" and data.get("phases"):
                ph = data["phases"]
                if {"begun", "stopped", "switched", "ready"} <= set(ph):
                    sc.stop.append(ph["stopped"] - ph["begun"])
                    sc.migrate.append(ph.get("migrated", ph["stopped"]) - ph["stopped"])
                    sc.boot.append(ph["ready"] - ph["switched"])
            if s["step"] == "gate" and data.get("finished") and data.get("started"):
                sc.gate_checks.append(data["finished"] - data["started"])
    finally:
        db.close()


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f}" if xs else "-"


def worst(xs: list[float]) -> str:
    return f"{max(xs):.3f}" if xs else "-"


def report(nodes: int, scenarios: list[Scenario]) -> None:
    print(f"\n{nodes} nodes, batch size 1 (per node: median / worst; seconds)")
    head = (f"{'scenario':<22} {'downtime':>13} {'probes failed':>14} {'stop':>6} {'migrate':>7} {'boot':>6} "
            f"{'facts':>6} "
            f"{'builtins':>8} {'tests':>6} {'hooks':>6} {'all checks':>11}")
    print(head)
    print("-" * len(head))
    for sc in scenarios:
        failed = f"{sum(sc.failed)}/{sum(sc.requests)}"
        print(f"{sc.name:<22} {med(sc.downtime) + ' / ' + worst(sc.downtime):>13} {failed:>14} {med(sc.stop):>6} "
              f"{med(sc.migrate):>7} {med(sc.boot):>6} {med(sc.facts):>6} {med(sc.builtins):>8} {med(sc.tests):>6} "
              f"{med(sc.hooks):>6} "
              f"{med(sc.gate_checks) + ' / ' + worst(sc.gate_checks):>11}")
    for sc in scenarios:
        if sc.downtime:
            verdict = "met" if max(sc.downtime) < TARGET_DOWNTIME else "MISSED"
            print(f"  {sc.name}: worst node down {max(sc.downtime):.3f} s over {len(sc.downtime)} node rebuilds: "
                  f"target < {TARGET_DOWNTIME:.0f} s {verdict}")


SCENARIOS = {
    "probe 50 ms": Scenario("probe 50 ms", ["--probe-interval", "0.05"]),
    "probe 20 ms": Scenario("probe 20 ms", ["--probe-interval", "0.02"]),
    "probe 50 ms + hooks": Scenario("probe 50 ms + hooks", ["--probe-interval", "0.05", "--resources",
                                                          str(ROOT / "tools/resources.d")]),
    "pgweb PG1 -> PG2": Scenario("pgweb PG1 -> PG2", ["--probe-interval", "0.05"], ("PG1", "PG2")),
}


def bench(store: Path, nodes: int, repeat: int, names: list[str]) -> list[Scenario]:
    scenarios = [Scenario(SCENARIOS[n].name, SCENARIOS[n].args, SCENARIOS[n].releases) for n in names]
    for k in range(repeat):
        for sc in scenarios:
            with tempfile.TemporaryDirectory(prefix="iu-bench-verify-") as tmp:
                site = Path(tmp) / "site"
                where = ["--site", str(site), "--store", str(store)]
                cli("site", "up", "--nodes", str(nodes), "--release", sc.releases[0], *where)
                try:
                    out = cli("rollout", sc.releases[1], *sc.args, *where)
                    if out.get("status") != "succeeded":
                        raise SystemExit(f"{sc.name}: the rollout {out.get('status')}: {out.get('reason')}")
                    record(site, out["rollout"]["id"], sc)
                    print(f"[{nodes} nodes] round {k + 1}: {sc.name}: {out['status']}", file=sys.stderr)
                finally:
                    subprocess.run([str(Path(sys.executable).with_name("imageupdate")), "site", "destroy", "--force",
                                    *where],
                                   capture_output=True, check=False)
    return scenarios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/var/lib/imageupdate/images"))
    ap.add_argument("--nodes", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--repeat", type=int, default=2, help="rollouts per scenario and site")
    ap.add_argument("--scenario", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), dest="scenarios")
    args = ap.parse_args()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()
    print(f"bench_verify at {head}; store {args.store}; nodes {args.nodes}; {args.repeat} rollouts per scenario")
    results = [(n, bench(args.store, n, args.repeat, args.scenarios)) for n in args.nodes]
    for n, scenarios in results:
        report(n, scenarios)


if __name__ == "__main__":
    main()
