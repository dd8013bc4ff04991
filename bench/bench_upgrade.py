#!/usr/bin/env python3
"""Upgrade path benchmark: the skip-level path R1 -> R4 against R1 -> R2 -> R3 -> R4 one release at a time,
side by side in one run, on the sample workload with a realistic state on every node.

Each scenario gets a fresh site of N nodes on R1 whose sample-workload state is filled with ``--state-mb``
of data (format 1: one JSON file, as R1 keeps it), then:

* ``skip-level``: ``imageupdate rollout R4``: one rehearsal on a copy of the first node's state, then per
  node a snapshot, 0002 (contract, from R2's image), 0003 (expand, from R3's), 0004 (contract, from R4's)
  and the swap to R4, each node gated;
* ``one at a time``: ``rollout R2``, ``rollout R3``, ``rollout R4``: three rehearsals, three snapshots per
  node, the same three steps, three swaps and three gates per node.

Split from the site's history (``migrations``, ``steps``) and wall clocks: rehearsal, snapshot, each
migration step (summed over nodes), and the rest of the rollouts (Heat, swaps, gates). Target: the
skip-level path costs less than the sum of the single-release rollouts.

Run as root from the checkout: ``.venv/bin/python bench/bench_upgrade.py [--nodes 3] [--state-mb 100]``.
R1 to R4 must be in the store (``IMAGEUPDATE_STORE`` or ``--store``). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STEPS = ("0002-json-to-sqlite", "0003-add-created", "0004-kv-to-entries")


@dataclass
class Run:
    name: str
    wall: float = 0.0
    rollouts: list[float] = field(default_factory=list)
    rehearsal: float = 0.0
    rehearsal_copy: float = 0.0
    rehearsal_unpack: float = 0.0
    snapshot: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    downtime: list[float] = field(default_factory=list)

    @property
    def rest(self) -> float:
        return self.wall - self.rehearsal - self.snapshot - sum(self.steps.values())


def cli(store: str, *args: str, timeout: float = 3600) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("imageupdate")
    proc = subprocess.run([str(exe), *args, "--store", store, "--json"], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"imageupdate {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def value(i: int) -> str:
    """5 kB that compress like real data (about half), the same for a key on every run."""
    return random.Random(i).randbytes(2500).hex()


def fill(site: Path, state_mb: int) -> int:
    """Write R1's data file on every node's state: keys of 5 kB up to ``state_mb``; returns the key count."""
    keys = state_mb * 1_000_000 // 5_000
    data = json.dumps({f"key{i:06d}": value(i) for i in range(keys)})
    for node in sorted((site / "nodes").iterdir()):
        d = node / "state/var/lib/sample-workload"
        st = d.stat()
        tmp = d / "data.json.tmp"
        tmp.write_text(data)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, d / "data.json")
    os.sync()  # a live node's state is on disk, not 300 MB of dirty pages that the first copy would flush
    return keys


def account(site: Path, rid: int, run: Run) -> None:
    db = sqlite3.connect(f"file:{site / 'history.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        for m in db.execute("SELECT * FROM migrations WHERE rollout = ?", (rid,)):
            if m["phase"] == "rehearsal" and not m["migration"]:  # the rehearsal as a whole
                run.rehearsal += m["seconds"] or 0.0
                whole = json.loads(m["output"])
                run.rehearsal_copy += whole["copy_seconds"]
                run.rehearsal_unpack += whole["prepare_seconds"]
            elif m["phase"] == "snapshot":
                run.snapshot += m["seconds"] or 0.0
            elif m["phase"] == "migration":
                run.steps[m["migration"]] = run.steps.get(m["migration"], 0.0) + (m["seconds"] or 0.0)
        for p in db.execute("SELECT downtime FROM probes WHERE rollout = ?", (rid,)):
            run.downtime.append(p["downtime"])
    finally:
        db.close()


def scenario(store: str, name: str, targets: list[str], nodes: int, state_mb: int, base: Path) -> Run:
    site = base / name.replace(" ", "-")
    cli(store, "site", "up", "--nodes", str(nodes), "--release", "R1", "--site", str(site))
    try:
        keys = fill(site, state_mb)
        run = Run(name)
        t0 = time.monotonic()
        for target in targets:
            t = time.monotonic()
            out = cli(store, "rollout", target, "--site", str(site))
            run.rollouts.append(time.monotonic() - t)
            if out["status"] != "succeeded":
                raise SystemExit(f"{name}: rollout {target} ended {out['status']}: {out['reason']}")
            account(site, out["rollout"]["id"], run)
        run.wall = time.monotonic() - t0
        # the data made it through: a key read back from every node on R4
        for n in cli(store, "site", "status", "--site", str(site))["nodes"]:
            with urllib.request.urlopen(f"http://{n['address']}:8080/kv/key{keys - 1:06d}", timeout=10) as r:
                if r.read() != value(keys - 1).encode():
                    raise SystemExit(f"{name}: {n['name']} lost data")
        return run
    finally:
        cli(store, "site", "destroy", "--force", "--site", str(site))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--state-mb", type=int, default=100)
    ap.add_argument("--store", default=os.environ.get("IMAGEUPDATE_STORE", "/var/lib/imageupdate/images"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-upgrade-", dir="/var/tmp") as tmp:
        runs = [scenario(args.store, "skip-level", ["R4"], args.nodes, args.state_mb, Path(tmp)),
                scenario(args.store, "one at a time", ["R2", "R3", "R4"], args.nodes, args.state_mb, Path(tmp))]
    print(f"\nR1 -> R4, {args.nodes} nodes, {args.state_mb} MB of sample-workload state per node "
          "(seconds; migration steps and snapshots summed over nodes)\n")
    rows: list[tuple[str, Callable[[Run], str]]] = [("rollouts", lambda r: " + ".join(f"{x:.1f}" for x in r.rollouts)),
            ("total (wall)", lambda r: f"{r.wall:.1f}"),
            ("rehearsal(s)", lambda r: f"{r.rehearsal:.1f}"),
            ("  of which: copy of the state", lambda r: f"{r.rehearsal_copy:.1f}"),
            ("  of which: unpacking images", lambda r: f"{r.rehearsal_unpack:.1f}"),
            ("snapshots", lambda r: f"{r.snapshot:.1f}"),
            *[(s, (lambda r, s=s: f"{r.steps.get(s, 0.0):.1f}")) for s in STEPS],
            ("rest (Heat, swaps, gates)", lambda r: f"{r.rest:.1f}"),
            ("downtime per node, worst", lambda r: f"{max(r.downtime, default=0):.2f}")]
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  " + "  ".join(f"{r.name:>14}" for r in runs))
    for label, fmt in rows:
        print(f"{label:{width}}  " + "  ".join(f"{fmt(r):>14}" for r in runs))
    skip, single = runs
    verdict = "met" if skip.wall < single.wall else "NOT met"
    print(f"\ntarget: skip-level < sum of single-release rollouts: {skip.wall:.1f} s vs {single.wall:.1f} s "
          f"({verdict}; {single.wall / skip.wall:.1f}x)")


if __name__ == "__main__":
    main()
