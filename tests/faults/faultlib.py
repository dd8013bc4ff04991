"""Faults injected into a rollout or a rollback on a local site, and what must hold after the recovery.

Shared by the fault-matrix tests (``tests/faults``) and the soak benchmark (``bench/bench_soak.py``); it
drives the CLI as an operator would (``python -m imageupdate ... --json``) and reads the site's files.

A fault, by kind:

* ``imageupdate``: the orchestrator is SIGKILLed at a crashpoint (``IMAGEUPDATE_BREAK=POINT`` in its
  environment only: the site's Heat is started beforehand without it, so neither Heat nor the
  ``site rebuild`` children Heat starts inherit it);
* ``heat``: the site's Heat is SIGKILLed once the history shows a node's step running;
* ``rebuild``: the ``imageupdate site rebuild NODE ... --by-heat`` child of Heat is SIGKILLed once the node
  has recorded its intent (``node.json`` has a pending release): the node is mid-rebuild;
* ``node``: the node's init (its PID namespace) is SIGKILLed as soon as its gate is running.

What must hold after the recovery (``check``): every node on exactly one complete release, running, not
paused (``site status``), and no second instance of it (``strays``); its state version the one its release
runs on; its state as it was on that release (``state_digest``, compared with a baseline taken on a clean
run); no process of a node tree stopped (``/proc/PID/stat`` state T or t); no lock held (each lock file can be
flock'ed LOCK_EX|LOCK_NB); no operation open and every operation of the trial closed, each node it touched
with a finished rebuild done by that operation and, after a rebuild that succeeded, a gate with a verdict; an
operation that succeeded with every gate passed; each node that changed release gated there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the state version each release runs on (elements/sample-workload-v*/static/usr/share/imageupdate/upgrade.json)
STATE_VERSION = {"R1": 1, "R2": 2, "R3": 3, "R4": 4}

# What is not the workload's data on a node's state partition (elements/sample-workload*):
# * var/log/: service and sshd logs (the init writes them under /mnt/state/var/log);
# * imageupdate/: the state journal (state.json: version, every migration, snapshot and restore with
#   their times), written by imageupdate; its version is checked on its own;
# * files the workload writes and renames or removes as it goes: data.json.tmp (format 1 writes
#   atomically), data.db.tmp (the 0002 migration), SQLite's -journal, -wal and -shm files.
EXCLUDED_DIRS = ("var/log", "imageupdate")
VOLATILE_SUFFIXES = (".tmp", "-journal", "-wal", "-shm")
SQLITE_MAGIC = b"SQLite format 3\x00"

FINAL_GATE = {"succeeded", "failed", "timed-out", "cancelled"}
OPEN = {"running", "paused"}


class FaultError(AssertionError):
    """A trial could not be carried out as planned (a command failed, a trigger never came)."""


# running the CLI -------------------------------------------------------------------------------------------

def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IMAGEUPDATE_BREAK"}
    env.update(extra or {})
    return env


@dataclass
class Site:
    """A local site driven through the CLI."""

    path: Path
    store: Path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "imageupdate", *args, "--site", str(self.path), "--store", str(self.store),
                "--json"]

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, env=clean_env(env),
                              timeout=timeout, check=False)

    def ok(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
        proc = self.run(*args, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise FaultError(f"imageupdate {' '.join(args)} exited {proc.returncode}: {proc.stderr[-1500:]}")
        return doc(proc)

    def background(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=clean_env(env), stdin=subprocess.DEVNULL)

    # the site ------------------------------------------------------------------------------------------------

    def up(self, nodes: int, release: str) -> None:
        self.ok("site", "up", "--nodes", str(nodes), "--release", release)

    def destroy(self) -> None:
        self.run("site", "destroy", "--force", timeout=300)

    def heat_start(self, env: dict[str, str] | None = None) -> int:
        """Start the site's Heat (a no-op if it runs) with this process's environment plus ``env`` only."""
        return int(self.ok("heat", "start", env=env)["pid"])

    def heat_stop(self) -> None:
        self.ok("heat", "stop")

    def heat_pid(self) -> int | None:
        found = self.ok("heat", "status")
        return int(found["pid"]) if found.get("running") and found.get("pid") else None

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.ok("site", "status")["nodes"])

    def status(self) -> dict[str, Any]:
        return self.ok("status")

    def releases(self) -> dict[str, str]:
        return {n["name"]: n["current"] for n in self.nodes()}

    def current(self) -> dict[str, str]:
        """The release each node is on, from its ``node.json`` (no CLI: cheap between trials)."""
        return {n: str(self.node_record(n).get("current")) for n in self.node_names()}

    def whole(self) -> bool:
        """Every node's ``node.json`` without a pending release and its init alive (no CLI)."""
        recs = [self.node_record(n) for n in self.node_names()]
        return all(not r.get("pending") and isinstance(r.get("pid"), int) and alive(r["pid"]) for r in recs)

    def open_operation(self) -> bool:
        return bool(self.query("SELECT 1 FROM rollouts WHERE status IN ('running', 'paused')"))

    def heat_running(self) -> int | None:
        """Heat's pid if it runs (from ``SITE/heat/heat.json``), without asking the CLI."""
        try:
            pid = int(json.loads((self.path / "heat" / "heat.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None
        return pid if alive(pid) else None

    def node_record(self, node: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.path / "nodes" / node / "node.json").read_text()))
        except (OSError, ValueError):
            return {}

    # the history ---------------------------------------------------------------------------------------------

    def query(self, sql: str, *args: object) -> list[sqlite3.Row]:
        db_path = self.path / "history.sqlite"
        if not db_path.exists():
            return []
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
        try:
            db.row_factory = sqlite3.Row
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        finally:
            db.close()

    def last_operation(self) -> int:
        rows = self.query("SELECT MAX(id) AS id FROM rollouts")
        return int(rows[0]["id"] or 0) if rows else 0

    def operations(self, after: int) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM rollouts WHERE id > ? ORDER BY id", after)

    def steps(self, rollout: int) -> dict[tuple[str, str], sqlite3.Row]:
        return {(r["node"], r["step"]): r for r in self.query("SELECT * FROM steps WHERE rollout = ?", rollout)}

    def step_running(self, after: int, node: str, step: str) -> bool:
        return bool(self.query("SELECT 1 FROM steps WHERE rollout > ? AND node = ? AND step = ? AND status = "
                               "'running'", after, node, step))

    # the workload's data ------------------------------------------------------------------------------------

    def write_data(self, keys: int = 10) -> None:
        import urllib.request

        for n in self.nodes():
            for i in range(keys):
                req = urllib.request.Request(f"http://{n['address']}:8080/kv/key{i}",
                                             data=f"{n['name']} value {i}".encode(), method="PUT")
                urllib.request.urlopen(req, timeout=10).close()

    def digests(self) -> dict[str, dict[str, str]]:
        return {n: state_digest(self.path / "nodes" / n / "state") for n in self.node_names()}

    def node_names(self) -> list[str]:
        return sorted(p.name for p in (self.path / "nodes").iterdir() if (p / "node.json").exists())

    def state_version(self, node: str) -> int | None:
        try:
            return int(json.loads((self.path / "nodes" / node / "state/imageupdate/state.json").read_text())["version"])
        except (OSError, ValueError, KeyError):
            return None


def doc(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        found = json.loads(proc.stdout)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


# state, processes, locks --------------------------------------------------------------------------------------

def _sqlite_content(path: Path) -> str:
    """What an SQLite file holds (schema and rows, as ``.dump`` prints them), not its bytes: a gate's
    round-trip test writes and deletes a row, which changes the file's pages and change counter."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        h = hashlib.sha256()
        for line in db.iterdump():
            h.update(line.encode() + b"\n")
        return "sqlite:" + h.hexdigest()
    finally:
        db.close()


def state_digest(state: Path) -> dict[str, str]:
    """Each entry of a node's state partition (type, mode, owner and content) but logs, the state journal and
    volatile files, by path relative to it."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(state):
        rel_dir = os.path.relpath(dirpath, state)
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.normpath(os.path.join(rel_dir, d)) not in EXCLUDED_DIRS)
        for name in sorted(dirnames) + sorted(filenames):
            if name.endswith(VOLATILE_SUFFIXES):
                continue
            full = Path(dirpath) / name
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = full.lstat()
            meta = f"{stat.filemode(st.st_mode)} {st.st_uid}:{st.st_gid}"
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"{meta} -> {os.readlink(full)}"
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    head = f.read(16)
                if head == SQLITE_MAGIC:
                    out[rel] = f"{meta} {_sqlite_content(full)}"
                else:
                    out[rel] = f"{meta} {hashlib.sha256(full.read_bytes()).hexdigest()}"
            else:
                out[rel] = meta
    return out


def digest_diff(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    return sorted({p for p in set(expected) | set(found) if expected.get(p) != found.get(p)})


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw.rsplit(b")", 1)[-1].decode("ascii", errors="replace").split()
    return fields if len(fields) >= 2 else None


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (state letter, parent pid) of every process on the host."""
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (fields := _stat_fields(int(p.name))) is not None:
            out[int(p.name)] = (fields[0], int(fields[1]))
    return out


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def frozen_processes(site: Site) -> list[str]:
    """Processes of the site's node trees (each node's init and its descendants, and any process whose
    command line names the site: rebuilds, migration sandboxes, Heat) that are stopped (state T or t)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (_state, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    roots = {int(rec["pid"]) for n in site.node_names() if (rec := site.node_record(n)).get("pid")}
    roots |= {pid for pid in table if str(site.path) in cmdline(pid)}
    seen: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(children.get(p, []))
    return [f"process {p} ({table[p][0]}): {cmdline(p)[:100]}" for p in sorted(seen)
            if p in table and table[p][0] in ("T", "t")]


@dataclass(frozen=True)
class Stray:
    node: str
    pid: int  # the stray instance's init (its PID namespace dies with it)
    wrapper: int  # the boot wrapper (unshare) that started it
    release: str
    recorded: object  # the pid node.json records

    def __str__(self) -> str:
        return (f"{self.node}: a second instance, pid {self.pid} on {self.release}, not the one node.json records "
                f"({self.recorded})")


def strays(site: Site) -> list[Stray]:
    """Node processes the site does not know: a process chrooted into ``SITE/nodes/NODE/root`` outside the tree
    of the init ``node.json`` records (a second instance of the node, e.g. started by a rebuild killed before it
    recorded the pid), each with the release its boot wrapper mounted."""
    table = _processes()
    roots = {str(site.path / "nodes" / n / "root"): n for n in site.node_names()}
    members: dict[str, set[int]] = {n: set() for n in roots.values()}
    for pid in table:
        try:
            node = roots.get(os.readlink(f"/proc/{pid}/root"))
        except OSError:
            continue
        if node is not None and table[pid][0] not in ("Z", "X"):
            members[node].add(pid)
    children: dict[int, list[int]] = {}
    for pid, (_state, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = []
    for node, pids in members.items():
        init = site.node_record(node).get("pid")
        tree: set[int] = set()
        todo = [init] if isinstance(init, int) else []
        while todo:
            p = todo.pop()
            if p not in tree:
                tree.add(p)
                todo.extend(children.get(p, []))
        for p in sorted(pids - tree):
            if table[p][1] in pids:
                continue  # a child of a stray one: goes with it
            wrapper = table[p][1]
            release = next((Path(w).name for w in cmdline(wrapper).split() if "/releases/" in w), "?")
            found.append(Stray(node, p, wrapper, release, init))
    return found


def stray_nodes(site: Site) -> list[str]:
    return [str(x) for x in strays(site)]


def kill_strays(site: Site) -> list[str]:
    """SIGKILL every stray node instance (nothing of the product stops them: not the next rebuild, not ``site
    down`` nor ``site destroy``); what was killed."""
    found = strays(site)
    for x in found:
        kill(x.pid)
        if "node-boot" in cmdline(x.wrapper):
            kill(x.wrapper)
    return [str(x) for x in found]


def lock_files(site: Site) -> list[Path]:
    found = [site.path / "rollout.lock", site.path / ".lock", site.path / "upgrade" / "migrate.lock"]
    found += sorted((site.path / "nodes").glob("*/.lock"))
    return [p for p in found if p.exists()]


def held_locks(site: Site) -> list[str]:
    """Lock files some process holds (they cannot be flock'ed LOCK_EX|LOCK_NB), with what they say."""
    held = []
    for p in lock_files(site):
        fd = os.open(p, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            held.append(f"{p.relative_to(site.path)} held ({p.read_text().strip()[:120]})")
        finally:
            os.close(fd)
    return held


# the checks ------------------------------------------------------------------------------------------------------

@dataclass
class Checked:
    """What held after a trial; each list names what did not."""

    releases: dict[str, str]
    inconsistent: list[str] = field(default_factory=list)  # nodes not on exactly one complete, running release
    data: list[str] = field(default_factory=list)  # state that differs from the baseline of its release
    frozen: list[str] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [*self.inconsistent, *self.data, *self.frozen, *self.locks, *self.history]

    def where(self) -> str:
        found = set(self.releases.values())
        if len(found) == 1:
            return f"{found.pop()} everywhere"
        return ", ".join(f"{n} on {r}" for n, r in sorted(self.releases.items()))


def consistency(site: Site) -> tuple[dict[str, str], list[str]]:
    problems = []
    releases = {}
    for n in site.nodes():
        releases[n["name"]] = n["current"]
        if n.get("pending"):
            problems.append(f"{n['name']}: pending release {n['pending']}")
        if not n.get("running"):
            problems.append(f"{n['name']}: not running")
        if n.get("paused"):
            problems.append(f"{n['name']}: paused")
        want = STATE_VERSION.get(n["current"])
        have = site.state_version(n["name"])
        if want is not None and have != want:
            problems.append(f"{n['name']}: state version {have} on {n['current']} (needs {want})")
        if not (site.path / "releases" / n["current"]).is_dir():
            problems.append(f"{n['name']}: release {n['current']} not unpacked")
    return releases, problems


def history_problems(site: Site, after: int, start: dict[str, str], releases: dict[str, str]) -> list[str]:
    """Every operation since ``after`` closed with a status; each node one of them touched has a finished
    rebuild and, after one that succeeded, a gate with a verdict (a failed rebuild has none); an operation that
    succeeded has every gate passed; each node that changed release has a passed gate where it is now."""
    problems = []
    status = site.status()
    if status.get("active") is not None:
        a = status["active"]
        problems.append(f"operation {a.get('id')} ({a.get('kind')}) still open: {a.get('state')}")
    reached: dict[str, set[str]] = {}
    stopped: dict[str, set[str]] = {}  # releases a cancelled rollback left nodes on before their gate passed
    named: set[str] = set()  # nodes a problem above names already

    def problem(node: str, said: str) -> None:
        problems.append(said)
        named.add(node)

    for op in site.operations(after):
        what = f"{op['kind']} {op['id']}"
        if op["status"] in OPEN or op["finished"] is None:
            problems.append(f"{what} not closed (status {op['status']})")
        plan = json.loads(op["plan"] or "{}")
        steps = site.steps(op["id"])
        for node in (n for b in plan.get("batches", []) for n in b):
            rebuild = steps.get((node, "rebuild"))
            gate = steps.get((node, "gate"))
            if rebuild is None:  # killed before its steps were recorded (after-start): fine if never sent
                if op["sent"] is not None:
                    problem(node, f"{what}: {node} has no rebuild step")
                continue
            if rebuild["status"] == "pending":
                if gate is not None:
                    problem(node, f"{what}: {node} gated ({gate['status']}) but never rebuilt")
                continue
            if rebuild["status"] not in ("succeeded", "failed"):
                problem(node, f"{what}: {node} rebuild left {rebuild['status']}")
            elif rebuild["status"] == "failed" and gate is not None:
                problem(node, f"{what}: {node}'s rebuild recorded failed ({rebuild['reason']}) yet gated "
                              f"({gate['status']})")
            elif rebuild["status"] == "succeeded" and gate is None:
                problem(node, f"{what}: {node} rebuilt with no gate")
            if rebuild["started"] is not None and rebuild["started"] < op["started"] - 1.0:
                problem(node, f"{what}: {node}'s rebuild recorded {rebuild['status']} with a start before the "
                              "operation began (a rebuild it did not do)")
            if gate is not None and gate["status"] not in FINAL_GATE:
                problem(node, f"{what}: {node} gate left {gate['status']}")
            if op["status"] == "succeeded" and (gate is None or gate["status"] != "succeeded"):
                problem(node, f"{what} succeeded with {node}'s gate "
                              f"{gate['status'] + ' (' + str(gate['reason']) + ')' if gate else 'missing'}")
            if gate is not None and gate["status"] == "succeeded":
                reached.setdefault(node, set()).add(str(rebuild["to_release"] or plan["after"][node]))
            elif op["kind"] == "rollback" and op["status"] == "cancelled" and gate is not None:
                # by design a cancelled rollback stops where it is: the node stays unproven on the release
                # ('status' shows LAST GOOD apart from RELEASE) and the next operation gates it there
                stopped.setdefault(node, set()).add(str(rebuild["to_release"] or plan["after"][node]))
    for node, release in releases.items():
        explained = reached.get(node, set()) | stopped.get(node, set())
        if node not in named and release != start.get(node) and release not in explained:
            problems.append(f"{node} went from {start.get(node)} to {release} without a passed gate there")
    return problems


def check(site: Site, after: int, start: dict[str, str],
          baseline: dict[tuple[str, str], dict[str, str]]) -> Checked:
    releases, inconsistent = consistency(site)
    checked = Checked(releases, inconsistent + stray_nodes(site))
    for node, found in site.digests().items():
        expected = baseline.get((node, releases.get(node, "?")))
        if expected is None:
            checked.data.append(f"{node}: no baseline for {releases.get(node)}")
        elif differs := digest_diff(expected, found):
            checked.data.append(f"{node}: state differs from {releases[node]}'s: {', '.join(differs[:5])}")
    checked.frozen = frozen_processes(site)
    checked.locks = held_locks(site)
    checked.history = history_problems(site, after, start, releases)
    return checked


# faults ---------------------------------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02,
             proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise FaultError(f"{what}: the operation ended ({proc.returncode}) before it happened")
        time.sleep(interval)
    raise FaultError(f"{what}: not seen within {timeout:.0f} s")


def rebuild_children(site: Site, node: str) -> list[int]:
    """Heat's ``site rebuild NODE ... --by-heat`` children for this site's ``node``."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            cmd = cmdline(int(p.name))
            if f" site rebuild {node} " in cmd and "--by-heat" in cmd and str(site.path) in cmd:
                fields = _stat_fields(int(p.name))
                if fields and fields[0] != "Z":
                    found.append(int(p.name))
    return found


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


@dataclass(frozen=True)
class Fault:
    """What to kill and when, by ``kind``:

    * ``imageupdate``: the orchestrator at crashpoint ``point`` (``IMAGEUPDATE_BREAK``);
    * ``migration``: Heat's ``site rebuild`` child at its crashpoint ``point`` (Heat is restarted with it for
      this operation only);
    * ``heat``: Heat, while ``node`` is at ``step`` (rebuild or gate);
    * ``rebuild``: ``node``'s rebuild child, mid-rebuild;
    * ``node``: ``node``'s init, as soon as its gate runs.

    ``delay``: seconds between seeing the moment and the kill (the soak varies it)."""

    kind: str
    point: str = ""
    node: str = ""
    step: str = ""
    delay: float = 0.0

    def describe(self) -> str:
        if self.kind == "imageupdate":
            return f"kill imageupdate at {self.point}"
        if self.kind == "migration":
            return f"kill the rebuild at {self.point}"
        if self.kind == "heat":
            return f"kill Heat while {self.node}'s {self.step} runs"
        if self.kind == "rebuild" and self.step == "start":
            return f"kill {self.node}'s rebuild process as it starts the node"
        if self.kind == "rebuild":
            return f"kill {self.node}'s rebuild process"
        return f"kill {self.node} (its init) during its gate"


@dataclass
class Injected:
    """How the faulted operation ended: its exit status, its JSON document and its stderr's tail; ``hit``:
    whether the kill found what it aimed at (a rebuild may end before a delayed kill)."""

    returncode: int
    result: dict[str, Any]
    stderr: str
    seconds: float
    hit: bool = True


def reached(site: Site, after: int, node: str, step: str, proc: subprocess.Popen[str],
            timeout: float = 300) -> None:
    """Wait until ``node`` is at ``step`` in the operation ``proc`` runs (the first one after ``after``):

    * ``rebuild``: Heat's rebuild child for the node runs and the node has recorded its intent (``node.json``
      names a pending release): the node is mid-rebuild (the history's rebuild row reads running as soon as
      Heat starts the rebuild, before the node has done anything);
    * ``start``: the rebuild has switched the node (``node.json``'s last event) and is starting it;
    * ``gate``: the history shows the node's gate running (its checks start at once)."""
    if step == "rebuild":
        def mid_rebuild() -> bool:
            return bool(site.node_record(node).get("pending")) and bool(rebuild_children(site, node))

        wait_for(mid_rebuild, timeout, f"{node} mid-rebuild", interval=0.01, proc=proc)
    elif step == "start":
        def starting() -> bool:
            events = site.node_record(node).get("events") or [""]
            return " switched to " in str(events[-1]) and bool(rebuild_children(site, node))

        wait_for(starting, timeout, f"{node} switched, starting", interval=0.005, proc=proc)
    elif step == "gate":
        wait_for(lambda: site.step_running(after, node, "gate"), timeout, f"{node}'s gate running", interval=0.01,
                 proc=proc)
    else:
        raise FaultError(f"unknown step {step}")


def inject(site: Site, argv: list[str], fault: Fault, timeout: float = 600) -> Injected:
    """Run the operation ``argv`` (e.g. ``["rollout", "R2"]``) with ``fault``; return when it has ended."""
    heat = site.heat_running() or site.heat_start()  # started without the crashpoint: its rebuilds never get it
    began = time.monotonic()
    if fault.kind == "imageupdate":
        proc_done = site.run(*argv, env={"IMAGEUPDATE_BREAK": fault.point}, timeout=timeout)
        return Injected(proc_done.returncode, doc(proc_done), proc_done.stderr[-3000:], time.monotonic() - began,
                        hit=proc_done.returncode == -signal.SIGKILL)
    if fault.kind == "migration":
        # the rebuilds Heat starts inherit its environment: a Heat of its own for this operation
        site.heat_stop()
        site.heat_start(env={"IMAGEUPDATE_BREAK": fault.point})
        try:
            proc_done = site.run(*argv, timeout=timeout)
        finally:
            site.heat_stop()  # refused while an operation is open: then the trial says so
            site.heat_start()
        return Injected(proc_done.returncode, doc(proc_done), proc_done.stderr[-3000:], time.monotonic() - began,
                        hit="was killed (SIGKILL)" in proc_done.stderr)
    after = site.last_operation()
    proc = site.background(*argv)
    try:
        at = "gate" if fault.kind == "node" else fault.step
        reached(site, after, fault.node, at, proc)
        time.sleep(fault.delay)
        if fault.kind == "heat":
            hit = kill(heat)
        elif fault.kind == "rebuild":
            hit = any([kill(pid) for pid in rebuild_children(site, fault.node)])
        elif fault.kind == "node":
            init = site.node_record(fault.node).get("pid")
            hit = isinstance(init, int) and kill(init)
        else:
            raise FaultError(f"unknown fault kind {fault.kind}")
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    try:
        result = json.loads(out)
    except ValueError:
        result = {}
    return Injected(proc.returncode, result if isinstance(result, dict) else {}, err[-3000:],
                    time.monotonic() - began, hit)


def recover(site: Site, how: str, timeout: float = 600) -> tuple[int, dict[str, Any], str]:
    """``resume``, ``cancel`` or ``status`` (nothing to finish: look only); exit status, document, stderr.
    A recovery still running after ``timeout`` seconds is killed: exit status None, stderr says so."""
    try:
        proc = site.run(how, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # run() has killed it
        said = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return HUNG, {}, f"{said[-2500:]}\n{how} still running after {timeout:.0f} s: killed"
    return proc.returncode, doc(proc), proc.stderr[-3000:]


HUNG = -1000  # the exit status ``recover`` gives a recovery it had to kill


def outcome_of(site: Site, after: int) -> list[str]:
    """Each operation since ``after``: 'KIND ID STATUS'."""
    return [f"{r['kind']} {r['id']} {r['status']}" for r in site.operations(after)]



# trials ---------------------------------------------------------------------------------------------------------

Baseline = dict[tuple[str, str], dict[str, str]]  # (node, release) -> its state digest on that release

RECOVERED = {"resume": "resumed", "cancel": "cancelled", "status": "status", "again": "ran it again"}


@dataclass(frozen=True)
class Trial:
    """One fault in one operation, then one recovery: ``resume``, ``cancel``, ``status`` (the operation ended
    on its own: only look) or ``again`` (run the same operation again, as its error says to)."""

    name: str
    operation: tuple[str, ...]  # e.g. ("rollout", "R2") or ("rollback", "--to", "R1")
    start: str  # the release every node runs before
    step: str  # the step the fault hits, for the table
    fault: Fault
    recovery: str
    expect: tuple[tuple[str, str], ...] = ()  # (kind, status) of each operation the trial ran, in order
    release: str = ""  # the release every node ends on
    recovery_timeout: float = 600  # seconds the recovery may take before it is killed (and said to hang)


@dataclass
class TrialResult:
    trial: Trial
    injected: Injected
    recovery: tuple[int, dict[str, Any], str]
    operations: list[tuple[str, str]]  # (kind, status) of each operation since the trial began (no 'adopt')
    checked: Checked
    seconds: float
    after: int = 0  # the last operation before the trial
    start: dict[str, str] = field(default_factory=dict)  # the release of each node before it

    @property
    def outcome(self) -> str:
        ops = " + ".join(f"{k} {s}" for k, s in self.operations) or "no operation"
        data = "data differs" if self.checked.data else "data same"
        how = RECOVERED.get(self.trial.recovery, self.trial.recovery)
        if self.recovery[0] == HUNG:
            how = f"{self.trial.recovery} HUNG (killed after {self.trial.recovery_timeout:.0f} s)"
        said = f"{how} -> {ops}, {self.checked.where()}, {data}"
        if not self.injected.hit:
            said = f"(the fault missed) {said}"
        others = [*self.checked.inconsistent, *self.checked.frozen, *self.checked.locks, *self.checked.history]
        return said + (f"; {'; '.join(others)}" if others else "")

    def row(self) -> tuple[str, str, str, str, str, str, str]:
        t = self.trial
        return (t.name, " ".join(t.operation), t.step, t.fault.describe(), RECOVERED.get(t.recovery, t.recovery),
                self.outcome, f"{self.seconds:.1f}")


HEADER = ("trial", "operation", "step", "fault", "after", "outcome", "s")


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows under ``HEADER`` as a Markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return lines


def run_trial(site: Site, trial: Trial, baseline: Baseline) -> TrialResult:
    began = time.monotonic()
    start = site.current()
    after = site.last_operation()
    injected = inject(site, list(trial.operation), trial.fault)
    if trial.recovery == "again":
        proc = site.run(*trial.operation)
        recovery = (proc.returncode, doc(proc), proc.stderr[-3000:])
    else:
        recovery = recover(site, trial.recovery, trial.recovery_timeout)
    ops = [(str(r["kind"]), str(r["status"])) for r in site.operations(after) if r["kind"] != "adopt"]
    checked = check(site, after, start, baseline)
    return TrialResult(trial, injected, recovery, ops, checked, time.monotonic() - began, after, start)


def bring_to(site: Site, release: str) -> None:
    """Every node on ``release``, running, nothing open: whatever the last trial left, the way an operator
    would (finish what is open, recover interrupted rebuilds, then roll forward or back). Reads the site's
    files first: a trial that left the fleet as the next one needs it costs nothing here."""
    # resume closes an open operation either way (rolled back if a cancel was requested); a cancel can hang
    kill_strays(site)  # a trial that left one has said so; the next must not inherit it
    if site.open_operation() and site.run("resume", timeout=600).returncode == 2:
        site.run("cancel", timeout=600)
    if not site.whole():
        site.ok("site", "recover")
    now = site.current()
    if set(now.values()) == {release}:
        return
    if STATE_VERSION.get(release, 0) < max(STATE_VERSION.get(r, 0) for r in now.values()):
        site.ok("rollback", "--to", release)  # a downgrade is a rollback
    else:
        site.ok("rollout", release)


def set_up(site: Site, nodes: int = 2, keys: int = 10, forward: str | None = "R2") -> Baseline:
    """A new site on R1 with data on every node; its Heat started without any crashpoint; the state of each
    node on R1, and (``forward``) on that release after a clean rollout, which the fleet is left on."""
    site.up(nodes, "R1")
    site.heat_start()
    site.write_data(keys)
    baseline: Baseline = {(n, "R1"): d for n, d in site.digests().items()}
    if forward:
        after = site.last_operation()
        start = site.current()
        site.ok("rollout", forward)
        baseline |= {(n, forward): d for n, d in site.digests().items()}
        clean = check(site, after, start, baseline)
        if clean.problems:
            raise FaultError(f"a clean rollout to {forward} does not pass the checks: {clean.problems}")
    return baseline
