"""Gather what the built-in checks need from a node, in one go. Runs ON THE NODE.

This file is sent over SSH to the node's own ``python3`` (``python3 - < node_facts.py``; the node init is
Python, so every release has it) and prints one JSON document. It uses the standard library only and
decides nothing: the orchestrator compares the facts with the release's manifest and file index
(``imageupdate.verify.builtin``). Keep it compatible with Python 3.9 (an older release's interpreter).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

SERVICES_DIR = "/usr/share/imageupdate/services"
TESTS_DIR = "/usr/share/imageupdate/tests"
STATUS = "/run/imageupdate/services.json"
STAMP = "/etc/imageupdate/release.json"
MAX_HASH = 64 * 1024 * 1024  # a mapped file larger than this is compared by size only


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def mounts() -> dict[str, dict[str, Any]]:
    """mount point -> options (per-mount and per-superblock), from mountinfo."""
    found = {}
    for line in (read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        point = fields[4].replace("\\040", " ")
        found[point] = {"options": fields[5].split(","), "fstype": fields[sep + 1],
                        "super": fields[sep + 3].split(",") if len(fields) > sep + 3 else []}
    return found


def try_write(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, f".imageupdate-write-probe.{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return {"ok": False, "error": f"{exc.__class__.__name__}: {exc.strerror}"}
    try:
        os.write(fd, b"imageupdate")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)
    return {"ok": True, "error": None}


def listening() -> list[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (read(table) or "").splitlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def mount_of(path: str, points: list[str]) -> str:
    """The mount point ``path`` lies on (bind mounts of one filesystem share a device number, so the
    device alone cannot tell the read-only root from the state partition)."""
    best = "/"
    for point in points:
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best = point
    return best


def processes(me: set[int], points: list[str]) -> list[dict[str, Any]]:
    """Per process: exe and the files it maps, each with whether the path still names the same inode."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in me:
            continue
        pid = int(name)
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            maps = read(f"/proc/{pid}/maps") or ""
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        files: dict[str, tuple[int, int]] = {}
        for line in maps.splitlines():
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
                continue  # anonymous, [heap], [stack], memfd: ...
            path = parts[5]
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            files.setdefault(path, (os.makedev(major, minor), int(parts[4])))
        mapped = []
        for path, (dev, ino) in sorted(files.items()):
            deleted = path.endswith(" (deleted)")
            entry = {"path": path[:-len(" (deleted)")] if deleted else path, "deleted": deleted,
                     "same_inode": False, "on_root": False}
            if not deleted:
                try:
                    st = os.stat(path)
                    entry["same_inode"] = (st.st_dev, st.st_ino) == (dev, ino)
                    entry["on_root"] = mount_of(path, points) == "/"
                except OSError:
                    pass
            mapped.append(entry)
        exe_deleted = exe.endswith(" (deleted)")
        found.append({"pid": pid, "uid": uid, "cmdline": cmdline,
                      "exe": exe[:-len(" (deleted)")] if exe_deleted else exe, "exe_deleted": exe_deleted,
                      "maps": mapped})
    return found


def hashes(paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(paths):
        try:
            st = os.stat(path)
            out[path] = {"size": st.st_size, "sha256": sha256(path) if st.st_size <= MAX_HASH else None}
        except OSError as exc:
            out[path] = {"error": exc.strerror}
    return out


def etc_tree() -> dict[str, dict[str, Any]]:
    """Every path under /etc: regular files with their sha256, symlinks with their target."""
    out = {}
    for top, dirs, names in os.walk("/etc"):
        dirs.sort()
        for name in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = os.path.join(top, name)
            try:
                if os.path.islink(path):
                    out[path] = {"type": "symlink", "link": os.readlink(path)}
                elif os.path.isfile(path):
                    out[path] = {"type": "file", "sha256": sha256(path)}
            except OSError as exc:
                out[path] = {"type": "error", "error": exc.strerror or str(exc)}
    return out


def declared_services() -> list[dict[str, Any]]:
    found = []
    try:
        names = sorted(os.listdir(SERVICES_DIR))
    except OSError:
        names = []
    for name in names:
        if name.endswith(".json"):
            try:
                with open(os.path.join(SERVICES_DIR, name)) as f:
                    found.append(json.load(f))
            except (OSError, ValueError) as exc:
                found.append({"name": name[:-5], "invalid": str(exc)})
    return found


def tests() -> list[dict[str, Any]]:
    try:
        names = sorted(os.listdir(TESTS_DIR))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(TESTS_DIR, name)
        head = b""
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            pass
        out.append({"name": name, "file": os.path.isfile(path), "executable": os.access(path, os.X_OK),
                    "runnable": head[:2] == b"#!" or head == b"\x7fELF"})
    return out


def main() -> None:
    me = {os.getpid(), os.getppid()}
    mounted = mounts()
    procs = processes(me, list(mounted))
    code = set()
    for p in procs:
        code.add(p["exe"])
        code.update(m["path"] for m in p["maps"] if not m["deleted"])
    stamp = read(STAMP)
    try:
        status = json.loads(read(STATUS) or "null")
    except ValueError:
        status = None
    doc = {
        "stamp": stamp,
        "mounts": mounted,
        "root_write": try_write("/"),
        "state_write": try_write("/mnt/state") if os.path.isdir("/mnt/state") else {"ok": False,
                                                                                   "error": "no /mnt/state"},
        "services": declared_services(),
        "service_status": status,
        "listening": listening(),
        "processes": procs,
        "code": hashes(c for c in code if c.startswith("/")),
        "etc": etc_tree(),
        "tests": tests(),
        "state_version": read("/mnt/state/imageupdate/state.json"),
    }
    json.dump(doc, sys.stdout)


if __name__ == "__main__":
    main()
