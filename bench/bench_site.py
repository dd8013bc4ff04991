#!/usr/bin/env python3
"""Local site benchmark: swap time, site up time, memory per node, a 50-node site.

* swap: per node, from the start of a rebuild R1 -> R2 (stop, switch, start)
  until the new release's service answers /health with R2; releases already
  unpacked (the A/B case). Target: at most 1 s.
* site up: 10 nodes and 50 nodes (``--nodes``, ``--big``), from nothing to every node answering on
  SSH and the sample service (includes unpacking R1 once and first-boot key
  generation on every node).
* memory: PSS of every process in a node's PID namespace, idle.

Run as root from the checkout: ``.venv/bin/python bench/bench_site.py``.
It builds R1 and R2 into a scratch store if ``--store`` lacks them. Figures
are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from imageupdate.images.store import ImageStore
from imageupdate.site.site import LocalSite


def health(addr: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{addr}:8080/health", timeout=0.5) as r:
            return str(json.load(r)["release"])
    except OSError:
        return None


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def node_memory_kib(init_pid: int) -> int:
    ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    total = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "ns/pid") == ns:
                    total += pss_kib(int(p.name))
            except OSError:
                continue
    return total


def ensure_releases(store: Path) -> None:
    for release, element in (("R1", "sample-workload-v1"), ("R2", "sample-workload-v2")):
        if not ImageStore(store).exists(release):
            print(f"building {release} ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "imageupdate", "build", release, "-e", element,
                            "--store", str(store)], check=True, capture_output=True)


def site_up(site: LocalSite, nodes: int) -> float:
    start = time.monotonic()
    site.up(nodes, "R1")
    return time.monotonic() - start


def swap(site: LocalSite, name: str, release: str) -> float:
    node = site.node(name)
    start = time.monotonic()
    site.rebuild(name, release)
    while health(node.address) != release:
        time.sleep(0.01)
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/var/lib/imageupdate/images"))
    ap.add_argument("--nodes", type=int, default=10, help="size of the site whose swaps are timed")
    ap.add_argument("--big", type=int, default=50, help="size of the large site")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_site.py needs root")
    ensure_releases(args.store)
    store = ImageStore(args.store)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="iu-bench-site-") as tmp:
        n = args.nodes
        site = LocalSite(Path(tmp) / "small", store)
        try:
            rows.append((f"site up, {n} nodes (s)", f"{site_up(site, n):.1f}"))
            # warm both trees, so every swap below is the A/B case
            swap(site, "node0", "R2")
            swap(site, "node0", "R1")
            times = [swap(site, f"node{i}", "R2") for i in range(n)]
            back = [swap(site, f"node{i}", "R1") for i in range(n)]
            rows.append(("swap R1->R2 per node, median / max (s)",
                         f"{statistics.median(times):.2f} / {max(times):.2f}"))
            rows.append(("swap R2->R1 per node, median / max (s)",
                         f"{statistics.median(back):.2f} / {max(back):.2f}"))
            mem = [node_memory_kib(n.status().pid or 0) for n in site.nodes()]
            rows.append(("memory per idle node, PSS median (MiB)", f"{statistics.median(mem) / 1024:.1f}"))
            start = time.monotonic()
            site.down()
            rows.append((f"site down, {n} nodes (s)", f"{time.monotonic() - start:.1f}"))
        finally:
            site.destroy()
        big = LocalSite(Path(tmp) / "sbig", store)
        try:
            rows.append((f"site up, {args.big} nodes (s)", f"{site_up(big, args.big):.1f}"))
            mem = [node_memory_kib(n.status().pid or 0) for n in big.nodes()]
            rows.append((f"memory, {args.big} idle nodes, PSS total (MiB)", f"{sum(mem) / 1024:.0f}"))
            start = time.monotonic()
            big.down()
            rows.append((f"site down, {args.big} nodes (s)", f"{time.monotonic() - start:.1f}"))
        finally:
            big.destroy()
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:{width}}  {value}")


if __name__ == "__main__":
    main()
