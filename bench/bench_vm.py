#!/usr/bin/env python3
"""VM nodes beside namespace nodes, in one run, on the same machine images (M1 -> M2 of the sample workload).

Per kind (a site of ``--nodes`` nodes each):

* site up: from nothing to every node ready (SSH and the service's port);
* rebuild per node, M1 -> M2 (stop, state migration 0002, switch, start) until the service answers /health
  with M2, and the downtime a probe of /health every 50 ms saw during it;
* memory per idle node: QEMU's RSS (VM) or the PSS of the node's PID namespace (namespace node);
* the gate: ``imageupdate check`` of one node on M2 (every built-in check and the release's shipped tests);
* VM only: the kernel's own boot, from its console (vm-init's first line: kernel uptime), the floor of a VM
  rebuild on this machine;
* build: the same release (sample-workload-v1) built tree-only and as a machine image, into a scratch store,
  on a warm DIB cache (``--skip-builds`` leaves this out).

KVM and TCG: the VM column is whichever ``IMAGEUPDATE_VM_ACCEL`` selects (TCG by default); run the bench once
per accelerator where both work. On the machines measured so far KVM does not run Linux guests.

Run as root from the checkout: ``.venv/bin/python bench/bench_vm.py [--store DIR] [--nodes 2]``. It builds
M1 and M2 (``--os imageupdate-debian-machine``) into the store if it lacks them. Figures are printed, never
asserted. QEMU runs TCG unless ``IMAGEUPDATE_VM_ACCEL=kvm``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from imageupdate.images.store import ImageStore
from imageupdate.site.site import LocalSite


def health(addr: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{addr}:8080/health", timeout=0.5) as r:
            return str(json.load(r)["release"])
    except (OSError, ValueError, KeyError):
        return None


MACHINE = ["--os", "imageupdate-debian-machine"]


def build(store: Path, release: str, *args: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "imageupdate", "build", release, *args, "--store", str(store)],
                   check=True, capture_output=True)
    return time.monotonic() - start


def ensure_releases(store: Path) -> None:
    """M1 (Debian's generic kernel) and M2 (its cloud kernel: the rebuild boots another kernel)."""
    for release, elements in (("M1", ["-e", "sample-workload-v1"]),
                              ("M2", ["-e", "sample-workload-v2", "-e", "imageupdate-kernel-cloud"])):
        if not ImageStore(store).exists(release):
            print(f"building {release} (machine image) ...", file=sys.stderr)
            build(store, release, *elements, *MACHINE)


def build_times() -> dict[str, str]:
    """Seconds and artifact sizes of one build of sample-workload-v1, tree-only and as a machine image."""
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="iu-bench-vm-store-") as tmp:
        for kind, args in (("namespace", []), ("vm", MACHINE)):
            seconds = build(Path(tmp), f"B-{kind}", "-e", "sample-workload-v1", *args)
            size = sum(f.stat().st_size for f in (Path(tmp) / f"B-{kind}").iterdir())
            out[kind] = f"{seconds:.0f} s, {size / 2**20:.0f} MiB"
    return out


def gate(site: LocalSite, name: str) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "imageupdate", "check", name, "--site", str(site.path), "--store",
                    str(site.store.root)], check=True, capture_output=True)
    return time.monotonic() - start


def rebuild(site: LocalSite, name: str, release: str) -> tuple[float, float]:
    """(seconds to healthy on ``release``, longest gap in /health answers seen by a 50 ms probe)."""
    addr = site.node(name).address
    stop = threading.Event()
    gaps: list[float] = []

    def probe() -> None:
        last_ok = time.monotonic()
        while not stop.is_set():
            if health(addr) is not None:
                now = time.monotonic()
                gaps.append(now - last_ok)
                last_ok = now
            time.sleep(0.05)

    t = threading.Thread(target=probe)
    t.start()
    start = time.monotonic()
    site.rebuild(name, release)
    while health(addr) != release:
        time.sleep(0.05)
    took = time.monotonic() - start
    stop.set()
    t.join()
    return took, max(gaps, default=0.0)


def memory_mib(site: LocalSite, kind: str) -> float:
    out = []
    for node in site.nodes():
        pid = node.status().pid or 0
        if kind == "vm":
            text = Path(f"/proc/{pid}/status").read_text()
            out.append(int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024)  # type: ignore[union-attr]
        else:
            ns = os.readlink(f"/proc/{pid}/ns/pid")
            total = 0
            for p in Path("/proc").iterdir():
                try:
                    if p.name.isdigit() and os.readlink(p / "ns/pid") == ns:
                        rollup = (p / "smaps_rollup").read_text()
                        total += int(re.search(r"Pss:\s+(\d+)", rollup).group(1))  # type: ignore[union-attr]
                except (OSError, AttributeError):
                    continue
            out.append(total / 1024)
    return statistics.median(out)


def kernel_boot(site: LocalSite) -> float:
    """The kernel's uptime at vm-init's first line, newest boot, median over the nodes."""
    found = []
    for node in site.nodes():
        text = (node.dir / "console.log").read_text(errors="replace")
        starts = re.findall(r"vm-init\[([\d.]+)\]: start", text)
        if starts:
            found.append(float(starts[-1]))
    return statistics.median(found) if found else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/var/lib/imageupdate/images"))
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--skip-builds", action="store_true", help="leave out the build times")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_vm.py needs root")
    ensure_releases(args.store)
    store = ImageStore(args.store)
    table: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="iu-bench-vm-") as tmp:
        for kind in ("namespace", "vm"):
            site = LocalSite(Path(tmp) / kind, store)
            col = table.setdefault(kind, {})
            try:
                start = time.monotonic()
                site.up(args.nodes, "M1", kind)
                col["site up (s)"] = f"{time.monotonic() - start:.1f}"
                col["memory per idle node (MiB)"] = f"{memory_mib(site, kind):.0f}"
                runs = [rebuild(site, f"node{i}", "M2") for i in range(args.nodes)]
                col["rebuild M1->M2 to healthy, median (s)"] = f"{statistics.median(r[0] for r in runs):.1f}"
                col["downtime seen by the probe, median (s)"] = f"{statistics.median(r[1] for r in runs):.1f}"
                col["gate of one node on M2 (s)"] = f"{gate(site, 'node0'):.1f}"
                col["kernel boot to init (s)"] = f"{kernel_boot(site):.1f}" if kind == "vm" else "-"
            finally:
                site.destroy(force=True)
    if not args.skip_builds:
        for kind, figure in build_times().items():
            table[kind]["build of sample-workload-v1"] = figure
    rows = list(table["namespace"])
    width = max(len(r) for r in rows)
    print(f"{'':{width}}  {'namespace':>14}  {'vm (' + os.environ.get('IMAGEUPDATE_VM_ACCEL', 'tcg') + ')':>14}")
    for r in rows:
        print(f"{r:{width}}  {table['namespace'][r]:>14}  {table['vm'].get(r, '?'):>14}")


if __name__ == "__main__":
    main()
