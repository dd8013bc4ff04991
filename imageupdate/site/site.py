"""The local site: a directory that holds a small fleet on one machine.

Layout::

    SITE/
      site.json          id, subnet, store, nodes (name and index)
      .lock              flock(2) held by the process operating the site (its pid inside)
      key, key.pub       the site's SSH key; nodes accept it for root
      releases/R/        unpacked releases, shared read-only by every node
      nodes/NAME/        node.json, state/ (the node's /mnt/state), root/, console.log

``site down`` stops every node and removes the network (bridge, namespaces,
veths); node state and unpacked releases stay, and ``site up`` brings the
same nodes back. ``site destroy`` also removes the directory: it first renames
``site.json`` to ``site.json.destroying`` (so a rebuild that was waiting for the
site lock finds no site and gives up), then stops everything, removes every
namespace and link named for the site, and the directory, before it lets go of
the lock.

While an operation (a rollout or rollback) is open, ``site down``, ``site
destroy`` and ``site rebuild`` refuse unless forced (:mod:`imageupdate.site.guard`).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base import locks, procs
from imageupdate.base.errors import ImageUpdateError, InputError, OperationError
from imageupdate.base.hostdeps import require, require_root
from imageupdate.heat.service import HeatService
from imageupdate.history.db import History
from imageupdate.images import signing
from imageupdate.images.store import ImageStore, validate_release_id
from imageupdate.images.unpack import ensure_machine, ensure_release
from imageupdate.site.guard import refuse_while_open
from imageupdate.site.network import MAX_NODES, SiteNet, ip, netns_pids, pick_subnet, picking
from imageupdate.site.node import READY_TIMEOUT, Node, NodeStatus
from imageupdate.site.vmnode import VmNode
from imageupdate.upgrade.migrate import Migrator, StateChange

DEFAULT_SITE = Path("/var/lib/imageupdate/site")
VM_MEMORY_MB = 600  # a TCG VM of 512 MiB measured 290 MB of QEMU RSS with tb-size=64; the guest may use it all
NODE_MEMORY_MB = 48  # an idle sample node measured 17 MiB PSS (bench_site.py); RSS and growth margin
SITE_TOOLS = {
    "ip": "apt-get install iproute2",
    "unshare": "apt-get install util-linux",
    "ssh-keygen": "apt-get install openssh-client",
    "zstd": "apt-get install zstd",
    "tar": "apt-get install tar",
}
VM_TOOLS = {  # a site of VM nodes, on top of SITE_TOOLS
    "qemu-system-x86_64": "apt-get install qemu-system-x86",
    "mkfs.ext4": "apt-get install e2fsprogs",
    "mount": "apt-get install mount",
}
TOMBSTONE = "site.json.destroying"  # site.json renamed: the site is being destroyed (or its destroy was interrupted)
NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")

# what each command would do to an open operation (see imageupdate.site.guard)
BREAKS_DESTROY = "would delete every node's state, snapshots and the history"
BREAKS_DOWN = "would stop every node and the site's Heat under it"
BREAKS_HEAT_STOP = "would stop the Heat that runs it, with its stack update half done"


class SiteInUse(InputError):
    """Another process is operating this site directory."""


class SiteAlreadyUp(InputError):
    """``site up`` on a site whose nodes run."""


class SiteNotFound(InputError):
    """An operation on a site directory that holds no site."""


def default_site() -> Path:
    return Path(os.environ.get("IMAGEUPDATE_SITE") or DEFAULT_SITE)


@dataclass
class SiteStatus:
    path: str
    up: bool
    subnet: str
    nodes: list[NodeStatus]


def _available_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


MAX_LOCK_WAIT = 86400.0  # seconds a rebuild may wait for the site's or node's lock


class LocalSite:
    """Construction touches nothing; every operation takes the site lock."""

    def __init__(self, path: Path | None = None, store: ImageStore | None = None) -> None:
        self.path = Path(path) if path is not None else default_site()
        self.store = store or ImageStore()

    @classmethod
    def open(cls, path: Path | None = None, store: Path | None = None) -> LocalSite:
        """The site at ``path`` with ``store``; without one (and without IMAGEUPDATE_STORE), the store the
        site was created with, so later commands need not repeat ``--store``."""
        site = cls(path)
        if store is None and not os.environ.get("IMAGEUPDATE_STORE") and site.exists():
            recorded = site.config().get("store")
            store = Path(str(recorded)) if recorded else None
        site.store = ImageStore(store)
        return site

    # layout ------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "site.json"

    @property
    def tombstone_path(self) -> Path:
        return self.path / TOMBSTONE

    def exists(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> dict[str, object]:
        try:
            data: dict[str, object] = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            if self.tombstone_path.is_file():
                raise SiteNotFound(f"site {self.path} is being destroyed (or its destroy was interrupted); "
                                   f"finish with 'imageupdate site destroy --site {self.path}'") from None
            raise SiteNotFound(f"no site in {self.path}; create one with "
                               f"'imageupdate site up --nodes N --release R --site {self.path}'") from None
        except (NotADirectoryError, IsADirectoryError, PermissionError, UnicodeDecodeError, ValueError) as e:
            raise SiteNotFound(f"{self.path} does not hold a readable site ({type(e).__name__}: "
                               f"{getattr(e, 'strerror', None) or e}); name a site directory with --site") from None
        if not isinstance(data, dict):
            raise SiteNotFound(f"{self.config_path} is not a site's configuration (not a JSON object); "
                               "name a site directory with --site")
        return data

    def _write_config(self, data: dict[str, object]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.config_path)

    def net(self) -> SiteNet:
        return self._net_of(self.config())

    def nodes(self) -> list[Node]:
        return self._nodes_of(self.config())

    @staticmethod
    def _net_of(cfg: dict[str, object]) -> SiteNet:
        return SiteNet(str(cfg["id"]), str(cfg["subnet"]))

    def _nodes_of(self, cfg: dict[str, object]) -> list[Node]:
        net = self._net_of(cfg)
        kind = VmNode if cfg.get("kind") == "vm" else Node
        return [kind(self.path / "nodes" / n["name"], net, self.path / "releases", n["name"], n["index"])
                for n in cfg["nodes"]]  # type: ignore[attr-defined]

    def node(self, name: str) -> Node:
        nodes = self.nodes()
        for n in nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in nodes)
        raise InputError(f"unknown node {name!r} in site {self.path} (nodes: {known})", node=name)

    # locking -----------------------------------------------------------------

    @contextmanager
    def locked(self, shared: bool = False, wait: float = 0.0, create: bool = True) -> Iterator[None]:
        """The site lock: exclusive for site-wide operations, shared for node rebuilds (each of which also
        takes its node's lock), so a batch of nodes can be rebuilt at once but never during ``site down``.
        With ``create=False`` neither the directory nor the lock file is made: no site, SiteNotFound."""
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path / ".lock", os.O_RDWR | (os.O_CREAT if create or self.exists() else 0), 0o644)
        except FileNotFoundError:
            self.config()  # SiteNotFound, saying why
            raise
        try:
            if not locks.flock_wait(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, wait):
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise SiteInUse(f"site {self.path} is in use by process {owner}; wait for it to finish "
                                "or stop it, then retry") from None
            if not shared:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def node_locked(self, node: Node, wait: float) -> Iterator[None]:
        fd = os.open(node.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not locks.flock_wait(fd, fcntl.LOCK_EX, wait):
                raise SiteInUse(f"node {node.name} is being rebuilt by another process; wait for it to finish",
                                node=node.name)
            yield
        finally:
            os.close(fd)

    # operations --------------------------------------------------------------

    def up(self, nodes: int | None = None, release: str | None = None, kind: str | None = None) -> SiteStatus:
        require_root("local nodes are Linux namespaces, which need root to create")
        require(SITE_TOOLS)
        fresh = not self.path.exists()
        try:
            with self.locked():
                if not self.exists() and self.tombstone_path.exists():
                    self.config()  # SiteNotFound: a destroy was interrupted; finish it first
                # release trees keep their setuid files, nodes' state is private, the SSH key is secret:
                # no other host user may walk in
                os.chmod(self.path, 0o700)
                signing.trust_own_key(self.path)  # a site made (or first brought up) here trusts this host's key
                if self.exists():
                    if kind is not None and kind != self.kind:
                        raise InputError(f"site {self.path} has {self.kind} nodes; 'site destroy' it to start over "
                                         f"with {kind} nodes")
                    return self._up_existing(nodes, release)
                return self._up_new(nodes, release, kind or "namespace")
        except InputError:
            if fresh:  # bad input leaves no directory behind either
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _up_new(self, nodes: int | None, release: str | None, kind: str = "namespace") -> SiteStatus:
        if nodes is None or release is None:
            raise InputError("a new site needs --nodes N and --release R")
        if not 1 <= nodes <= MAX_NODES:
            raise InputError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
        if kind == "vm":
            require(VM_TOOLS)
        self.store.require_trusted(release, self.path)  # not found, not signed: before anything is made
        self._require_bootable(release, kind)
        need, free = nodes * (VM_MEMORY_MB if kind == "vm" else NODE_MEMORY_MB), _available_memory_mb()
        if need > free // 2:
            raise InputError(f"{nodes} nodes need about {need} MiB and only {free} MiB are available; "
                             "ask for fewer nodes")
        return self._create(nodes, release, kind)

    def _create(self, count: int, release: str, kind: str = "namespace") -> SiteStatus:
        (self.path / "releases").mkdir(parents=True, exist_ok=True)
        try:
            with picking():
                cfg: dict[str, object] = {
                    "id": secrets.token_hex(3),
                    "subnet": pick_subnet(),
                    "store": str(self.store.root),
                    "kind": kind,
                    "nodes": [{"name": f"node{i}", "index": i} for i in range(count)],
                }
                self._write_config(cfg)
                self.net().create_bridge()
            key = self._ensure_key()
            self._unpack(release)
            for node in self.nodes():
                node.create(release, key)
            self._wait_ready()
        except InputError:
            self._teardown(remove=True)  # refused before any node ran: nothing half-created stays behind
            raise
        except OperationError as e:
            # a node that did not boot: its console and service logs are what the operator needs, so the
            # nodes and network go down but the directory stays, and the error says where to look
            self._teardown(remove=False)
            raise OperationError(f"{e.message}; the site is down and kept for inspection (console logs in "
                                 f"{self.path}/nodes/NODE/console.log, service logs in "
                                 f"{self.path}/nodes/NODE/state/var/log/); remove it with "
                                 f"'imageupdate site destroy --site {self.path}'",
                                 node=e.node, release=e.release, step=e.step) from e
        except BaseException:
            self._teardown(remove=True)  # interrupted: nothing half-created stays behind
            raise
        return self._status()

    def _up_existing(self, nodes: int | None, release: str | None) -> SiteStatus:
        cfg = self.config()
        if nodes is not None and nodes != len(cfg["nodes"]):  # type: ignore[arg-type]
            raise InputError(f"site {self.path} has {len(cfg['nodes'])} nodes; "  # type: ignore[arg-type]
                             "'site destroy' it to start over with another size")
        if any(procs.alive(n.record().pid) for n in self.nodes() if n.exists()):
            raise SiteAlreadyUp(f"site {self.path} is already up; see 'imageupdate site status'")
        self._clear_stale()
        self.net().create_bridge()
        stopped = []
        for node in self.nodes():
            said = node.recover()
            if said and "stays stopped" in said:
                stopped.append(f"{node.name} {said[said.index('stays stopped'):]}")
        self._wait_ready(skip={s.split()[0] for s in stopped})
        if stopped:  # the rest of the site is up; these need a rollback or a resume
            raise OperationError(f"site up, but {'; '.join(stopped)}", node=stopped[0].split()[0], step="start")
        return self._status()

    @property
    def kind(self) -> str:
        """``namespace`` or ``vm``: what the site's nodes are (a site made before VM nodes: namespace)."""
        return str(self.config().get("kind", "namespace"))

    def require_runnable(self, release: str) -> None:
        """``release`` can run on this site's nodes (a node init; on a VM site, a kernel): else bad input."""
        self._require_bootable(release, self.kind)

    def _unpack(self, release: str) -> None:
        """What a node of this site needs of ``release``: its tree (services, migrations, the namespace node's
        root) and, on a VM site, its kernel, initrd and root image."""
        ensure_release(self.store, release, self.path / "releases", self.path)
        if self.kind == "vm":
            ensure_machine(self.store, release, self.path / "releases", self.path)

    def _require_bootable(self, release: str, kind: str = "namespace") -> None:
        """A release whose image has no node init cannot run as a node: say so before anything starts."""
        if kind == "vm" and self.store.manifest(release).boot is None:
            raise InputError(f"release {release!r} has no kernel to boot (built as a tree only): a VM site needs "
                             f"'imageupdate build {release} --os imageupdate-debian-machine ...'", release=release)
        if (self.path / "releases" / release / "usr/lib/imageupdate/init").is_file():
            return  # unpacked already: no need to read the 2 MB file index on every rebuild
        if "usr/lib/imageupdate/init" not in self.store.file_index(release):
            raise InputError(f"release {release!r} has no /usr/lib/imageupdate/init (built before imageupdate-node "
                             f"shipped one?); rebuild it with 'imageupdate build {release} --force ...'",
                             release=release)

    def _wait_ready(self, skip: set[str] | None = None) -> None:
        for node in self.nodes():
            if node.name in (skip or set()):
                continue
            missing = node.wait_ready()
            if missing is not None:
                raise OperationError(f"node {node.name} is not ready after {READY_TIMEOUT:.0f} s: no {missing} "
                                     f"(console: {node.dir / 'console.log'}; service logs: "
                                     f"{node.state_dir / 'var/log/imageupdate'})", node=node.name,
                                     release=node.record().current, step="boot")

    def _ensure_key(self) -> str:
        key = self.path / "key"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"imageupdate-site {self.path}",
                            "-f", str(key)], check=True)
        return (self.path / "key.pub").read_text()

    def _clear_stale(self) -> None:
        """After a crash: dead pids, stale namespaces and links of this site."""
        net = self.net()
        for node in self.nodes():
            if node.exists() and not procs.alive(node.record().pid):
                net.delete_node(node.name, node.index)

    def _teardown(self, remove: bool, cfg: dict[str, object] | None = None) -> None:
        """Stop the site's Heat and every node, remove every namespace and link named for the site (a
        half-built node's too) and the bridge; with ``remove`` the directory as well. ``cfg`` is the site's
        config when site.json is no longer where it was (a destroy under way)."""
        HeatService(self.path / "heat").stop()  # the site's Heat goes down with it; its stacks stay in SQLite
        if cfg is None and self.exists():
            cfg = self.config()
        if cfg is not None:
            net = self._net_of(cfg)
            for node in self._nodes_of(cfg):
                if node.exists():
                    # a half-written node may not stop cleanly: what still runs in its namespace is killed below
                    with suppress(OSError, ValueError, TypeError, ImageUpdateError):
                        node.stop(wanted="running")
                with suppress(OSError, ImageUpdateError):
                    node.release_host_hold()  # a state disk a killed rebuild left mounted: before any rmtree
                net.delete_node(node.name, node.index)
            _sweep_network(net)
            net.delete_bridge()
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)

    def down(self, force: bool = False) -> SiteStatus:
        """Stop every node and the site's Heat and remove the network; state stays. Refused while an
        operation is open, unless ``force``."""
        require_root("stopping namespaces and removing network devices needs root")
        with self.locked():
            self.config()
            refuse_while_open(self.path, "site down", BREAKS_DOWN, force)
            self._teardown(remove=False)
            return self._status()

    def destroy(self, force: bool = False) -> None:
        """``site down``, then delete the directory: nodes' state, snapshots, the history, everything.
        Refused while an operation is open, unless ``force``. A destroy that was interrupted is finished."""
        require_root("stopping namespaces and removing network devices needs root")
        with self.locked():
            self._destroy(force)

    def _destroy(self, force: bool) -> None:
        """The destroy, with the site lock held (exclusive) by the caller. The lock is let go only once
        the directory is gone, so a rebuild that waited for it finds no site and changes nothing."""
        if not self.tombstone_path.exists():  # an interrupted destroy had already been allowed
            refuse_while_open(self.path, "site destroy", BREAKS_DESTROY, force)
        cfg: dict[str, object] | None = None
        if self.exists():
            os.replace(self.config_path, self.tombstone_path)  # from now on, no command sees a site here
        if self.tombstone_path.exists():
            try:
                cfg = json.loads(self.tombstone_path.read_text())
            except (OSError, ValueError):
                cfg = None
        self._teardown(remove=True, cfg=cfg)

    def stop_heat(self, force: bool = False) -> str:
        """Stop the site's Heat (its stacks stay in SITE/heat/heat.sqlite); say how it ended. Refused while
        an operation is open, unless ``force``."""
        refuse_while_open(self.path, "heat stop", BREAKS_HEAT_STOP, force)
        return HeatService(self.path / "heat").stop()

    def rebuild(self, node_name: str, release: str, wait: float = 0.0, force: bool = False,
                by_heat: bool = False) -> NodeStatus:
        """Rebuild one node; ``wait`` bounds how long to wait for a concurrent operation on it.

        While an operation is open only the operation's own rebuilds run (``by_heat``: started by the
        site's Heat for it); anyone else's is refused unless ``force``. Both checks (the site still
        exists, no operation forbids this) are made once the locks are held: a rebuild may have waited
        for minutes, and the site may have been destroyed meanwhile."""
        require_root("rebuilding a node mounts in its namespaces")
        if not 0 <= wait <= MAX_LOCK_WAIT:
            raise InputError(f"--wait-lock must be between 0 and {MAX_LOCK_WAIT:.0f} seconds (a day), not {wait:g}")
        self.node(node_name)  # unknown node or no site: say so before waiting for anything
        validate_release_id(release)  # nor a path made of a hostile release id
        command = f"site rebuild {node_name} {release}"
        breaks = (f"would change {node_name} under it, and it would then report that node's release and "
                  "migration as its own")
        if not by_heat:
            refuse_while_open(self.path, command, breaks, force)
        with self.locked(shared=True, wait=wait, create=False):
            if not self.exists():
                raise SiteNotFound(f"site {self.path} was destroyed while the rebuild of {node_name} to {release} "
                                   "waited for it; nothing was changed", node=node_name, release=release)
            node = self.node(node_name)
            if not node.dir.is_dir() or not node.net.bridge_exists():  # half built, or taken down while we waited
                raise InputError(f"site {self.path} is down (or node {node_name} was never created); bring it up "
                                 f"with 'imageupdate site up --site {self.path}', then rebuild", node=node_name,
                                 release=release)
            with self.node_locked(node, wait):
                if not by_heat:
                    refuse_while_open(self.path, command, breaks, force)
                return self._rebuild(node, release)

    def _rebuild(self, node: Node, release: str) -> NodeStatus:
        self._require_bootable(release, self.kind)
        self._unpack(release)
        change = StateChange()
        migrator = self.migrator(node)
        migrator.prefetch(node.record().current, release)

        def prepare(current: str, target: str) -> None:
            nonlocal change
            change = migrator.prepare(current, target)

        phases = node.rebuild(release, prepare)
        missing = node.wait_ready()
        if missing is not None:
            raise OperationError(f"node {node.name} is not ready after the rebuild to {release}: no {missing} "
                                 f"within {READY_TIMEOUT:.0f} s (service logs: "
                                 f"{node.state_dir / 'var/log/imageupdate'})",
                                 node=node.name, release=release, step="boot")
        phases["ready"] = time.time()
        status = node.status()
        status.phases = phases
        status.state = change.to_dict()
        return status

    def migrator(self, node: Node) -> Migrator:
        """Runs ``node``'s state migrations; intermediate releases that passed a gate here are preferred."""
        return Migrator(self.path, self.store, node.name, node.state_dir, node.dir / "snapshots",
                        preferred=History(self.path / "history.sqlite").good_releases())

    def recover(self) -> list[str]:
        with self.locked():
            return [f"{n.name}: {said}" for n in self.nodes() if n.exists() and (said := n.recover())]

    def status(self) -> SiteStatus:
        self.config()
        return self._status()

    def _status(self) -> SiteStatus:
        cfg = self.config()
        nodes = [n.status() for n in self.nodes() if n.exists()]
        return SiteStatus(str(self.path), any(n.running for n in nodes), str(cfg["subnet"]), nodes)


def _sweep_network(net: SiteNet) -> None:
    """Remove every network namespace and host link named for this site, whatever site.json says: a node
    that was half created (or created by a rebuild that raced a destroy) leaves nothing behind. What still
    runs in such a namespace is one of the site's node processes: it is killed first."""
    prefix = net.netns("")
    try:
        namespaces = sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except OSError:
        namespaces = []
    procs.kill_all([pid for ns in namespaces for pid in netns_pids(ns)])
    for ns in namespaces:
        ip("netns", "del", ns, check=False)
    veth_prefix = net.veth(0)[:-3]  # iuvID + the node's 3-digit index
    try:
        links = sorted(p.name for p in SYS_NET.iterdir() if p.name.startswith(veth_prefix))
    except OSError:
        links = []
    for link in links:
        ip("link", "del", link, check=False)
