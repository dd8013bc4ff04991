"""One local node: namespaces on a read-only release tree, state kept apart.

A node is a network namespace (made by the site), and inside it a process
tree in its own mount, PID, UTS and IPC namespaces whose root is a read-only
bind of an unpacked release, with ``/mnt/state`` bound to the node's state
directory, tmpfs on ``/run``, ``/tmp`` and ``/dev``, and the image's own
init as PID 1. Everything mounted lives in the node's mount namespace: when
the node stops, the kernel drops it all.

``node.json`` is the node's record, always replaced atomically:
``current`` is the release the node runs (or will run when started),
``previous`` the one before (kept unpacked: a rollback needs no transfer),
``pending`` a rebuild in flight. A rebuild writes its intent, stops the
node, switches ``current`` in one rename, and starts it. Killed anywhere,
the node comes back on exactly one complete release: ``recover()`` drops a
pending rebuild that never switched and restarts a node that should run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageupdate.base import confined, procs
from imageupdate.base.crashpoints import crashpoint
from imageupdate.base.errors import ImageUpdateError, OperationError
from imageupdate.base.rootfs import boot
from imageupdate.images.upgrade_meta import from_tree
from imageupdate.site.network import SiteNet
from imageupdate.upgrade import state as state_version

STOP_GRACE = 10.0  # the node's init gives its services their stop_timeout (default 5 s), then SIGKILLs them
STOP_MARGIN = 5.0  # on top of the largest stop_timeout a release declares
READY_TIMEOUT = 60.0  # a first boot may run initdb and generate keys before a service listens
SERVICES_DIR = "usr/share/imageupdate/services"
MAX_STOP_TIMEOUT = 60.0

@dataclass
class NodeRecord:
    name: str
    index: int
    current: str
    previous: str | None = None
    pending: str | None = None
    wanted: str = "running"  # running | stopped
    pid: int | None = None  # host pid of the node's init (PID 1 inside)
    events: list[str] = field(default_factory=list)


@dataclass
class NodeStatus:
    name: str
    address: str
    current: str
    previous: str | None
    pending: str | None
    running: bool
    reachable: bool
    pid: int | None
    phases: dict[str, float] | None = None  # after a rebuild: when it stopped, switched, started, answered
    state: dict[str, Any] | None = None  # after a rebuild: what was done to the state (migrations, restore)
    paused: bool = False  # running, but its init or a process of its tree is stopped (SIGSTOP: state T)


def declared_services(tree: Path) -> list[dict[str, Any]]:
    """The service declarations of an unpacked release (validated at build; read defensively here)."""
    found: list[dict[str, Any]] = []
    try:  # the image controls the tree: read inside it (no link followed out, bounded)
        names = [n for n in confined.listdir(tree, SERVICES_DIR) if n.endswith(".json")]
    except (OSError, ImageUpdateError):
        return found
    for name in names:
        try:
            decl = json.loads(confined.read_bytes(tree, f"{SERVICES_DIR}/{name}", 1 << 20))
        except (OSError, ValueError, ImageUpdateError):
            continue
        if isinstance(decl, dict):
            found.append(decl)
    return found


def declared_ports(services: list[dict[str, Any]]) -> list[int]:
    ports = {p for s in services for p in (s.get("ports") or []) if isinstance(p, int) and 0 < p < 65536}
    return sorted(ports)


def stop_grace(services: list[dict[str, Any]]) -> float:
    """How long the host waits for a node's init to stop its services before it SIGKILLs the node."""
    longest = max((float(t) for s in services if isinstance(t := s.get("stop_timeout"), int | float)
                   and not isinstance(t, bool)), default=0.0)
    return max(STOP_GRACE, min(longest, MAX_STOP_TIMEOUT) + STOP_MARGIN)


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN inside the network namespace of ``pid``, on any address (loopback included):
    ``/proc/PID/net`` is the table of that process's namespace, read from the host without entering it."""
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            ports |= listening_in(Path(f"/proc/{pid}/net/{table}").read_text())
        except OSError:
            continue
    return ports


def listening_in(table: str) -> set[int]:
    """The ports in LISTEN in the text of ``/proc/net/tcp`` or ``tcp6`` (headers are skipped)."""
    ports: set[int] = set()
    for line in table.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3] == "0A" and ":" in parts[1]:
            try:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
            except ValueError:
                continue
    return ports


