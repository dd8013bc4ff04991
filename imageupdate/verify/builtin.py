"""The built-in checks: a node's facts (``node_facts.py``) held against what its release should be.

Pure functions of data, so each can be shown to fail in a unit test. They describe real software, not
one sample (checks first tuned to our own sample node failed PostgreSQL and nginx): daemons rename
themselves, map shared memory and bind loopback.

- ``release``: the stamp names the release, and the tree the node runs was unpacked from the artifact
  whose sha256 the store's manifest records (a release rebuilt under the same id is caught);
- ``services``: each service the release declares is the live process the node's init started for it
  (its pid in the init's status file, a child of the init, not a zombie, started when the init says;
  whatever title it gives itself), and every port it declares is listening inside the node, on any
  address, loopback included;
- ``health``: each declared health endpoint, asked from inside the node on the service's first port,
  answered 2xx within the facts' bound;
- ``stale-code``: no process runs code that is not this release's file (deleted, outside the read-only
  root wherever it lives, unknown to the file index, or with other content). Code is what a process
  executes: its executable, its executable file mappings, the script its interpreter runs, the way
  needrestart finds them from ``/proc/*/exe`` and ``/proc/*/maps``. Data mappings (SysV shared memory,
  memfd, files mapped without execute permission) are not code;
- ``config``: every file under ``/etc`` is the image's, except below the release's declared state paths
  (its overlays onto the state partition);
- ``filesystems``: the root is mounted read-only and refuses a write; ``/mnt/state`` is mounted and takes one;
- ``state-version``: the state's version (``/mnt/state/imageupdate/state.json``) is one the release's code
  runs on: its own, or newer through expand steps only, with no migration left half done.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imageupdate.images import upgrade_meta
from imageupdate.images.fileindex import FileEntry
from imageupdate.images.manifest import ROOT_IMAGE, Manifest
from imageupdate.upgrade import state

MAX_LISTED = 5
INIT_PID = 1  # the node's init, in the node's PID namespace
# Names the kernel gives memory that is no file anyone can open: SysV shared memory, memfd, shared
# anonymous and huge-page mappings. Executable, they are a JIT's pages (.NET and Java map their code
# twice through a memfd), like anonymous memory; an executable (exe) there is still flagged.
ANONYMOUS_MEMORY = re.compile(r"/(SYSV[0-9a-fA-F]{8}|memfd:.*|dev/zero|anon_hugepage|\[aio\])")


@dataclass(frozen=True)
class Expectation:
    """What a node on ``release`` must look like."""

    release: str
    manifest: Manifest
    index: dict[str, FileEntry]  # path without leading slash -> entry
    artifact: str | None  # sha256 of the artifact the node's tree came from, if the fleet knows it
    artifact_name: str = ROOT_IMAGE  # which one: the root tree, or a machine's root filesystem image

    @property
    def artifact_sha256(self) -> str | None:
        art = self.manifest.artifacts.get(self.artifact_name)
        return art.sha256 if art else None


Answer = tuple[bool, str]


def check_release(facts: dict[str, Any], want: Expectation) -> Answer:
    try:
        stamp = json.loads(facts.get("stamp") or "")
    except ValueError:
        stamp = None
    if not isinstance(stamp, dict) or "release" not in stamp:
        return False, "release stamp /etc/imageupdate/release.json is missing or not a JSON object with a release"
    if stamp["release"] != want.release:
        return False, f"node runs {stamp['release']!r}, expected {want.release!r}"
    expected = want.artifact_sha256
    if want.artifact is None:
        return False, (f"stamp says {want.release}, but nothing records which artifact the node's tree was "
                       "unpacked from")
    if expected is not None and want.artifact != expected:
        return False, (f"node runs {want.release} unpacked from artifact {want.artifact[:12]}, but the store's "
                       f"{want.release} is {expected[:12]} (rebuilt under the same id?)")
    return True, f"runs {want.release} (artifact {want.artifact[:12]})"


def _tree(pid: int, processes: list[dict[str, Any]]) -> set[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for proc in processes:
        children.setdefault(proc.get("ppid", 0), []).append(proc["pid"])
    tree: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        if p not in tree:
            tree.add(p)
            todo += children.get(p, [])
    return tree


def _sockets(port: int, facts: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in facts.get("listening") or [] if isinstance(s, dict) and s.get("port") == port]


def check_services(facts: dict[str, Any], want: Expectation) -> Answer:
    declared = [s for s in want.manifest.services if not s.get("invalid")]
    if not declared:
        return True, "the release declares no services"
    status = facts.get("service_status")
    status = status if isinstance(status, dict) else {}
    processes = facts.get("processes") or []
    by_pid = {p["pid"]: p for p in processes}
    problems, fine = [], []
    for svc in declared:
        name = svc["name"]
        started = status.get(name)
        started = started if isinstance(started, dict) else {}
        pid = started.get("pid")
        proc = by_pid.get(pid) if isinstance(pid, int) else None
        if not isinstance(pid, int):
            problems.append(f"{name} is not running")
            continue
        if proc is None:
            problems.append(f"{name} is not running (its pid {pid} is gone)")
            continue
        if proc.get("state") == "Z":
            problems.append(f"{name} (pid {pid}) has exited: it is a zombie")
            continue
        if proc.get("ppid") != INIT_PID:
            problems.append(f"{name} (pid {pid}) is not the init's child (its parent is pid {proc.get('ppid')}): "
                            "not the process the init started")
            continue
        if started.get("start_time") is not None and proc.get("start_time") != started["start_time"]:
            problems.append(f"{name}: pid {pid} started at tick {proc.get('start_time')}, the init's process at "
                            f"tick {started['start_time']}: not the process the init started")
            continue
        tree = _tree(pid, processes)
        closed = [p for p in svc.get("ports", []) if not _sockets(p, facts)]
        if closed:
            problems.append(f"{name} does not listen on port {', '.join(map(str, closed))}")
            continue
        ports = []
        for port in svc.get("ports", []):
            sockets = _sockets(port, facts)
            where = f"{port} on {', '.join(sorted({s.get('address', '?') for s in sockets}))}"
            holders = {holder for s in sockets for holder in s.get("pids") or []}
            if holders and not holders & tree:
                where += f" (held by pid {', '.join(map(str, sorted(holders)))}, outside {name}'s processes)"
            ports.append(where)
        fine.append(f"{name} (pid {pid}, {len(tree)} process{'es' if len(tree) > 1 else ''}"
                    + (f"; port {'; '.join(ports)}" if ports else "") + ")")
    if problems:
        return False, "; ".join(problems)
    return True, "running: " + ", ".join(fine)


def _answer(h: dict[str, Any]) -> str:
    """What a health endpoint answered, with the figures."""
    if h.get("status") is not None:
        said = f"answered {h['status']} {h.get('reason') or ''}".rstrip()
    else:
        said = f"did not answer ({h.get('error') or 'no answer'})"
    attempts = h.get("attempts", 0)
    return f"{h.get('url')} {said} ({attempts} attempt{'' if attempts == 1 else 's'} over " \
           f"{float(h.get('seconds') or 0):.1f} s)"


def check_health(facts: dict[str, Any], want: Expectation) -> Answer:
    declared = [s for s in want.manifest.services
                if not s.get("invalid") and isinstance(s.get("health"), str) and s.get("ports")]
    if not declared:
        return True, "no service declares a health endpoint"
    answers = {h.get("service"): h for h in facts.get("health") or [] if isinstance(h, dict)}
    problems, fine = [], []
    for svc in declared:
        name = svc["name"]
        h = answers.get(name)
        if h is None:
            problems.append(f"{name}: {svc['health']} on port {svc['ports'][0]} was not asked (the node's "
                            "declaration differs from the release's?)")
        elif isinstance(h.get("status"), int) and 200 <= h["status"] < 300:
            fine.append(f"{name}: {_answer(h)}")
        else:
            problems.append(f"{name}: {_answer(h)}")
    if problems:
        return False, "; ".join(problems)
    return True, "; ".join(fine)


def _is_release_file(path: str, info: dict[str, Any] | None, want: Expectation) -> str | None:
    """Why ``path`` (with its on-node hash) is not this release's file, or None if it is."""
    entry = want.index.get(path.lstrip("/"))
    while entry is not None and entry.type == "hardlink" and entry.link:
        entry = want.index.get(entry.link.lstrip("/"))
    if entry is None or entry.type != "file":
        return f"{path} is not a file of {want.release}"
    if info is None or "error" in info:
        return f"{path} cannot be read ({(info or {}).get('error', 'not hashed')})"
    if info.get("sha256") is not None and info["sha256"] != entry.sha256:
        return f"{path} differs from {want.release}'s"
    if info.get("sha256") is None and info.get("size") != entry.size:
        return f"{path} differs in size from {want.release}'s"
    return None


