#!/usr/bin/env python3
"""Soak benchmark: random faults in rollouts and rollbacks on one 2-node site, and how often the fleet comes out
of them whole.

One site of 2 nodes on R1 with data written on each node; a clean rollout to R2 gives the baseline of each
node's state on R1 and on R2 (R1 -> R2 runs the contract migration 0002-json-to-sqlite: a rollout snapshots and
migrates each node's state, a rollback restores the snapshot). Then ``--trials`` trials, each:

* the operation: ``rollout R2`` when the fleet is on R1, ``rollback --to R1`` when it is on R2;
* a random fault from the matrix of ``tests/faults`` (``tests/faults/faultlib.py``): imageupdate killed at a
  random crashpoint of that operation (``after-start``, ``after-rehearsal``, ``after-create-hooks``,
  ``before-update``, ``before-signal@NODE``, and ``in-freeze`` for a rollout), Heat killed while a random node
  rebuilds or is gated, a random node's rebuild process killed mid-rebuild, or a random node killed as its gate
  runs; the kill comes 0 to 0.5 s after the moment is seen;
* a random recovery: ``resume`` or ``cancel`` (killed and counted as hung after 120 s). When the operation
  has already ended on its own (a failed gate or rebuild rolls a rollout back; a failed rollback stops), that
  answers "nothing to resume/cancel"; if the fleet is then not whole or a rollback failed, what the error says
  is run once (the operation again, or ``rollback`` after an automatic rollback that failed);
* what holds after it (``faultlib.check``): every node on exactly one complete release and running
  (consistent), each node's state equal to its baseline on that release (data identical), processes of the
  node trees left stopped (state T), locks left held, the history complete (no operation open, every
  operation closed, each node it touched with a finished rebuild and, after one that succeeded, a gate with a
  verdict), and how long the trial took.

A fleet that is not whole after a trial is repaired before the next (``site recover``, then a rollback to R1);
if that fails too the run stops there. Per trial one line, then the totals.

Run as root from the checkout: ``.venv/bin/python bench/bench_soak.py [--trials 10] [--seed N]
[--store DIR]``. R1 and R2 must be in the store (``IMAGEUPDATE_STORE`` or ``--store``). Figures are printed,
never asserted. Under each trial: why each of its operations that did not succeed ended so (the history).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults.faultlib import (  # noqa: E402 - the checkout's tests package, after sys.path
    HUNG,
    Baseline,
    Fault,
    FaultError,
    Site,
    Trial,
    TrialResult,
    bring_to,
    check,
    kill_strays,
    run_trial,
    set_up,
)

NODES = ("node0", "node1")
RECOVERY_TIMEOUT = 120.0  # seconds a resume or cancel may take; then it is killed and counted as hung
POINTS = ("after-start", "after-rehearsal", "after-create-hooks", "before-update", "before-signal@node0",
          "before-signal@node1")


def random_trial(rng: random.Random, number: int, on: str) -> Trial:
    rolling_back = on == "R2"
    operation = ("rollback", "--to", "R1") if rolling_back else ("rollout", "R2")
    kind = rng.choice(("imageupdate", "heat", "rebuild", "node"))
    node = rng.choice(NODES)
    delay = round(rng.uniform(0.0, 0.5), 2)
    if kind == "imageupdate":
        point = rng.choice(POINTS + (() if rolling_back else ("in-freeze",)))
        fault = Fault(kind, f"rollback:{point}" if rolling_back else point)
        step = point
    elif kind == "heat":
        step = rng.choice(("rebuild", "gate"))
        fault = Fault(kind, node=node, step=step, delay=delay)
        step = f"{node} {step}"
    elif kind == "rebuild":
        fault = Fault(kind, node=node, step="rebuild", delay=delay)
        step = f"{node} rebuild"
    else:
        fault = Fault(kind, node=node, delay=delay)
        step = f"{node} gate"
    return Trial(f"#{number}", operation, on, step, fault, rng.choice(("resume", "cancel")),
                 recovery_timeout=RECOVERY_TIMEOUT)


def next_step(site: Site, result: TrialResult) -> tuple[str, ...] | None:
    """What the product says to run when the trial's operations ended on their own and left the fleet not whole
    or a rollback failed ('imageupdate rollback' tries again): the same operation, or for an automatic rollback
    that failed, ``rollback`` (undo the rollout); None if nothing is to be done."""
    ops = site.operations(result.after)
    last = ops[-1] if ops else None
    failed_rollback = last is not None and last["kind"] == "rollback" and last["status"] == "failed"
    if failed_rollback and last is not None and last["parent"]:
        return ("rollback",)
    if failed_rollback or result.checked.inconsistent:
        return result.trial.operation
    return None


def soak_one(site: Site, trial: Trial, baseline: Baseline) -> tuple[TrialResult, str]:
    """The trial; if its recovery found nothing open and the fleet is not whole or a rollback failed, what the
    product says to run next, once (see ``next_step``)."""
    result = run_trial(site, trial, baseline)
    said = trial.recovery
    code, _doc, err = result.recovery
    if code == 2 and "nothing to" in err:
        said += " (nothing open)"
        argv = next_step(site, result)
        if argv is not None:
            again = Trial(trial.name, trial.operation, trial.start, trial.step, trial.fault, "again")
            began = time.monotonic()
            proc = site.run(*argv)
            checked = check(site, result.after, result.start, baseline)  # the whole trial, the rerun included
            ops = [(str(r["kind"]), str(r["status"])) for r in site.operations(result.after) if r["kind"] != "adopt"]
            result = TrialResult(again, result.injected, (proc.returncode, {}, proc.stderr), ops, checked,
                                 result.seconds + time.monotonic() - began, result.after, result.start)
            said += f" + {argv[0]}"
    return result, said


def reasons(site: Site, result: TrialResult) -> list[str]:
    """Why each operation of the trial that did not succeed ended as it did (the history's reason)."""
    return [f"{r['kind']} {r['id']} {r['status']}: {(r['reason'] or '')[:300]}" for r in site.operations(result.after)
            if r["kind"] != "adopt" and r["status"] != "succeeded"]


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    ap.add_argument("--store", default=os.environ.get("IMAGEUPDATE_STORE", "/var/lib/imageupdate/images"))
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    store = Path(args.store)
    missing = [r for r in ("R1", "R2") if not (store / r / "manifest.json").exists()]
    if missing:
        sys.exit(f"bench_soak: {', '.join(missing)} not in the store {store}; build them first")
    print(f"soak: {args.trials} trials, seed {seed}, store {store}", flush=True)
    results: list[tuple[TrialResult, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-soak-", dir="/var/tmp") as tmp:
        site = Site(Path(tmp) / "site", store)
        try:
            began = time.monotonic()
            baseline = set_up(site, nodes=len(NODES))
            print(f"site up on R1 with data, clean rollout to R2 (the baselines): {time.monotonic() - began:.1f} s\n")
            print(f"{'trial':>5}  {'operation':<16} {'fault':<46} {'after':<24} {'consistent':>10} {'data':>5} "
                  f"{'frozen':>6} {'locks':>5} {'history':>7} {'s':>6}  outcome", flush=True)
            for i in range(1, args.trials + 1):
                on = site.current()
                where = set(on.values())
                trial = random_trial(rng, i, where.pop() if len(where) == 1 else "R1")
                try:
                    bring_to(site, trial.start)
                    result, said = soak_one(site, trial, baseline)
                except (FaultError, subprocess.TimeoutExpired) as e:
                    print(f"{trial.name:>5}  the trial could not run: {e}")
                    break
                results.append((result, said))
                c = result.checked
                print(f"{trial.name:>5}  {' '.join(trial.operation):<16} {trial.fault.describe():<46} {said:<24} "
                      f"{yes(not c.inconsistent):>10} {yes(not c.data):>5} {len(c.frozen):>6} {len(c.locks):>5} "
                      f"{yes(not c.history):>7} {result.seconds:>6.1f}  {result.outcome}", flush=True)
                for why in reasons(site, result):
                    print(f"{'':7}{why}", flush=True)
                if c.problems:
                    try:
                        bring_to(site, "R1")
                    except (FaultError, subprocess.TimeoutExpired) as e:
                        print(f"       the fleet could not be repaired, stopping: {e}")
                        break
        finally:
            kill_strays(site)
            site.destroy()
    n = len(results)
    if not n:
        return
    seconds = [r.seconds for r, _ in results]
    print(f"\ntrials                        {n}")
    print(f"consistent (one release each) {sum(not r.checked.inconsistent for r, _ in results)} of {n}")
    print(f"data identical                {sum(not r.checked.data for r, _ in results)} of {n}")
    print(f"frozen processes left         {sum(len(r.checked.frozen) for r, _ in results)}")
    print(f"locks left                    {sum(len(r.checked.locks) for r, _ in results)}")
    print(f"history complete              {sum(not r.checked.history for r, _ in results)} of {n}")
    print(f"recoveries that hung          {sum(r.recovery[0] == HUNG for r, _ in results)} "
          f"(killed after {RECOVERY_TIMEOUT:.0f} s)")
    print(f"faults that missed            {sum(not r.injected.hit for r, _ in results)}")
    print(f"seconds per trial             median {statistics.median(seconds):.1f}, max {max(seconds):.1f}, "
          f"total {sum(seconds):.1f}")


if __name__ == "__main__":
    main()