def tcp_open(address: str, port: int, timeout: float = 0.3) -> bool:
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        return True
    except OSError:
        return False


class Node:
    """The node API the site and the Heat plugin call. Construction touches nothing."""

    def __init__(self, directory: Path, net: SiteNet, releases_dir: Path, name: str, index: int) -> None:
        self.dir = directory
        self.net = net
        self.releases_dir = releases_dir
        self.name = name
        self.index = index

    # paths and record ----------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def record_path(self) -> Path:
        return self.dir / "node.json"

    @property
    def address(self) -> str:
        return self.net.address(self.index)

    def record(self) -> NodeRecord:
        return NodeRecord(**json.loads(self.record_path.read_text()))

    def _save(self, rec: NodeRecord, event: str | None = None) -> None:
        if event:
            rec.events = (rec.events + [f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {event}"])[-50:]
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(rec), indent=2) + "\n")
        os.replace(tmp, self.record_path)

    def exists(self) -> bool:
        return self.record_path.is_file()

    # lifecycle -------------------------------------------------------------------

    def create(self, release: str, authorized_key: str) -> None:
        """Lay out the node on ``release`` (already unpacked) and start it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        (self.dir / "root").mkdir(exist_ok=True)
        # an existing state is the node's: a link it planted at identity/ is refused, not written through
        confined.write_bytes(self.state_dir, "identity/authorized_keys", authorized_key.encode(), mode=0o600)
        confined.chmod_dir(self.state_dir, "identity", 0o755)
        state_version.seed(self.state_dir, from_tree(self.releases_dir / release), release)
        self._save(NodeRecord(self.name, self.index, current=release), f"created on {release}")
        self.start()

    def start(self) -> None:
        rec = self.record()
        if procs.alive(rec.pid):
            return
        tree = self.releases_dir / rec.current
        if not (tree / "etc/imageupdate/release.json").is_file():
            raise OperationError(f"release {rec.current} is not unpacked in {self.releases_dir}",
                                 node=self.name, release=rec.current, step="start")
        self._refuse_incompatible_state(rec.current, tree)
        if not self.net.netns_exists(self.name):
            self.net.create_node(self.name, self.index)
        self._kill_strays()
        with open(self.dir / "console.log", "ab") as console:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.net.netns(self.name),
                 "unshare", "--mount", "--pid", "--uts", "--ipc", "--fork", "--propagation", "private", "--",
                 *boot("node-boot", self.dir / "root", tree, self.state_dir, self.name, ["/usr/lib/imageupdate/init"])],
                stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        crashpoint("in-start", node=self.name)  # the node runs, its pid is not recorded yet
        if not procs.wait_until(lambda: bool(procs.children(proc.pid)) or proc.poll() is not None, 10):
            proc.kill()
            raise OperationError(f"node {self.name} did not start (see {self.dir / 'console.log'})",
                                 node=self.name, release=rec.current, step="start")
        kids = procs.children(proc.pid)
        if not kids:
            raise OperationError(f"node {self.name} exited at boot (see {self.dir / 'console.log'})",
                                 node=self.name, release=rec.current, step="start")
        rec.pid, rec.wanted = kids[0], "running"
        self._save(rec, f"started on {rec.current}")

    def services(self) -> list[dict[str, Any]]:
        """What the node's current release declares."""
        return declared_services(self.releases_dir / self.record().current)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str | None:
        """Wait until SSH answers on the node's address and every declared port listens inside the node
        (on any address: a service behind a proxy binds loopback); None when ready, else what is missing."""
        ports = declared_ports(self.services())
        missing: list[str] = []

        def ready() -> bool:
            pid = self.record().pid
            if not procs.alive(pid):
                missing[:] = ["running node (it exited)"]
                return True  # nothing to wait for
            listening = listening_ports(pid)  # type: ignore[arg-type]
            missing[:] = [f"port {p}" for p in ports if p not in listening]
            if not tcp_open(self.address, 22):
                missing.insert(0, f"SSH on {self.address}:22")
            return not missing

        procs.wait_until(ready, timeout, interval=0.1)
        return ", ".join(missing) or None

    def stop(self, grace: float | None = None, wanted: str = "stopped") -> str:
        rec = self.record()
        if grace is None:
            grace = stop_grace(declared_services(self.releases_dir / rec.current))
        wrapper = procs.parent(rec.pid) if rec.pid and procs.alive(rec.pid) else None
        how = procs.stop(rec.pid, grace) if rec.pid else "not running"
        if wrapper is not None and "unshare" in procs.cmdline(wrapper):
            procs.wait_until(lambda: not procs.alive(wrapper), 5.0)  # the unshare holding the namespaces exits too
        strays = self._kill_strays()
        if strays:
            how += f"; killed {strays} stray process{'es' if strays > 1 else ''} in its namespace"
        rec.pid, rec.wanted = None, wanted
        self._save(rec, f"stopped ({how})")
        return how

    def release_host_hold(self) -> None:
        """Let go of what the host holds of the node beyond its processes (a VM node's loop-mounted state
        disk); nothing for a namespace node."""

    def _refuse_incompatible_state(self, release: str, tree: Path) -> None:
        """A state this release's code cannot run on (not migrated, or half way through a step) stops the
        start: the node's service would otherwise corrupt it."""
        why = state_version.incompatible(state_version.read(self.state_dir), release, from_tree(tree))
        if why:
            raise OperationError(f"node {self.name} cannot start {release}: {why}",
                                 node=self.name, release=release, step="start")

    def _kill_strays(self) -> int:
        """Kill what still runs in the node's network namespace while no recorded instance does: an
        instance started by a rebuild killed before it recorded the pid, or what outlived a stop. Nothing
        but the node runs there, and a second instance would hold its ports."""
        return procs.kill_all(self.net.pids(self.name))

    def rebuild(self, release: str, prepare: Callable[[str, str], object] | None = None) -> dict[str, float]:
        """Switch the node to ``release`` (unpacked already), keeping its state; say when each phase ended.

        ``prepare(current, release)`` runs once the node is stopped, before the switch (the state's
        migrations). If it fails the node goes back to its current release, if that can run on the state."""
        phases = {"begun": time.time()}
        rec = self.record()
        if rec.current == release and procs.alive(rec.pid):
            return phases
        rec.pending = release
        self._save(rec, f"rebuild {rec.current} -> {release} begins")
        crashpoint("after-intent")
        self.stop(wanted="running")
        phases["stopped"] = time.time()
        crashpoint("after-stop")
        rec = self.record()
        if prepare is not None:
            try:
                prepare(rec.current, release)
            except Exception:
                rec.pending = None
                self._save(rec, f"rebuild to {release} abandoned: preparing the state failed")
                try:
                    self.start()
                except OperationError as e:
                    self._save(self.record(), f"stays stopped: {e.message}")
                raise
            phases["migrated"] = time.time()
        if rec.current != release:
            rec.previous, rec.current = rec.current, release
        rec.pending = None
        self._save(rec, f"switched to {release}")
        phases["switched"] = time.time()
        crashpoint("after-switch")
        self.start()
        phases["started"] = time.time()
        return phases

    def recover(self) -> str | None:
        """Bring the node back to one complete release after a crash; say what was done."""
        rec = self.record()
        said = None
        if rec.pending is not None:
            said = f"rebuild to {rec.pending} was interrupted before the switch; node stays on {rec.current}"
            rec.pending = None
            self._save(rec, said)
        if rec.pid and not procs.alive(rec.pid):
            rec.pid = None
            self._save(rec)
        if rec.wanted == "running" and not procs.alive(rec.pid):
            try:
                self.start()
                said = (said + "; " if said else "") + f"restarted on {rec.current}"
            except OperationError as e:
                said = (said + "; " if said else "") + f"stays stopped: {e.message}"
                self._save(self.record(), f"stays stopped: {e.message}")
        return said

    def status(self) -> NodeStatus:
        rec = self.record()
        running = procs.alive(rec.pid)
        paused = running and rec.pid is not None and any(procs.stopped(p) for p in procs.tree(rec.pid))
        # a stopped sshd's port still accepts connections (the kernel queues them): it does not answer
        return NodeStatus(self.name, self.address, rec.current, rec.previous, rec.pending, running,
                          running and not paused and tcp_open(self.address, 22), rec.pid if running else None,
                          paused=paused)

    def destroy(self) -> None:
        if self.exists():
            self.stop()
        self.net.delete_node(self.name, self.index)
        shutil.rmtree(self.dir, ignore_errors=True)
