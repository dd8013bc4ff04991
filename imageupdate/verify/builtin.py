"""The built-in checks: a node's facts (``node_facts.py``) held against what its release should be.

Pure functions of data, so each can be shown to fail in a unit test:

- ``release``: the stamp names the release, and the tree the node runs was unpacked from the artifact
  whose sha256 the store's manifest records (a release rebuilt under the same id is caught);
- ``services``: each service the release declares has a live process running its command as its user,
  and every port it declares is listening;
- ``stale-code``: no process runs an executable or maps a file that is not this release's (deleted,
  outside the read-only root, unknown to the file index, or with other content), the way needrestart
  finds them from ``/proc/*/exe`` and ``/proc/*/maps``;
- ``config``: every file under ``/etc`` is the image's, except below the release's declared state paths
  (its overlays onto the state partition);
- ``filesystems``: the root is mounted read-only and refuses a write; ``/mnt/state`` is mounted and takes one;
- ``state-version``: the state's version (``/mnt/state/imageupdate/state.json``) is one the release's code
  runs on: its own, or newer through expand steps only, with no migration left half done.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imageupdate.images.fileindex import FileEntry
from imageupdate.images.manifest import ROOT_IMAGE, Manifest
from imageupdate.upgrade import meta as upgrade_meta
from imageupdate.upgrade import state

# Mapped paths that are not code: shared memory, the node's own devices.
NOT_CODE = ("/dev/", "/run/", "/proc/", "/sys/")
MAX_LISTED = 5


@dataclass(frozen=True)
class Expectation:
    """What a node on ``release`` must look like."""

    release: str
    manifest: Manifest
    index: dict[str, FileEntry]  # path without leading slash -> entry
    artifact: str | None  # sha256 of the artifact the node's tree came from, if the fleet knows it

    @property
    def artifact_sha256(self) -> str | None:
        art = self.manifest.artifacts.get(ROOT_IMAGE)
        return art.sha256 if art else None


Finding = tuple[bool, str]


def check_release(facts: dict[str, Any], want: Expectation) -> Finding:
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


def check_services(facts: dict[str, Any], want: Expectation) -> Finding:
    declared = [s for s in want.manifest.services if not s.get("invalid")]
    if not declared:
        return True, "the release declares no services"
    status = facts.get("service_status") or {}
    by_pid = {p["pid"]: p for p in facts.get("processes", [])}
    listening = set(facts.get("listening", []))
    problems, fine = [], []
    for svc in declared:
        name = svc["name"]
        pid = (status.get(name) or {}).get("pid")
        proc = by_pid.get(pid) if pid else None
        if proc is None:
            problems.append(f"{name} is not running")
            continue
        if svc.get("command") and proc["cmdline"] != svc["command"]:
            problems.append(f"{name} (pid {pid}) runs {' '.join(proc['cmdline'])!r}, declared "
                            f"{' '.join(svc['command'])!r}")
            continue
        closed = [p for p in svc.get("ports", []) if p not in listening]
        if closed:
            problems.append(f"{name} does not listen on port {', '.join(map(str, closed))}")
            continue
        fine.append(f"{name} (pid {pid})")
    if problems:
        return False, "; ".join(problems)
    return True, "running: " + ", ".join(fine)


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


def check_stale_code(facts: dict[str, Any], want: Expectation) -> Finding:
    code = facts.get("code", {})
    stale: list[str] = []
    for proc in facts.get("processes", []):
        why: list[str] = []
        if proc.get("exe_deleted"):
            why.append(f"runs deleted {proc['exe']}")
        else:
            reason = _is_release_file(proc["exe"], code.get(proc["exe"]), want)
            if reason:
                why.append("runs " + reason)
        for m in proc.get("maps", []):
            path = m["path"]
            if path.startswith(NOT_CODE):
                continue
            if m.get("deleted"):
                why.append(f"maps deleted {path}")
            elif not m.get("on_root"):
                why.append(f"maps {path}, which is not on the release's root")
            elif (reason := _is_release_file(path, code.get(path), want)) is not None:
                why.append("maps " + reason)
        if why:
            cmd = " ".join(proc.get("cmdline") or [proc["exe"]])[:80]
            stale.append(f"pid {proc['pid']} ({cmd}): {why[0]}" + (f" (+{len(why) - 1} more)" if len(why) > 1 else ""))
    if stale:
        more = f"; and {len(stale) - MAX_LISTED} more" if len(stale) > MAX_LISTED else ""
        return False, f"{len(stale)} process(es) run code that is not {want.release}'s: " + \
            "; ".join(stale[:MAX_LISTED]) + more
    return True, f"{len(facts.get('processes', []))} processes, all on {want.release}'s code"


def check_config(facts: dict[str, Any], want: Expectation) -> Finding:
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


def check_filesystems(facts: dict[str, Any], want: Expectation) -> Finding:
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


def check_state_version(facts: dict[str, Any], want: Expectation) -> Finding:
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


BUILTIN: list[tuple[str, Callable[[dict[str, Any], Expectation], Finding]]] = [
    ("release", check_release),
    ("services", check_services),
    ("stale-code", check_stale_code),
    ("config", check_config),
    ("filesystems", check_filesystems),
    ("state-version", check_state_version),
]
