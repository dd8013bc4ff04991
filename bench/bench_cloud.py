#!/usr/bin/env python3
"""Cloud path benchmark: per-node orchestration overhead of R1 -> R2 on the cloud path (a real Keystone, Glance,
Nova and Heat from ``tools/openstack``) against the local site (its ephemeral Heat and plugin), side by side.

Both drive the same 3 local-site nodes' worth of work: on the cloud path each node is a Nova server whose driver
swaps a local-site node, so the node-side work (stop, migrate, start, checks) is the same and the difference is
the orchestration: Keystone-authenticated Heat, Nova's rebuild through conductor and compute, Glance.
Overhead per node = rollout wall time minus the time nodes spent in their rebuild (from the rebuild step's phases:
begun to ready) and in their gate's checks, divided by the nodes; measured on a second R1 -> R2 after a warm-up
round and a rollback (Heat running, stack made, R2 unpacked or already in Glance).

Run as root from the checkout after ``bash tools/openstack/install.sh``:
``.venv/bin/python bench/bench_cloud.py [--nodes 3]``. R1 and R2 must be in the store. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("imageupdate")
    proc = subprocess.run([str(exe), *args, "--json"], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"imageupdate {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def node_time(history: Path, rid: int) -> float:
    """Seconds nodes spent rebuilding (begun -> ready, or the step's own span) and being checked."""
    db = sqlite3.connect(f"file:{history}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    total = 0.0
    try:
        for s in db.execute("SELECT * FROM steps WHERE rollout = ?", (rid,)):
            if s["step"] == "rebuild" and s["started"] and s["finished"]:
                phases = (json.loads(s["data"]) if s["data"] else {}).get("phases") or {}
                if phases.get("begun") and phases.get("ready"):
                    total += phases["ready"] - phases["begun"]
                else:
                    total += s["finished"] - s["started"]
            elif s["step"] == "gate" and s["data"]:
                v = json.loads(s["data"])
                if v.get("started") and v.get("finished"):
                    total += v["finished"] - v["started"]
    finally:
        db.close()
    return total


def measure(args: list[str], history: Path, env: dict[str, str] | None, nodes: int) -> tuple[float, float]:
    """R1 -> R2 once to warm up (Heat started and the stack made on the local site, R2 unpacked or uploaded to
    Glance), back to R1, then R1 -> R2 measured: the steady state an operator sees."""
    cli("rollout", "R2", "--no-probe", "--no-rehearse", *args, env=env)
    cli("rollback", "--to", "R1", *args, env=env)
    t0 = time.monotonic()
    out = cli("rollout", "R2", "--no-probe", "--no-rehearse", *args, env=env)
    wall = time.monotonic() - t0
    if out["status"] != "succeeded":
        raise SystemExit(f"rollout ended {out['status']}: {out['reason']}")
    return wall, (wall - node_time(history, out["rollout"]["id"])) / nodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--store", default=os.environ.get("IMAGEUPDATE_STORE", "/var/lib/imageupdate/images"))
    a = ap.parse_args()
    store = ["--store", a.store]
    with tempfile.TemporaryDirectory(prefix="bench-cloud-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        local_site, cloud_site = base / "local", base / "cloud-nodes"
        results = {}
        cli("site", "up", "--nodes", str(a.nodes), "--release", "R1", "--site", str(local_site), *store)
        try:
            results["local site"] = measure(["--site", str(local_site), *store], local_site / "history.sqlite",
                                            None, a.nodes)
        finally:
            cli("site", "destroy", "--force", "--site", str(local_site), *store)
        cli("site", "up", "--nodes", str(a.nodes), "--release", "R1", "--site", str(cloud_site), *store)
        plane = base / "plane"
        ctl = [sys.executable, str(ROOT / "tools/openstack/controlplane.py")]
        t0 = time.monotonic()
        subprocess.run([*ctl, "start", str(plane), str(cloud_site), a.store], check=True, capture_output=True)
        plane_up = time.monotonic() - t0
        env = {"OS_CLIENT_CONFIG_FILE": str(plane / "clouds.yaml")}
        fleet = ["--cloud", "imageupdate-test", "--site", str(base / "fleet"), *store]
        try:
            t0 = time.monotonic()
            cli("cloud", "up", "--nodes", str(a.nodes), "--release", "R1", "--flavor", "imageupdate-node",
                "--ssh-key", str(cloud_site / "key"), "--network", "none", *fleet, env=env)
            fleet_up = time.monotonic() - t0
            results["cloud path"] = measure(fleet, base / "fleet" / "history.sqlite", env, a.nodes)
        finally:
            subprocess.run([*ctl, "stop", str(plane)], check=False, capture_output=True)
            cli("site", "destroy", "--force", "--site", str(cloud_site), *store)
    print(f"\nR1 -> R2 on {a.nodes} nodes, batch 1, no probe, no rehearsal, after a warm-up round (seconds)\n")
    print(f"{'':28}" + "".join(f"{k:>14}" for k in results))
    print(f"{'rollout wall time':28}" + "".join(f"{w:>14.1f}" for w, _ in results.values()))
    print(f"{'orchestration per node':28}" + "".join(f"{o:>14.2f}" for _, o in results.values()))
    print(f"\ncontrol plane start {plane_up:.1f} s; cloud up of {a.nodes} servers {fleet_up:.1f} s "
          "(includes the R1 upload to Glance)")


if __name__ == "__main__":
    main()
