#!/usr/bin/env python3
"""Rollout benchmark: per-node orchestration overhead of ``imageupdate rollout`` on the local site, Heat's memory.

The CLI as a user runs it (``.venv/bin/imageupdate rollout R --site DIR --batch-size B --json``), on sites of
3, 50 and 200 nodes, with batch sizes 1, 10 and 20, side by side in one run (``--nodes``, ``--batch-sizes``):

* wall: from starting the CLI until it exits (Python start-up, Heat look-ups and the whole watch included);
* node time: the time nodes spend swapping and testing, from the history (``SITE/history.sqlite``, table
  ``steps``): the nodes of a batch run in parallel, so node time = sum over batches of the slowest node's
  (rebuild seconds + gate seconds);
* overhead = wall - node time; per node = overhead / nodes changed. Targets: at most 0.3 s per node, the
  same (within 20 %) from the smallest site to the largest; 200 nodes at batch 20 in under 2 minutes;
* swap (rebuild) and gate median per node, and the checks the gate ran (``checks`` table) inside the gate;
* Heat's resident memory (VmRSS of the pid in ``SITE/heat/heat.json``) after each rollout, and per site
  before the first rollout and after the last (target: at most 300 MiB);
* CPU per node changed: Heat's, the CLI's (with the ssh clients it waited for), and the rest of the host's
  (the nodes' rebuilds, checks and workloads).

One site per node count: created once, one untimed warm-up rollout R1 -> R2 (it creates the stack, the
'adopt' operation, starts Heat and unpacks R2; with ``--start R2`` the site starts on R2 and the warm-up is
R2 -> R2b, without R1 -> R2's migration and rehearsal on every node: the choice for 200 nodes), then the
measured rollouts alternate R2 -> R2b -> R2 ... for
every batch size (R2b: sample-workload-v2 built under another id, so no rollout migrates or downgrades the
state: R2 -> R1 would need R2's contract migration undone, which a rollout refuses). With ``--no-warm-up`` the
first measured rollout creates the stack itself, and its wall time, Heat CPU and host CPU start at the adopt's
end (read from a sampler thread); a 200-node run takes half as long. The site is destroyed at
the end, whatever happens. A breakdown of the overhead follows the table: CLI start-up, planning and sending,
Heat starting the first rebuild, gaps inside and between batches, finishing, and exit.

It prints the code under test (git HEAD and uncommitted changes) and warns if the package's files change
during the run. A rollout that takes longer than ``--timeout`` is stopped; on any failure Heat's log, the
history and the site's status are copied to /tmp/iu-bench-rollout-logs-* before the site is destroyed.

Run as root from the checkout: ``.venv/bin/python bench/bench_rollout.py``. R1 and R2 must be in the store;
R2b is built into it if missing (about a minute).
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageupdate.images.store import ImageStore

ROOT = Path(__file__).resolve().parents[1]
TARGET_PER_NODE = 0.3  # seconds of overhead per node
TARGET_SPREAD = 0.2  # overhead per node may differ this much (relative) between the smallest and largest site
TARGET_RSS = 300.0  # MiB of Heat
DIVIDER = "-" * 143


class BenchError(Exception):
    """A command of the benchmark failed; the site is still destroyed."""


@dataclass(frozen=True)
class NodeSteps:
    node: str
    batch: int
    rebuild_started: float
    rebuild_finished: float
    gate_started: float
    gate_finished: float
    checks: float  # seconds the gate's checks took, summed

    @property
    def rebuild(self) -> float:
        return self.rebuild_finished - self.rebuild_started

    @property
    def gate(self) -> float:
        return self.gate_finished - self.gate_started


@dataclass(frozen=True)
class Run:
    nodes: int
    batch_size: int
    release: str
    rollout: int
    wall: float
    node_time: float
    changed: int
    batches: int
    rebuild_median: float
    gate_median: float
    checks_median: float
    heat_rss: float | None  # MiB, after the rollout
    # where the wall time went (seconds; they add up to the wall time with the spans of the batches)
    startup: float  # CLI start -> the rollout row exists (imports, site status, Heat and stack look-ups)
    send: float  # rollout row -> update sent (plan, history, template)
    first: float  # update sent -> first rebuild started (Heat takes the update, starts the first server)
    in_batch: float  # sum over batches of (span of the batch - its slowest node's rebuild + gate)
    between: float  # sum of the gaps from the last gate of a batch to the first rebuild of the next
    finish: float  # last gate seen complete -> rollout row finished
    exit: float  # rollout row finished -> CLI exited (result, node states, interpreter exit)
    gate_over_checks: float  # median over nodes of gate seconds - checks seconds (inside node time)
    checks_node_time: float  # node time with the gate counted as its checks only
    triggers: int  # leaves Heat's converge_stack triggered during the rollout (heat.log), a pause after each
    trigger_span: float  # seconds from the first to the last of them
    heat_cpu: float  # CPU seconds Heat used during the rollout (NaN if Heat restarted)
    host_busy: float  # % of the host's CPUs busy during the rollout (every process, other sessions' too)
    cli_cpu: float  # CPU seconds of the imageupdate CLI and the children it waited for (ssh, nsenter...)
    host_cpu_s: float  # CPU seconds the whole host was busy during the rollout

    @property
    def overhead(self) -> float:
        return self.wall - self.node_time

    @property
    def per_node(self) -> float:
        return self.overhead / self.changed if self.changed else float("nan")

    @property
    def per_node_checks_only(self) -> float:
        """Overhead per node when only the checks, not the whole gate step, count as node time."""
        return (self.wall - self.checks_node_time) / self.changed if self.changed else float("nan")


# the CLI -----------------------------------------------------------------------------------------


def cli_path() -> Path:
    for candidate in (Path(sys.executable).parent / "imageupdate", Path(__file__).resolve().parents[1] / ".venv"
                      / "bin" / "imageupdate"):
        if candidate.exists():
            return candidate
    sys.exit("bench_rollout.py: no imageupdate entry point next to the interpreter; run it with .venv/bin/python")


def imageupdate(cli: Path, *args: str, timeout: float | None = None) -> tuple[subprocess.CompletedProcess[str],
                                                                              float, float]:
    """Run the CLI; (process, epoch when started, wall seconds). Past the timeout: SIGTERM (the CLI stops as
    on ^C), then SIGKILL."""
    started = time.time()
    t0 = time.monotonic()
    with subprocess.Popen([str(cli), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.terminate()
            try:
                out, err = child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                out, err = child.communicate()
            raise BenchError(f"imageupdate {' '.join(args)} did not finish within {timeout:.0f} s; stopped it:\n"
                             f"{err[-2000:]}") from None
    wall = time.monotonic() - t0
    return subprocess.CompletedProcess(child.args, child.returncode, out, err), started, wall


def checked(cli: Path, *args: str, timeout: float | None = None) -> tuple[dict[str, Any], float, float]:
    proc, started, wall = imageupdate(cli, *args, "--json", timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"imageupdate {' '.join(args)} exited with {proc.returncode}:\n"
                         f"{proc.stderr[-2000:]}{proc.stdout[-1000:]}")
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except ValueError as e:
        raise BenchError(f"imageupdate {' '.join(args)} printed no JSON document: {proc.stdout[-500:]!r}") from e
    return doc, started, wall


def code_state() -> tuple[str, str]:
    """What code the CLI runs: (description, fingerprint of the package's files as they are on disk)."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return proc.stdout if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    paths = ("imageupdate", "heat_templates", "elements")
    changed = sorted(line[3:] for line in git("status", "--porcelain", "--", *paths).splitlines())
    said = f"git {head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else ", clean")
    digest = hashlib.sha256()
    for name in sorted(git("ls-files", "-co", "--exclude-standard", "--", *paths).splitlines()):
        digest.update(name.encode())
        with contextlib.suppress(OSError):
            digest.update((ROOT / name).read_bytes())
    return said, digest.hexdigest()


# Heat ------------------------------------------------------------------------------------------


def heat_pid(site: Path) -> int | None:
    try:
        pid = int(json.loads((site / "heat" / "heat.json").read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError):
        return None
    return pid if b"imageupdate.heat.server" in cmdline else None


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the host from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


class Sampler:
    """Heat's pid and CPU seconds and the host's jiffies every half second, in a thread: with no warm-up the
    first measured rollout starts Heat and creates the stack (the 'adopt' operation) before it rolls out, and
    its figures are taken from the sample at the adopt's end."""

    def __init__(self, site: Path) -> None:
        self.site = site
        self.samples: list[tuple[float, int | None, float | None, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = heat_pid(self.site)
            busy, total = host_cpu()
            self.samples.append((time.time(), pid, cpu_seconds(pid), busy, total))
            self._stop.wait(0.5)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, when: float) -> tuple[float, int | None, float | None, int, int]:
        """The first sample at or after ``when`` (the last one if none)."""
        return next((x for x in self.samples if x[0] >= when), self.samples[-1])


def adopt_finished(site: Path, before: int) -> float | None:
    """When the newest 'adopt' operation older than rollout ``before`` finished (epoch), if there is one."""
    con = sqlite3.connect(site / "history.sqlite", timeout=30)
    try:
        row = con.execute("SELECT finished FROM rollouts WHERE kind = 'adopt' AND id < ? ORDER BY id DESC LIMIT 1",
                          (before,)).fetchone()
    finally:
        con.close()
    return float(row[0]) if row and row[0] is not None else None


def mib(value: float | None) -> str:
    return "not running" if value is None else f"{value:.0f} MiB"


def heat_triggers(site: Path, start: float, end: float) -> tuple[int, float]:
    """Leaf resources Heat's convergence engine triggered between start and end (epoch), from its log lines
    "YYYY-MM-DD HH:MM:SS.mmm ... Triggering resource N for update|cleanup"; (count, first to last seconds)."""
    times: list[float] = []
    try:
        text = (site / "heat" / "heat.log").read_text(errors="replace")
    except OSError:
        return 0, 0.0
    for line in text.splitlines():
        if "Triggering resource" not in line:
            continue
        try:
            at = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + float(line[19:23])
        except ValueError:
            continue
        if start <= at <= end:
            times.append(at)
    return len(times), (max(times) - min(times)) if times else 0.0


# the history -----------------------------------------------------------------------------------


def read_history(site: Path, rid: int) -> tuple[sqlite3.Row, list[NodeSteps]]:
    con = sqlite3.connect(site / "history.sqlite", timeout=30)
    con.row_factory = sqlite3.Row
    try:
        row = con.execute("SELECT started, sent, finished, status FROM rollouts WHERE id = ?", (rid,)).fetchone()
        steps = con.execute("SELECT node, batch, step, status, started, finished FROM steps WHERE rollout = ?",
                            (rid,)).fetchall()
        checks = {r["node"]: float(r["s"]) for r in con.execute(
            "SELECT node, SUM(seconds) AS s FROM checks WHERE rollout = ? GROUP BY node", (rid,))}
    finally:
        con.close()
    if row is None:
        raise BenchError(f"rollout {rid} is not in {site / 'history.sqlite'}")
    by_node: dict[str, dict[str, sqlite3.Row]] = {}
    for s in steps:
        by_node.setdefault(s["node"], {})[s["step"]] = s
    out: list[NodeSteps] = []
    for node, st in sorted(by_node.items()):
        rebuild, gate = st.get("rebuild"), st.get("gate")
        if rebuild is None or gate is None or rebuild["status"] != "succeeded" or gate["status"] != "succeeded" \
                or None in (rebuild["started"], rebuild["finished"], gate["started"], gate["finished"]):
            seen = {k: dict(v) for k, v in st.items()}
            raise BenchError(f"rollout {rid}: {node} has no complete rebuild and gate steps ({seen})")
        out.append(NodeSteps(node, int(rebuild["batch"]), float(rebuild["started"]), float(rebuild["finished"]),
                             float(gate["started"]), float(gate["finished"]), checks.get(node, 0.0)))
    return row, out


def analyse(site: Path, nodes: int, batch_size: int, release: str, rid: int, started: float, wall: float,
            rss: float | None, heat_cpu: float, host_busy: float, cli_cpu: float, host_cpu_s: float) -> Run:
    row, steps = read_history(site, rid)
    batches: dict[int, list[NodeSteps]] = {}
    for s in steps:
        batches.setdefault(s.batch, []).append(s)
    order = [batches[k] for k in sorted(batches)]
    node_time = sum(max(s.rebuild + s.gate for s in b) for b in order)
    spans = [(min(s.rebuild_started for s in b), max(s.gate_finished for s in b)) for b in order]
    in_batch = sum(end - start for start, end in spans) - node_time
    between = sum(spans[k + 1][0] - spans[k][1] for k in range(len(spans) - 1))
    ended = started + wall
    triggers, trigger_span = heat_triggers(site, started, ended)
    sent = float(row["sent"] or row["started"])
    finished = float(row["finished"] or ended)
    return Run(
        nodes=nodes, batch_size=batch_size, release=release, rollout=rid, wall=wall, node_time=node_time,
        changed=len(steps), batches=len(order),
        rebuild_median=statistics.median(s.rebuild for s in steps),
        gate_median=statistics.median(s.gate for s in steps),
        checks_median=statistics.median(s.checks for s in steps),
        heat_rss=rss,
        startup=float(row["started"]) - started, send=sent - float(row["started"]), first=spans[0][0] - sent,
        in_batch=in_batch, between=between, finish=finished - spans[-1][1], exit=ended - finished,
        gate_over_checks=statistics.median(s.gate - s.checks for s in steps),
        checks_node_time=sum(max(s.rebuild + s.checks for s in b) for b in order),
        triggers=triggers, trigger_span=trigger_span, heat_cpu=heat_cpu, host_busy=host_busy, cli_cpu=cli_cpu,
        host_cpu_s=host_cpu_s,
    )


# one site --------------------------------------------------------------------------------------


@dataclass
class SiteMemory:
    nodes: int
    before: float | None  # before the warm-up rollout
    warm: float | None  # after the warm-up rollout (before the first measured one)
    after: float | None  # after the last rollout
    up_seconds: float
    warmup_seconds: float


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rollout(cli: Path, site: Path, store: Path, release: str, batch_size: int,
            timeout: float) -> tuple[int, float, float, float]:
    """(rollout id, epoch started, wall seconds, CPU seconds of the CLI and the children it waited for)."""
    cpu = children_cpu()
    doc, started, wall = checked(cli, "rollout", release, "--site", str(site), "--store", str(store),
                                 "--batch-size", str(batch_size), timeout=timeout)
    if doc.get("status") != "succeeded":
        raise BenchError(f"rollout to {release} ended {doc.get('status')}: {doc.get('reason')}")
    return int(doc["rollout"]["id"]), started, wall, children_cpu() - cpu


def keep_logs(cli: Path, site: Path, store: Path, nodes: int) -> Path:
    """After a failure, before the site goes: Heat's logs, the history and the site's status, kept in /tmp."""
    keep = Path(tempfile.mkdtemp(prefix=f"iu-bench-rollout-logs-{nodes}-", dir="/tmp"))
    for name in ("heat/heat.log", "heat/server.log", "history.sqlite", "history.sqlite-wal"):
        if (site / name).exists():
            shutil.copy2(site / name, keep / Path(name).name)
    proc, _, _ = imageupdate(cli, "status", "--site", str(site), "--store", str(store), "--json", timeout=120)
    (keep / "status.json").write_text(proc.stdout + proc.stderr)
    return keep


def bench_site(cli: Path, store: Path, nodes: int, batch_sizes: list[int], repeat: int, timeout: float,
               runs: list[Run], memory: list[SiteMemory], twin: str, start: str, warm_up: bool = True) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"iu-bench-rollout-{nodes}-", dir="/tmp"))
    site = tmp / "site"
    pid: int | None = None
    try:
        say(f"{nodes} nodes: site up in {site} ...")
        _, _, up = checked(cli, "site", "up", "--nodes", str(nodes), "--release", start, "--site", str(site),
                           "--store", str(store))
        before = rss_mib(heat_pid(site))
        current = start if not warm_up else "R2" if start == "R1" else twin
        if warm_up:
            say(f"{nodes} nodes: up in {up:.1f} s; warm-up rollout {start} -> {current} (creates the stack, "
                "starts Heat) ...")
            _, _, warm_wall, _ = rollout(cli, site, store, current, max(batch_sizes), timeout)
        else:
            say(f"{nodes} nodes: up in {up:.1f} s; no warm-up: the first rollout creates the stack first")
            warm_wall = 0.0
        pid = heat_pid(site)
        mem = SiteMemory(nodes, before, rss_mib(pid), None, up, warm_wall)
        memory.append(mem)
        runs_here = 0
        for batch_size in batch_sizes:
            for i in range(repeat):
                release = twin if current == "R2" else "R2"
                say(f"{nodes} nodes, batch {batch_size}, run {i + 1}/{repeat}: rollout {current} -> {release} ...")
                cpu0, host0 = cpu_seconds(pid), host_cpu()
                makes_stack = not warm_up and not runs_here
                sampler = Sampler(site) if makes_stack else None  # only the rollout that makes the stack needs it
                with sampler or contextlib.nullcontext():
                    rid, started, wall, cli_cpu = rollout(cli, site, store, release, batch_size, timeout)
                cpu1, host1 = cpu_seconds(pid), host_cpu()
                heat_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None and heat_pid(site) == pid \
                    else float("nan")
                adopted = adopt_finished(site, rid) if sampler is not None else None
                if sampler is not None and adopted is not None and adopted > started:  # it made the stack
                    _, spid, scpu, sbusy, stotal = sampler.at(adopted)
                    pid = heat_pid(site)
                    cpu1 = cpu_seconds(pid)
                    heat_cpu = cpu1 - scpu if spid == pid and scpu is not None and cpu1 is not None \
                        else float("nan")
                    host0 = (sbusy, stotal)
                    say(f"  the stack took {adopted - started:.1f} s (CLI start to the adopt's end): left out "
                        "of the wall time, Heat CPU and host CPU below (not of imageupdate CPU)")
                    wall, started = started + wall - adopted, adopted
                busy = 100 * (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
                busy_s = (host1[0] - host0[0]) / os.sysconf("SC_CLK_TCK")
                current = release
                pid = heat_pid(site) or pid
                run = analyse(site, nodes, batch_size, release, rid, started, wall, rss_mib(pid), heat_cpu, busy,
                              cli_cpu, busy_s)
                runs.append(run)
                runs_here += 1
                mem.after = run.heat_rss
                say(f"  wall {run.wall:.1f} s, node time {run.node_time:.1f} s, overhead {run.overhead:.1f} s "
                    f"({run.per_node:.2f} s per node), Heat {mib(run.heat_rss)}, Heat CPU {run.heat_cpu:.1f} s, "
                    f"imageupdate CPU {run.cli_cpu:.1f} s, host CPU {run.host_busy:.0f} % busy")
    except BenchError as e:
        try:
            kept = keep_logs(cli, site, store, nodes)
        except (OSError, BenchError) as keeping:
            raise BenchError(f"{e}\n(keeping the logs failed too: {keeping})") from None
        raise BenchError(f"{e}\n(Heat's log, the history and the site status are kept in {kept})") from None
    finally:
        say(f"{nodes} nodes: site destroy ...")
        deadline = time.monotonic() + 180
        while True:  # a rebuild Heat started for a stopped rollout holds the site until it ends
            proc, _, _ = imageupdate(cli, "site", "destroy", "--force", "--site", str(site), "--store", str(store),
                                     "--json", timeout=600)
            if proc.returncode == 0 or "in use" not in proc.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        if proc.returncode != 0:
            print(f"bench_rollout.py: site destroy {site} failed ({proc.returncode}): {proc.stderr[-1000:]}",
                  file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if pid is not None and Path(f"/proc/{pid}").exists() and b"imageupdate.heat.server" in \
                Path(f"/proc/{pid}/cmdline").read_bytes():
            print(f"bench_rollout.py: Heat {pid} of {site} still runs after site destroy", file=sys.stderr)


# report ----------------------------------------------------------------------------------------


def cell(runs: list[Run]) -> dict[str, float]:
    """Median over the repeats of a cell, field by field (Heat RSS: after the cell's last rollout)."""
    fields = ("wall", "node_time", "overhead", "per_node", "rebuild_median", "gate_median", "checks_median",
              "startup", "send", "first", "in_batch", "between", "finish", "exit", "gate_over_checks",
              "per_node_checks_only", "triggers", "trigger_span", "heat_cpu", "host_busy", "cli_cpu", "host_cpu_s")
    out = {f: statistics.median(float(getattr(r, f)) for r in runs) for f in fields}
    out["changed"] = float(runs[-1].changed)
    out["batches"] = float(runs[-1].batches)
    rss = runs[-1].heat_rss
    out["heat_rss"] = float("nan") if rss is None else rss
    return out


def fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def report(runs: list[Run], memory: list[SiteMemory], repeat: int) -> None:
    cells: dict[tuple[int, int], list[Run]] = {}
    for r in runs:
        cells.setdefault((r.nodes, r.batch_size), []).append(r)
    stats = {k: cell(v) for k, v in cells.items()}
    what = "median of " + str(repeat) + " rollouts" if repeat > 1 else "one rollout"
    print(f"\nrollout overhead, {what} per cell (CLI wall time; node time = sum over batches of the slowest node's "
          "rebuild + gate)")
    print(DIVIDER)
    print(f"{'nodes':>5} {'batch':>5} {'batches':>7} {'wall s':>8} {'node time s':>11} {'overhead s':>10} "
          f"{'per node s':>10} {'target':>6} {'swap med s':>10} {'gate med s':>10} {'checks med s':>12} "
          f"{'Heat RSS MiB':>12}")
    for (nodes, batch), s in stats.items():
        ok = "ok" if s["per_node"] <= TARGET_PER_NODE else "OVER"
        print(f"{nodes:5d} {batch:5d} {s['batches']:7.0f} {s['wall']:8.1f} {s['node_time']:11.1f} "
              f"{s['overhead']:10.1f} {s['per_node']:10.2f} {ok:>6} {s['rebuild_median']:10.2f} "
              f"{s['gate_median']:10.2f} {s['checks_median']:12.2f} {s['heat_rss']:12.0f}")
    print(f"target: at most {TARGET_PER_NODE} s of overhead per node, whatever the fleet's size")
    if repeat > 1:
        for (nodes, batch), rs in cells.items():
            print(f"  {nodes} nodes, batch {batch}: overhead per node per run "
                  + ", ".join(f"{r.per_node:.2f}" for r in rs) + " s")

    print("\nscale: what a node step costs as the fleet grows, per node changed (CPU: seconds of CPU over the rollout "
          "/ nodes changed)")
    print(DIVIDER)
    print(f"{'nodes':>5} {'batch':>5} {'wall s':>8} {'step s':>7} {'overhead s':>10} {'Heat CPU s':>10} "
          f"{'imageupdate CPU s':>17} {'nodes+rest CPU s':>16} {'host CPU %':>10} {'Heat RSS MiB':>12}")
    for (nodes, batch), s in stats.items():
        n = s["changed"] or float("nan")
        rest = s["host_cpu_s"] - s["cli_cpu"] - (0.0 if s["heat_cpu"] != s["heat_cpu"] else s["heat_cpu"])
        print(f"{nodes:5d} {batch:5d} {s['wall']:8.1f} {s['wall'] / n:7.2f} {s['per_node']:10.2f} "
              f"{s['heat_cpu'] / n:10.2f} {s['cli_cpu'] / n:17.2f} {rest / n:16.2f} {s['host_busy']:10.0f} "
              f"{s['heat_rss']:12.0f}")
    print("step: wall / nodes changed; overhead: (wall - node time) / nodes changed; imageupdate CPU: the CLI and\n"
          "the children it waited for (ssh to the nodes); nodes+rest: every other busy CPU second of the host (the\n"
          "nodes' rebuilds, checks and workloads, the probe's targets, other processes)")
    print("\ntargets")
    print(DIVIDER)
    for batch in sorted({b for _, b in stats}):
        sizes = sorted(n for n, b in stats if b == batch)
        worst = max(stats[(n, batch)]["per_node"] for n in sizes)
        verdict = f"  batch {batch}: overhead per node at most {TARGET_PER_NODE} s: {worst:.2f} s " \
                  f"{'ok' if worst <= TARGET_PER_NODE else 'OVER'}"
        if len(sizes) > 1:
            small, large = stats[(sizes[0], batch)]["per_node"], stats[(sizes[-1], batch)]["per_node"]
            spread = abs(large - small) / small if small > 0 else float("inf")
            verdict += (f"; {sizes[0]} -> {sizes[-1]} nodes: {small:.2f} -> {large:.2f} s ({spread:+.0%}, within "
                        f"{TARGET_SPREAD:.0%}: {'ok' if spread <= TARGET_SPREAD else 'OVER'})")
        print(verdict)
    if (200, 20) in stats:
        wall = stats[(200, 20)]["wall"]
        print(f"  200 nodes at batch 20 in under 120 s: {wall:.1f} s {'ok' if wall < 120 else 'OVER'}")
    rss = max((s["heat_rss"] for s in stats.values() if s["heat_rss"] == s["heat_rss"]), default=float("nan"))
    print(f"  Heat RSS at most {TARGET_RSS:.0f} MiB: {rss:.0f} MiB {'ok' if rss <= TARGET_RSS else 'OVER'}")

    print("\nlinearity: overhead = a + b x nodes (least squares over the node counts), per batch size")
    for batch in sorted({b for _, b in stats}):
        points = [(s["changed"], s["overhead"]) for (_, b), s in stats.items() if b == batch]
        line = fit(points)
        per = ", ".join(f"{int(n)} nodes {o / n:.2f}" for n, o in points)
        said = f"a = {line[0]:+.1f} s, b = {line[1]:.2f} s per node" if line else "(one node count only)"
        print(f"  batch {batch}: {said}; per node: {per} s")
    print("per batch: overhead / batches  " + ", ".join(
        f"{n}x{b}: {s['overhead'] / s['batches']:.2f} s" for (n, b), s in stats.items()))

    print("\nwhere the overhead goes (s; startup + send + first + in-batch + between + finish + exit = overhead)")
    print(DIVIDER)
    print(f"{'nodes':>5} {'batch':>5} {'startup':>8} {'send':>6} {'first':>6} {'in-batch':>8} {'between':>8} "
          f"{'per gap':>8} {'finish':>7} {'exit':>6} {'gate-checks med':>15} {'per node*':>9} "
          f"{'Heat leaves':>11} {'span s':>6} {'Heat CPU s':>10} {'host CPU %':>10}")
    for (nodes, batch), s in stats.items():
        gaps = s["batches"] - 1
        per_gap = f"{s['between'] / gaps:8.2f}" if gaps else f"{'-':>8}"
        print(f"{nodes:5d} {batch:5d} {s['startup']:8.2f} {s['send']:6.2f} {s['first']:6.2f} {s['in_batch']:8.2f} "
              f"{s['between']:8.2f} {per_gap} {s['finish']:7.2f} {s['exit']:6.2f} {s['gate_over_checks']:15.2f} "
              f"{s['per_node_checks_only']:9.2f} {s['triggers']:11.0f} {s['trigger_span']:6.1f} "
              f"{s['heat_cpu']:10.1f} {s['host_busy']:10.0f}")
    print("startup: CLI start -> rollout recorded; send: -> update sent to Heat; first: -> first rebuild started;\n"
          "in-batch: batch spans beyond their slowest node; between: last gate of a batch seen complete -> first\n"
          "rebuild of the next; finish: last gate -> rollout finished; exit: -> CLI exited. gate-checks: the part\n"
          "of a node's gate step (counted as node time) not spent in its checks: listing the tests over SSH,\n"
          "the 0.2 s poll, the signal, Heat's step. per node*: overhead per node if only the checks counted as\n"
          "node time. Heat leaves: resources Heat's converge_stack triggered (heat.log), with a pause after each\n"
          "(1 s in stock Heat), over span s: a node's gate cannot start before its handle is triggered.\n"
          f"Heat CPU: CPU seconds of the Heat process during the rollout; host CPU: all {os.cpu_count()} CPUs, "
          "every process on the host.")

    print("\nHeat resident memory per site (VmRSS)")
    print(DIVIDER)
    for m in memory:
        warm = (f"after the warm-up {mib(m.warm)}, " if m.warmup_seconds else "")
        took = f", warm-up rollout {m.warmup_seconds:.1f} s" if m.warmup_seconds else ", no warm-up"
        print(f"{m.nodes:3d} nodes: before the first rollout {mib(m.before)}, {warm}after the last {mib(m.after)}  "
              f"(site up {m.up_seconds:.1f} s{took})")


TWIN = "R2b"  # the measured rollouts alternate R2 and this: the same workload and state version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/var/lib/imageupdate/images"))
    ap.add_argument("--nodes", type=int, nargs="+", default=[3, 50, 200], help="node counts (one site each)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 20])
    ap.add_argument("--start", choices=("R1", "R2"), default="R1",
                    help="the release sites start on (R2: the warm-up rolls out the twin, no migration)")
    ap.add_argument("--twin", default=TWIN,
                    help=f"the release the measured rollouts alternate with R2 (default {TWIN}, built if missing; "
                         "with one measured rollout per site any release R2 may roll out to will do)")
    ap.add_argument("--repeat", type=int, default=1, help="measured rollouts per cell (median is reported)")
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                    help="no untimed warm-up rollout: the first measured rollout creates the stack, and its "
                         "figures start at the adopt's end (halves a 200-node run)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a rollout may take before it is stopped (default 600 + 30 per node)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_rollout.py needs root")
    if args.repeat < 1 or min(args.batch_sizes) < 1 or min(args.nodes) < 1:
        sys.exit("bench_rollout.py: --repeat, --batch-sizes and --nodes must be at least 1")
    store = ImageStore(args.store)
    missing = [r for r in ("R1", "R2") if not store.exists(r)]
    if missing:
        sys.exit(f"bench_rollout.py: {', '.join(missing)} not in {args.store}; build them first "
                 "(bench/bench_site.py does)")
    cli = cli_path()
    if not store.exists(args.twin):
        if args.twin != TWIN:
            sys.exit(f"bench_rollout.py: {args.twin} is not in {args.store}")
        say(f"building {TWIN} (sample-workload-v2 under another id) ...")
        try:
            checked(cli, "build", TWIN, "--element", "sample-workload-v2", "--store", str(args.store))
        except BenchError as e:
            sys.exit(f"bench_rollout.py: {e}")
    code, fingerprint = code_state()
    print(f"code under test: {code}")
    runs: list[Run] = []
    memory: list[SiteMemory] = []
    failed: str | None = None
    try:
        for nodes in args.nodes:
            # a 200-node rollout at batch 20 took 48 minutes (about 5 a batch) and 3.4 more to create the stack:
            # 120 + 15 per node stopped it in its last batch
            timeout = args.timeout or 600.0 + 30.0 * nodes
            bench_site(cli, args.store, nodes, args.batch_sizes, args.repeat, timeout, runs, memory, args.twin,
                       args.start, args.warm_up)
    except BenchError as e:
        failed = str(e)
    if runs:
        report(runs, memory, args.repeat)
    if code_state()[1] != fingerprint:
        print(f"\nWARNING: the package's files changed during the run (now {code_state()[0]}): rollouts before and "
              "after the change ran different code")
    if failed:
        sys.exit(f"bench_rollout.py: {failed}")


if __name__ == "__main__":
    main()