VERBS = {"exe": "runs", "map": "maps", "script": "runs script"}


def _stale(f: dict[str, Any], code: dict[str, Any], want: Expectation) -> str | None:
    """Why a file a process executes is not this release's code, or None if it is (or is no code)."""
    kind, path = f.get("kind", "map"), f["path"]
    verb = VERBS.get(kind, "maps")
    if kind == "map" and ("x" not in f.get("perms", "x") or ANONYMOUS_MEMORY.fullmatch(path)):
        return None
    if kind == "script" and f.get("target"):
        return f"runs script {path}, which is {f['target']}, not a file"
    if f.get("deleted"):
        return f"runs script {path}, which no longer exists" if kind == "script" else f"{verb} deleted {path}"
    if not f.get("on_root"):
        return f"{verb} {path}, which is not on the release's root"
    if f.get("directory"):
        return None  # python runs a directory's __main__.py: on the root, the index vouches for the tree
    reason = _is_release_file(path, code.get(path), want)
    return f"{verb} {reason}" if reason else None


def check_stale_code(facts: dict[str, Any], want: Expectation) -> Answer:
    code = facts.get("code", {})
    stale: list[str] = []
    for proc in facts.get("processes", []):
        why: list[str] = []
        if proc.get("error"):
            why.append(f"cannot be inspected ({proc['error']})")
        for f in proc.get("executes", []):
            reason = _stale(f, code, want)
            if reason:
                why.append(reason)
        if why:
            cmd = " ".join(proc.get("cmdline") or [proc.get("exe") or "?"])[:80]
            stale.append(f"pid {proc['pid']} ({cmd}): {why[0]}" + (f" (+{len(why) - 1} more)" if len(why) > 1 else ""))
    if stale:
        more = f"; and {len(stale) - MAX_LISTED} more" if len(stale) > MAX_LISTED else ""
        return False, f"{len(stale)} process(es) run code that is not {want.release}'s: " + \
            "; ".join(stale[:MAX_LISTED]) + more
    return True, f"{len(facts.get('processes', []))} processes, all on {want.release}'s code"


