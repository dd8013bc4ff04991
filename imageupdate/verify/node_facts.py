"""Gather what the built-in checks need from a node, in one go. Runs ON THE NODE.

This file is sent over SSH to the node's own ``python3`` (``python3 - < node_facts.py``; the node init is
Python, so every release has it) and prints one JSON document. It uses the standard library only and
decides nothing: the orchestrator compares the facts with the release's manifest and file index
(``imageupdate.verify.builtin``). Keep it compatible with Python 3.9 (an older release's interpreter).
Its helpers are importable, so unit tests call them on the test machine's own ``/proc``.

What it reports, and why in this shape (the checks describe real software, not our sample node: code is
what a process executes, a service is the process tree the init started for it whatever its title, ports
are read inside the node on any address):

- ``processes``: per process its ``pid``, ``ppid``, ``state`` (``Z``: a zombie), ``start_time`` (field 22
  of ``/proc/PID/stat``, what the init records to tell a recycled pid), ``uid``, ``cmdline``, ``exe`` and
  ``exe_deleted``, and ``executes``: the files it runs as code, each ``{"kind", "path", "deleted",
  "same_inode", "on_root", "mount"}`` (maps also ``perms``).
  Code is the executable (``kind: exe``), the file mappings the kernel lets it execute (``kind: map``,
  ``x`` in the perms of ``/proc/PID/maps``; shared memory, memfd and data files are mapped without it),
  and the script an interpreter runs (``kind: script``: the first operand of its command line, see
  ``script_arg``, resolved from the process's own cwd and root; also ``arg``, ``directory`` and
  ``target``). ``deleted``: the path no longer names a file. A process that cannot be read (not a
  kernel thread, not gone) is listed with ``error``.
- ``code``: path -> ``{"size", "sha256"}`` of every such file that is on the read-only root (only code is
  hashed: the rest is stale whatever its content).
- ``listening``: every TCP socket in LISTEN inside the node: ``{"proto": "tcp"|"tcp6", "address",
  "port", "inode", "pids"}`` (``pids``: the processes holding it, from ``/proc/PID/fd``).
- ``health``: for each declared service with a ``health`` path and ports, an HTTP GET of it on
  ``ports[0]`` from inside the node, retried every ``HEALTH_INTERVAL`` until it answers 2xx or
  ``HEALTH_TIMEOUT`` passes: ``{"service", "url", "status", "reason", "error", "attempts", "seconds"}``.
  The requests run in threads while the rest is gathered, so the whole script stays within
  ``HEALTH_TIMEOUT`` plus the time the other facts take.
- ``stamp``, ``mounts``, ``root_write``, ``state_write``, ``services``, ``service_status``, ``etc``,
  ``tests``, ``state_version``: read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

SERVICES_DIR = "/usr/share/imageupdate/services"
TESTS_DIR = "/usr/share/imageupdate/tests"
STATUS = "/run/imageupdate/services.json"
STAMP = "/etc/imageupdate/release.json"
MAX_HASH = 64 * 1024 * 1024  # a code file larger than this is compared by size only
HEALTH_TIMEOUT = 15.0  # the bound on asking one health endpoint, all attempts included
HEALTH_REQUEST_TIMEOUT = 3.0
HEALTH_INTERVAL = 0.5
PF_KTHREAD = 0x00200000
ROOT_VERIFIED = "--root-verified"  # the host vouches for the root: its code is compared by size, not hashed
DELETED = " (deleted)"


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


# listening sockets ---------------------------------------------------------------------------------

def decode_address(hex_address: str, byteorder: str = sys.byteorder) -> str:
    """An address as ``/proc/net/tcp{,6}`` prints it (32-bit words in host byte order) in text form."""
    raw = bytes.fromhex(hex_address)
    if byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def parse_listening(proto: str, table: str, byteorder: str = sys.byteorder) -> list[dict[str, Any]]:
    """The LISTEN sockets of one ``/proc/net/tcp`` or ``tcp6`` table."""
    found = []
    for line in table.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 9 and parts[3] == "0A":  # LISTEN
            address, port = parts[1].rsplit(":", 1)
            found.append({"proto": proto, "address": decode_address(address, byteorder), "port": int(port, 16),
                          "inode": int(parts[9]), "pids": []})
    return found


def listening() -> list[dict[str, Any]]:
    return [s for proto in ("tcp", "tcp6") for s in parse_listening(proto, read(f"/proc/net/{proto}") or "")]


def socket_holders(inodes: set[int], me: set[int]) -> dict[int, list[int]]:
    """socket inode -> the pids that hold it open (one readlink per open file of every process)."""
    held: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in me:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in inodes:
                pids = held.setdefault(int(link[8:-1]), [])
                if int(name) not in pids:
                    pids.append(int(name))
    return held


# interpreters and their scripts ------------------------------------------------------------------

class Syntax(NamedTuple):
    """How an interpreter's command line names the script it runs (its first operand)."""

    no_script: str  # option letters after which there is no script file (inline code, a module, stdin)
    value: str  # option letters taking a value: the rest of the argument, else the next argument
    attached: str = ""  # option letters whose value is the rest of the argument, never the next one
    digits: str = ""  # option letters followed by optional digits, then more option letters (perl -l, -0)
    long_value: tuple[str, ...] = ()  # long options whose value is the next argument (unless given with =)
    long_no_script: tuple[str, ...] = ()  # long options after which there is no script file
    script_option: str = ""  # option letters whose value IS the script (php -f FILE)
    plus: bool = False  # +o style options (shells)


