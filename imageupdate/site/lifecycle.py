"""The local site's life: bring it up (new or again), take it down, destroy it, stop its Heat.

``site up`` on a new directory creates the network (a bridge in a free subnet), the SSH key and every node
on one release, then waits until each node is ready; bad input leaves nothing behind, a node that does not
boot leaves the site down with its logs for inspection. ``site up`` on an existing site clears what a crash
left and brings the same nodes back. ``site down`` stops every node and the site's Heat and removes the
network (bridge, namespaces, veths); node state and unpacked releases stay. ``site destroy`` also removes
the directory: it first renames ``site.json`` to ``site.json.destroying`` (so a rebuild that was waiting for
the site lock finds no site and gives up), then stops everything, removes every namespace and link named for
the site, and the directory, before it lets go of the lock.

While an operation (a rollout or rollback) is open, ``site down``, ``site destroy`` and ``heat stop`` refuse
unless forced (:mod:`imageupdate.site.guard`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from contextlib import suppress
from pathlib import Path

from imageupdate.base import procs
from imageupdate.base.errors import ImageUpdateError, InputError, OperationError
from imageupdate.base.hostdeps import require, require_root
from imageupdate.heat.service import HeatService
from imageupdate.images import signing
from imageupdate.site.guard import refuse_while_open
from imageupdate.site.network import MAX_NODES, SiteNet, ip, netns_pids, pick_subnet, picking
from imageupdate.site.node import READY_TIMEOUT
from imageupdate.site.sitedir import SiteDir, SiteStatus

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
NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")

# what each command would do to an open operation (see imageupdate.site.guard)
BREAKS_DESTROY = "would delete every node's state, snapshots and the history"
BREAKS_DOWN = "would stop every node and the site's Heat under it"
BREAKS_HEAT_STOP = "would stop the Heat that runs it, with its stack update half done"


class SiteAlreadyUp(InputError):
    """``site up`` on a site whose nodes run."""


def _available_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


# up ----------------------------------------------------------------------------------------------


def up(site: SiteDir, nodes: int | None = None, release: str | None = None, kind: str | None = None) -> SiteStatus:
    """A new site of ``nodes`` nodes on ``release``, or an existing one brought back up."""
    require_root("local nodes are Linux namespaces, which need root to create")
    require(SITE_TOOLS)
    fresh = not site.path.exists()
    try:
        with site.locked():
            if not site.exists() and site.tombstone_path.exists():
                site.config()  # SiteNotFound: a destroy was interrupted; finish it first
            # release trees keep their setuid files, nodes' state is private, the SSH key is secret:
            # no other host user may walk in
            os.chmod(site.path, 0o700)
            signing.trust_own_key(site.path)  # a site made (or first brought up) here trusts this host's key
            if site.exists():
                if kind is not None and kind != site.kind:
                    raise InputError(f"site {site.path} has {site.kind} nodes; 'site destroy' it to start over "
                                     f"with {kind} nodes")
                return _up_existing(site, nodes, release)
            return _up_new(site, nodes, release, kind or "namespace")
    except InputError:
        if fresh:  # bad input leaves no directory behind either
            shutil.rmtree(site.path, ignore_errors=True)
        raise


def _up_new(site: SiteDir, nodes: int | None, release: str | None, kind: str = "namespace") -> SiteStatus:
    if nodes is None or release is None:
        raise InputError("a new site needs --nodes N and --release R")
    if not 1 <= nodes <= MAX_NODES:
        raise InputError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
    if kind == "vm":
        require(VM_TOOLS)
    site.store.require_trusted(release, site.path)  # not found, not signed: before anything is made
    site.require_bootable(release, kind)
    need, free = nodes * (VM_MEMORY_MB if kind == "vm" else NODE_MEMORY_MB), _available_memory_mb()
    if need > free // 2:
        raise InputError(f"{nodes} nodes need about {need} MiB and only {free} MiB are available; "
                         "ask for fewer nodes")
    return create(site, nodes, release, kind)


def create(site: SiteDir, count: int, release: str, kind: str = "namespace") -> SiteStatus:
    """Make the site's network, key and ``count`` nodes on ``release`` (the site lock is held)."""
    (site.path / "releases").mkdir(parents=True, exist_ok=True)
    try:
        with picking():
            cfg: dict[str, object] = {
                "id": secrets.token_hex(3),
                "subnet": pick_subnet(),
                "store": str(site.store.root),
                "kind": kind,
                "nodes": [{"name": f"node{i}", "index": i} for i in range(count)],
            }
            site.write_config(cfg)
            site.net().create_bridge()
        key = _ensure_key(site)
        site.unpack(release)
        for node in site.nodes():
            node.create(release, key)
        _wait_ready(site)
    except InputError:
        teardown(site, remove=True)  # refused before any node ran: nothing half-created stays behind
        raise
    except OperationError as e:
        # a node that did not boot: its console and service logs are what the operator needs, so the
        # nodes and network go down but the directory stays, and the error says where to look
        teardown(site, remove=False)
        raise OperationError(f"{e.message}; the site is down and kept for inspection (console logs in "
                             f"{site.path}/nodes/NODE/console.log, service logs in "
                             f"{site.path}/nodes/NODE/state/var/log/); remove it with "
                             f"'imageupdate site destroy --site {site.path}'",
                             node=e.node, release=e.release, step=e.step) from e
    except BaseException:
        teardown(site, remove=True)  # interrupted: nothing half-created stays behind
        raise
    return site.status()