def check_node_config(facts: dict[str, Any], want: Expectation) -> Answer:
    overlays = [p.rstrip("/") for p in want.manifest.state_paths]

    def overlaid(path: str) -> bool:
        return any(path == o or path.startswith(o + "/") for o in overlays)

    expected = {"/" + p: e for p, e in want.index.items() if p.startswith("etc/") and e.type in ("file", "symlink",
                                                                                                   "hardlink")}
    seen = facts.get("etc", {})
    drift: list[str] = []
    for path, info in sorted(seen.items()):
        if overlaid(path):
            continue
        entry = expected.get(path)
        while entry is not None and entry.type == "hardlink" and entry.link:
            entry = want.index.get(entry.link.lstrip("/"))
        if entry is None:
            drift.append(f"{path} is not in the image")
        elif info.get("type") == "symlink":
            if entry.type != "symlink" or entry.link != info.get("link"):
                drift.append(f"{path} links to {info.get('link')}, the image has "
                             f"{entry.link if entry.type == 'symlink' else 'a file'}")
        elif info.get("type") == "file":
            if entry.type != "file" or entry.sha256 != info.get("sha256"):
                drift.append(f"{path} differs from the image")
        else:
            drift.append(f"{path} cannot be read: {info.get('error')}")
    missing = [p for p in expected if p not in seen and not overlaid(p)]
    drift += [f"{p} is missing" for p in missing]
    if drift:
        more = f"; and {len(drift) - MAX_LISTED} more" if len(drift) > MAX_LISTED else ""
        return False, f"{len(drift)} config file(s) differ from {want.release}: " + "; ".join(drift[:MAX_LISTED]) + more
    return True, f"{len(seen)} paths under /etc match the image (overlays: {', '.join(overlays) or 'none'})"


def check_filesystems(facts: dict[str, Any], want: Expectation) -> Answer:
    mounts = facts.get("mounts", {})
    problems = []
    root = mounts.get("/")
    if root is None or "ro" not in root.get("options", []):
        problems.append(f"the root is mounted {','.join((root or {}).get('options', ['?']))}, not read-only")
    rw = facts.get("root_write", {})
    if rw.get("ok"):
        problems.append("a write to / succeeded")
    state = mounts.get("/mnt/state")
    if state is None:
        problems.append("/mnt/state is not a mount point")
    elif "rw" not in state.get("options", []):
        problems.append(f"/mnt/state is mounted {','.join(state.get('options', []))}, not read-write")
    sw = facts.get("state_write", {})
    if not sw.get("ok"):
        problems.append(f"a write to /mnt/state failed: {sw.get('error')}")
    if problems:
        return False, "; ".join(problems)
    return True, f"/ read-only (write refused: {rw.get('error')}), /mnt/state read-write"


def check_state_version(facts: dict[str, Any], want: Expectation) -> Answer:
    blocked = facts.get("blocked")
    if isinstance(blocked, str) and blocked.strip():  # a booted machine's own migrations refused or failed
        said = " ".join("".join(c for c in blocked if c.isprintable() or c.isspace()).split())[:300]
        return False, f"the node's migrations at boot blocked its services: {said}"
    meta = upgrade_meta.from_manifest(want.manifest.upgrade)
    if meta is None:
        return True, f"{want.release} declares no state version"
    raw = facts.get("state_version")
    if not raw:
        return False, f"no {state.STATE_FILE} on /mnt/state: the state's version is unknown"
    try:
        record = state.loads(raw)
    except (ValueError, TypeError, AttributeError):
        return False, f"{state.STATE_FILE} on /mnt/state is not a valid state record"
    why = state.incompatible(record, want.release, meta)
    if why:
        return False, why
    return True, f"state version {record.version} (release {want.release} needs {meta.state_version})"


BUILTIN: list[tuple[str, Callable[[dict[str, Any], Expectation], Answer]]] = [
    ("release", check_release),
    ("services", check_services),
    ("health", check_health),
    ("stale-code", check_stale_code),
    ("config", check_node_config),
    ("filesystems", check_filesystems),
    ("state-version", check_state_version),
]