INTERPRETERS: tuple[tuple[re.Pattern[str], Syntax], ...] = (
    (re.compile(r"python[0-9.]*"), Syntax("cm", "WX", long_value=("--check-hash-based-pycs",))),
    (re.compile(r"perl[0-9.]*"), Syntax("eE", "IMm", attached="ixCdDF", digits="0l")),
    (re.compile(r"ruby[0-9.]*"), Syntax("e", "IrCE", attached="KTWxF", digits="0")),
    (re.compile(r"sh|dash|bash"), Syntax("cs", "oO", long_value=("--rcfile", "--init-file"), plus=True)),
    (re.compile(r"node(js)?"), Syntax("ep", "rC", long_value=("--require", "--import", "--loader",
                                                            "--experimental-loader", "--conditions", "--title"),
                                    long_no_script=("--eval", "--print"))),
    (re.compile(r"php[0-9.]*"), Syntax("rRBEa", "cdztS", script_option="fF")),
    (re.compile(r"lua(jit)?[0-9.]*"), Syntax("", "el")),
    (re.compile(r"tclsh[0-9.]*"), Syntax("", "", long_value=("-encoding",))),
)


def interpreter(path: str) -> Syntax | None:
    """The syntax of the interpreter ``path`` names (by its base name), or None if it is no interpreter."""
    base = os.path.basename(path)
    for pattern, syntax in INTERPRETERS:
        if pattern.fullmatch(base):
            return syntax
    return None