def _up_existing(site: SiteDir, nodes: int | None, release: str | None) -> SiteStatus:
    cfg = site.config()
    if nodes is not None and nodes != len(cfg["nodes"]):  # type: ignore[arg-type]
        raise InputError(f"site {site.path} has {len(cfg['nodes'])} nodes; "  # type: ignore[arg-type]
                         "'site destroy' it to start over with another size")
    if any(procs.alive(n.record().pid) for n in site.nodes() if n.exists()):
        raise SiteAlreadyUp(f"site {site.path} is already up; see 'imageupdate site status'")
    _clear_stale(site)
    site.net().create_bridge()
    stopped = []
    for node in site.nodes():
        said = node.recover()
        if said and "stays stopped" in said:
            stopped.append(f"{node.name} {said[said.index('stays stopped'):]}")
    _wait_ready(site, skip={s.split()[0] for s in stopped})
    if stopped:  # the rest of the site is up; these need a rollback or a resume
        raise OperationError(f"site up, but {'; '.join(stopped)}", node=stopped[0].split()[0], step="start")
    return site.status()


def _wait_ready(site: SiteDir, skip: set[str] | None = None) -> None:
    for node in site.nodes():
        if node.name in (skip or set()):
            continue
        missing = node.wait_ready()
        if missing is not None:
            raise OperationError(f"node {node.name} is not ready after {READY_TIMEOUT:.0f} s: no {missing} "
                                 f"(console: {node.dir / 'console.log'}; service logs: "
                                 f"{node.state_dir / 'var/log/imageupdate'})", node=node.name,
                                 release=node.record().current, step="boot")


def _ensure_key(site: SiteDir) -> str:
    key = site.path / "key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"imageupdate-site {site.path}",
                        "-f", str(key)], check=True)
    return (site.path / "key.pub").read_text()


def _clear_stale(site: SiteDir) -> None:
    """After a crash: dead pids, stale namespaces and links of this site."""
    net = site.net()
    for node in site.nodes():
        if node.exists() and not procs.alive(node.record().pid):
            net.delete_node(node.name, node.index)


# down and destroy --------------------------------------------------------------------------------


def down(site: SiteDir, force: bool = False) -> SiteStatus:
    """Stop every node and the site's Heat and remove the network; state stays. Refused while an
    operation is open, unless ``force``."""
    require_root("stopping namespaces and removing network devices needs root")
    with site.locked():
        site.config()
        refuse_while_open(site.path, "site down", BREAKS_DOWN, force)
        teardown(site, remove=False)
        return site.status()


def destroy(site: SiteDir, force: bool = False) -> None:
    """``site down``, then delete the directory: nodes' state, snapshots, the history, everything.
    Refused while an operation is open, unless ``force``. A destroy that was interrupted is finished.
    The site lock is let go only once the directory is gone, so a rebuild that waited for it finds no
    site and changes nothing."""
    require_root("stopping namespaces and removing network devices needs root")
    with site.locked():
        destroy_locked(site, force)


def destroy_locked(site: SiteDir, force: bool) -> None:
    """The destroy, with the site lock held (exclusive) by the caller."""
    if not site.tombstone_path.exists():  # an interrupted destroy had already been allowed
        refuse_while_open(site.path, "site destroy", BREAKS_DESTROY, force)
    cfg: dict[str, object] | None = None
    if site.exists():
        os.replace(site.config_path, site.tombstone_path)  # from now on, no command sees a site here
    if site.tombstone_path.exists():
        try:
            cfg = json.loads(site.tombstone_path.read_text())
        except (OSError, ValueError):
            cfg = None
    teardown(site, remove=True, cfg=cfg)


def stop_heat(site: SiteDir, force: bool = False) -> str:
    """Stop the site's Heat (its stacks stay in SITE/heat/heat.sqlite); say how it ended. Refused while
    an operation is open, unless ``force``."""
    refuse_while_open(site.path, "heat stop", BREAKS_HEAT_STOP, force)
    return HeatService(site.path / "heat").stop()


def teardown(site: SiteDir, remove: bool, cfg: dict[str, object] | None = None) -> None:
    """Stop the site's Heat and every node, remove every namespace and link named for the site (a
    half-built node's too) and the bridge; with ``remove`` the directory as well. ``cfg`` is the site's
    config when site.json is no longer where it was (a destroy under way)."""
    HeatService(site.path / "heat").stop()  # the site's Heat goes down with it; its stacks stay in SQLite
    if cfg is None and site.exists():
        cfg = site.config()
    if cfg is not None:
        net = site.net_of(cfg)
        for node in site.nodes_of(cfg):
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
        shutil.rmtree(site.path, ignore_errors=True)


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
