#!/usr/bin/env python3
"""Build benchmark: cold vs warm imageupdate build, and plain disk-image-create.

Side by side in one run, same elements, same DIB environment, same cache:

* cold:   ``imageupdate build`` with an empty DIB cache (debootstrap runs);
* warm:   ``imageupdate build`` with the cache filled (median of --rounds);
* plain:  ``disk-image-create -n -t tar`` with the same elements and
          environment (median of --rounds, interleaved with warm runs);
* overhead = warm - plain, what imageupdate adds (namespaces, repacking,
  hashing, manifest, verify, publish). Target: at most 5 %.

Run as root from the checkout: ``.venv/bin/python bench/bench_build.py``.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from imageupdate.base import locks

ROOT = Path(__file__).resolve().parents[1]


def imageupdate_build(store: Path, cache: Path, release: str, element: str) -> dict[str, Any]:
    env = {**os.environ, "DIB_IMAGE_CACHE": str(cache)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "imageupdate", "build", release, "-e", element, "--store", str(store), "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"imageupdate build failed: {proc.stderr[-1500:]}")
    doc = json.loads(proc.stdout)
    return {"wall": wall, "dib": doc["dib_seconds"], "pack": doc["pack_seconds"],
            "environment": doc["manifest"]["environment"], "elements": doc["manifest"]["elements"]}


def plain_dib(work: Path, environment: dict[str, str], elements: list[str], cache: Path) -> float:
    out = work / "plain"
    env = {**os.environ, **environment, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "TMP_DIR": str(work / "tmp"), "DIB_IMAGE_CACHE": str(cache)}
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    # the lock imageupdate build takes on the same cache (imageupdate.build.builder): a plain build beside
    # another on one cache would share its apt cache and debootstrap tarball half written; timed once it is held
    with locks.held(cache / ".lock", record_pid=True):
        start = time.monotonic()
        proc = subprocess.run(["disk-image-create", "-n", "-t", "tar", "-o", str(out), *elements],
                              capture_output=True, text=True, env=env, check=False)
        wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"disk-image-create failed: {proc.stdout[-1500:]}")
    shutil.rmtree(work, ignore_errors=True)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--element", default="sample-workload-v1")
    ap.add_argument("--rounds", type=int, default=2, help="warm/plain pairs (median is reported)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cache", type=Path, default=None,
                    help="a DIB cache already filled (e.g. /var/cache/imageupdate/dib): no cold build, the warm "
                         "rounds only (the test command's smoke run)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_build.py needs root (disk-image-create chroots)")
    if args.rounds < 1:
        sys.exit("bench_build.py: --rounds must be at least 1")
    if args.cache is not None and not args.cache.is_dir():
        sys.exit(f"bench_build.py: --cache {args.cache} is not a directory")

    with tempfile.TemporaryDirectory(prefix="iu-bench-") as tmp:
        base = Path(tmp)
        cache = args.cache or base / "cache"
        cold: dict[str, Any] | None = None
        if args.cache is None:
            print(f"cold build of {args.element} (empty cache) ...", file=sys.stderr)
            cold = imageupdate_build(base / "store-cold", cache, "B", args.element)
        warm, plain = [], []
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}: warm imageupdate build, then plain DIB ...", file=sys.stderr)
            warm.append(imageupdate_build(base / f"store-warm{i}", cache, "B", args.element))
            shutil.rmtree(base / f"store-warm{i}", ignore_errors=True)
            plain.append(plain_dib(base / f"plain{i}", warm[0]["environment"], warm[0]["elements"],
                                   cache))

    w = statistics.median(r["wall"] for r in warm)
    p = statistics.median(plain)
    rows = [
        *([("imageupdate build, cold cache", cold["wall"], cold["dib"], cold["pack"])] if cold else []),
        ("imageupdate build, warm cache", w, statistics.median(r["dib"] for r in warm),
         statistics.median(r["pack"] for r in warm)),
        ("disk-image-create alone, warm", p, p, 0.0),
    ]
    result = {
        "element": args.element,
        "rounds": args.rounds,
        "cold_s": round(cold["wall"], 2) if cold else None,
        "warm_s": [round(r["wall"], 2) for r in warm],
        "plain_dib_s": [round(x, 2) for x in plain],
        "warm_pack_s": [round(r["pack"], 2) for r in warm],
        "overhead_s": round(w - p, 2),
        "overhead_pct": round(100 * (w - p) / p, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'scenario':34} {'wall s':>8} {'in DIB s':>9} {'packing s':>10}")
    for name, wall, dib, pack in rows:
        print(f"{name:34} {wall:8.1f} {dib:9.1f} {pack:10.1f}")
    print(f"\nwarm runs {result['warm_s']}, plain DIB runs {result['plain_dib_s']}")
    print(f"imageupdate overhead over plain disk-image-create: {result['overhead_s']:+.1f} s "
          f"({result['overhead_pct']:+.1f} %), target <= 5 %")
    if cold:
        print(f"cold vs warm: {cold['wall'] - w:+.1f} s for debootstrap without the cache")


if __name__ == "__main__":
    main()