def script_arg(exe: str, cmdline: list[str]) -> str | None:
    """The script an interpreter process runs, as its command line names it, or None.

    Only when the executable is an interpreter AND ``argv[0]`` still names one: a process that rewrote
    its title (``nginx: master process ...``, ``postgres: 15/main: checkpointer``, setproctitle in a
    Python daemon) has a command line unrelated to its arguments. Then the interpreter's options are
    skipped, with their values; options giving the code inline or naming a module (``python -c``/``-m``,
    ``perl -e``, ``sh -c``, ``node -e``) or stdin (``-``) mean there is no script file.
    """
    syntax = interpreter(exe)
    if syntax is None or not cmdline or interpreter(cmdline[0].lstrip("-")) is not syntax:
        return None
    args = cmdline[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            return args[i] if i < len(args) else None
        if arg.split("=", 1)[0] in syntax.long_no_script:
            return None
        if arg in syntax.long_value:
            i += 1
            continue
        if arg.startswith("--"):
            continue  # a long flag, or a long option with its value after "="
        if len(arg) < 2 or not (arg[0] == "-" or (syntax.plus and arg[0] == "+")):
            return None if arg == "-" else arg
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in syntax.no_script:
                return None
            if letter in syntax.script_option:
                return arg[j:] or (args[i] if i < len(args) else None)
            if letter in syntax.value:
                if j == len(arg):
                    i += 1  # its value is the next argument
                break
            if letter in syntax.attached:
                break
            if letter in syntax.digits:
                while j < len(arg) and arg[j].isdigit():
                    j += 1
    return None


# processes and the code they run -------------------------------------------------------------------

def mount_of(path: str, points: list[str]) -> str:
    """The mount point ``path`` lies on (bind mounts of one filesystem share a device number, so the
    device alone cannot tell the read-only root from the state partition)."""
    best = "/"
    for point in points:
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best = point
    return best


def code_file(kind: str, path: str, deleted: bool, inode: tuple[int, int] | None,
              points: list[str]) -> dict[str, Any]:
    """One file a process runs as code; ``inode`` (device, inode) is the one the process has, if known."""
    entry: dict[str, Any] = {"kind": kind, "path": path, "deleted": deleted, "same_inode": None,
                             "on_root": False, "mount": None}
    if not deleted:
        try:
            st = os.stat(path)
        except OSError:
            entry["deleted"] = True  # the name is gone (or was never reachable from here)
            return entry
        if inode is not None:
            entry["same_inode"] = (st.st_dev, st.st_ino) == inode
        entry["mount"] = mount_of(path, points)
        entry["on_root"] = entry["mount"] == "/"
    return entry


def _strip_deleted(path: str) -> tuple[str, bool]:
    return (path[:-len(DELETED)], True) if path.endswith(DELETED) else (path, False)


FD_SCRIPT = re.compile(r"/(?:dev/fd|proc/self/fd)/([0-9]+)")  # bash <(...), or a script passed as an open file


def script_file(pid: int, arg: str, points: list[str]) -> dict[str, Any]:
    """The script ``arg`` of process ``pid``, resolved as the process would: from its root if absolute,
    else from its working directory (which it may have changed since it started); ``/dev/fd/N`` from its
    open file N (``target``: what that is, when it is no file, e.g. ``pipe:[1234]``)."""
    fd = FD_SCRIPT.fullmatch(arg)
    target = None
    try:
        if fd is not None:
            target = os.readlink(f"/proc/{pid}/fd/{fd.group(1)}")
            path, gone = _strip_deleted(target)
            if not path.startswith("/"):
                path, gone = arg, True
            else:
                target = None
        else:
            base, gone = _strip_deleted(os.readlink(f"/proc/{pid}/root" if arg.startswith("/")
                                                    else f"/proc/{pid}/cwd"))
            path = os.path.normpath(base.rstrip("/") + "/" + arg.lstrip("/"))
    except OSError:
        path, gone = arg, True
    if not gone and os.path.exists(path):
        path = os.path.realpath(path)
    entry = code_file("script", path, gone, None, points)
    entry["arg"] = arg
    entry["target"] = target
    entry["directory"] = not entry["deleted"] and os.path.isdir(path)  # python runs a directory's __main__.py
    return entry


def process(pid: int, points: list[str]) -> dict[str, Any] | None:
    """One process's facts; None for a kernel thread or a process gone meanwhile."""
    stat = read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()  # after "(comm)", which may hold spaces and parentheses
    if int(fields[6]) & PF_KTHREAD:
        return None
    info: dict[str, Any] = {"pid": pid, "ppid": int(fields[1]), "state": fields[0], "start_time": int(fields[19]),
                            "uid": None, "cmdline": [], "exe": None, "exe_deleted": False, "executes": []}
    try:
        info["uid"] = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            info["cmdline"] = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        exe = os.readlink(f"/proc/{pid}/exe")
        exe_inode = os.stat(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except FileNotFoundError:
        return info if info["state"] == "Z" else None  # a zombie has no exe; else it is gone
    except OSError as exc:
        if not os.path.exists(f"/proc/{pid}"):
            return None
        info["error"] = f"{exc.__class__.__name__}: {exc.strerror}"
        return info
    info["exe"], info["exe_deleted"] = _strip_deleted(exe)
    executes = [code_file("exe", info["exe"], info["exe_deleted"], (exe_inode.st_dev, exe_inode.st_ino), points)]
    seen: dict[str, dict[str, Any]] = {}
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue  # data, or anonymous memory ([heap], [stack], [vdso], a JIT's pages)
        path, deleted = _strip_deleted(parts[5])
        if path in seen:
            continue
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        seen[path] = code_file("map", path, deleted, (os.makedev(major, minor), int(parts[4])), points)
        seen[path]["perms"] = parts[1]
    executes += [seen[p] for p in sorted(seen)]
    arg = script_arg(info["exe"], info["cmdline"])
    if arg is not None:
        executes.append(script_file(pid, arg, points))
    info["executes"] = executes
    return info


def processes(me: set[int], points: list[str]) -> list[dict[str, Any]]:
    found = []
    for name in sorted(os.listdir("/proc"), key=lambda n: (len(n), n)):
        if name.isdigit() and int(name) not in me:
            info = process(int(name), points)
            if info is not None:
                found.append(info)
    return found


def hashes(paths: Iterable[str], root_verified: bool = False) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file; with ``root_verified`` (the host unpacked the read-only root from an
    artifact whose sha256 it checked, and says so) size only: what lies on that root cannot differ."""
    out = {}
    for path in sorted(paths):
        try:
            st = os.stat(path)
            out[path] = {"size": st.st_size,
                         "sha256": sha256(path) if st.st_size <= MAX_HASH and not root_verified else None}
        except OSError as exc:
            out[path] = {"error": exc.strerror}
    return out


def code_paths(procs: list[dict[str, Any]]) -> set[str]:
    """The files worth hashing: code on the read-only root (anything else is stale whatever it holds)."""
    return {f["path"] for p in procs for f in p["executes"]
            if f["on_root"] and not f["deleted"] and not f.get("directory")}


# health endpoints --------------------------------------------------------------------------------

def health_address(port: int, sockets: list[dict[str, Any]]) -> str:
    """Where to ask a service on ``port`` from inside the node: loopback when it listens there or on
    every address (IPv4 first), else the address it listens on."""
    addresses = [s["address"] for s in sockets if s["port"] == port]
    if any(a == "0.0.0.0" or a.startswith("127.") for a in addresses):
        return "127.0.0.1"
    if any(a in ("::", "::1") for a in addresses):
        return "::1"
    return addresses[0] if addresses else "127.0.0.1"


def url(address: str, port: int, path: str) -> str:
    return f"http://{'[' + address + ']' if ':' in address else address}:{port}{path}"


def http_get(address: str, port: int, path: str, timeout: float) -> tuple[int | None, str | None, str | None]:
    """(status, reason, error) of one GET, on a plain socket: importing http.client took a third of this
    script's time (it pulls in the email parser), at every gate. The status is the first final one (1xx
    answers are skipped), read as soon as its header ends: the body is not waited for."""
    host = f"[{address}]" if ":" in address else address
    data = b""
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            while len(data) < 65536:
                head, ended, rest = data.partition(b"\r\n\r\n")
                if ended:
                    code = head.split(b" ", 2)[1:2]
                    if code and code[0].isdigit() and code[0].startswith(b"1") and len(code[0]) == 3:
                        data = rest  # 100 Continue, 103 Early Hints: the answer follows
                        continue
                    break
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        if b"\r\n" not in data:
            return None, None, f"{exc.__class__.__name__}: {exc}"
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        return None, None, f"BadStatusLine: {line[:100]!r}" if line else "RemoteDisconnected: no answer"
    return int(parts[1]), parts[2] if len(parts) > 2 else "", None


def ask_health(service: str, port: int, path: str,
               sockets: Callable[[], list[dict[str, Any]]] = listening,
               get: Callable[[str, int, str, float], tuple[int | None, str | None, str | None]] = http_get,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
               bound: float = HEALTH_TIMEOUT, interval: float = HEALTH_INTERVAL,
               request_timeout: float = HEALTH_REQUEST_TIMEOUT) -> dict[str, Any]:
    """GET ``path`` on ``port`` every ``interval`` until it answers 2xx or ``bound`` has passed; the last
    answer, how many attempts and how long. The address is chosen again at each attempt (the service may
    still be binding)."""
    t0 = clock()
    attempts = 0
    while True:
        started = clock()
        address = health_address(port, sockets())
        status, reason, error = get(address, port, path, max(0.1, min(request_timeout, bound - (started - t0))))
        attempts += 1
        now = clock()
        if (status is not None and 200 <= status < 300) or now - t0 + interval > bound:
            break
        sleep(max(0.0, interval - (now - started)))
    return {"service": service, "url": url(address, port, path), "status": status, "reason": reason,
            "error": error, "attempts": attempts, "seconds": round(now - t0, 2)}


def health_targets(services: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """(service, port, path) of each declared service with a health path and ports."""
    found = []
    for svc in services:
        health, ports = svc.get("health"), svc.get("ports")
        if (not svc.get("invalid") and isinstance(health, str) and health.startswith("/") and isinstance(ports, list)
                and ports and isinstance(ports[0], int)):
            found.append((str(svc.get("name")), ports[0], health))
    return found


class HealthThreads:
    """Asks every health endpoint at once, in threads, while the other facts are gathered."""

    def __init__(self, targets: list[tuple[str, int, str]]) -> None:
        self.results: list[dict[str, Any] | None] = [None] * len(targets)
        self.threads = [threading.Thread(target=self._ask, args=(i, t), daemon=True) for i, t in enumerate(targets)]
        for t in self.threads:
            t.start()

    def _ask(self, i: int, target: tuple[str, int, str]) -> None:
        self.results[i] = ask_health(*target)

    def join(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + HEALTH_TIMEOUT + HEALTH_REQUEST_TIMEOUT
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [r for r in self.results if r is not None]


# the rest ----------------------------------------------------------------------------------------

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
    found: list[dict[str, Any]] = []
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
    services = declared_services()
    health = HealthThreads(health_targets(services))
    mounted = mounts()
    procs = processes(me, list(mounted))
    sockets = listening()
    holders = socket_holders({s["inode"] for s in sockets}, me)
    for s in sockets:
        s["pids"] = sorted(holders.get(s["inode"], []))
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
        "services": services,
        "service_status": status,
        "listening": sockets,
        "processes": procs,
        "code": hashes(code_paths(procs), root_verified=ROOT_VERIFIED in sys.argv[1:]),
        "etc": etc_tree(),
        "tests": tests(),
        "state_version": read("/mnt/state/imageupdate/state.json"),
        "blocked": (read("/run/imageupdate/blocked") or "")[:2000] or None,  # node-migrate's refusal (a VM)
    }
    doc["health"] = health.join()
    json.dump(doc, sys.stdout)


if __name__ == "__main__":
    main()
