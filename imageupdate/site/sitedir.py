"""The local site's directory: where everything is, its configuration, its locks, the releases unpacked in it.

Layout::

    SITE/
      site.json          id, subnet, store, kind, nodes (name and index)
      .lock              flock(2) held by the process operating the site (its pid inside)
      key, key.pub       the site's SSH key; nodes accept it for root
      releases/R/        unpacked releases, shared read-only by every node
      nodes/NAME/        node.json, .lock, state/ (the node's /mnt/state), root/, console.log

Reading it changes nothing and needs no root; what changes the site (``lifecycle``: up, down, destroy;
``rebuild``: one node) takes the locks defined here.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base import locks
from imageupdate.base.errors import InputError
from imageupdate.images.store import ImageStore
from imageupdate.images.unpack import ensure_machine, ensure_release
from imageupdate.site.network import SiteNet
from imageupdate.site.node import Node, NodeStatus
from imageupdate.site.vmnode import VmNode

TOMBSTONE = "site.json.destroying"  # site.json renamed: the site is being destroyed (or its destroy was interrupted)
NODE_INIT = "usr/lib/imageupdate/init"  # what makes a release's tree runnable as a node


class SiteInUse(InputError):
    """Another process is operating this site directory."""


class SiteNotFound(InputError):
    """An operation on a site directory that holds no site."""


@dataclass
class SiteStatus:
    path: str
    up: bool
    subnet: str
    nodes: list[NodeStatus]


class SiteDir:
    """A site directory and the image store its releases come from. Construction touches nothing."""

    def __init__(self, path: Path, store: ImageStore) -> None:
        self.path = Path(path)
        self.store = store

    # layout and configuration --------------------------------------------------------------------

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

    def write_config(self, data: dict[str, object]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.config_path)

    @property
    def kind(self) -> str:
        """``namespace`` or ``vm``: what the site's nodes are (a site made before VM nodes: namespace)."""
        return str(self.config().get("kind", "namespace"))

    def net(self) -> SiteNet:
        return self.net_of(self.config())

    def nodes(self) -> list[Node]:
        return self.nodes_of(self.config())

    @staticmethod
    def net_of(cfg: dict[str, object]) -> SiteNet:
        missing = [key for key in ("id", "subnet") if not isinstance(cfg.get(key), str)]
        if missing:  # seen: 'site destroy' on a hand-made site.json printed a KeyError traceback
            raise SiteNotFound(f"the site's configuration names no {' or '.join(missing)}: not a site imageupdate "
                               "made, or a damaged one; name a site directory with --site")
        return SiteNet(str(cfg["id"]), str(cfg["subnet"]))

    def nodes_of(self, cfg: dict[str, object]) -> list[Node]:
        """The nodes ``cfg`` names (``cfg``: site.json as read, also from a destroy's tombstone)."""
        net = self.net_of(cfg)
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

    def status(self) -> SiteStatus:
        cfg = self.config()
        nodes = [n.status() for n in self.nodes() if n.exists()]
        return SiteStatus(str(self.path), any(n.running for n in nodes), str(cfg["subnet"]), nodes)

    # locking -------------------------------------------------------------------------------------

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

    # releases ------------------------------------------------------------------------------------

    def require_runnable(self, release: str) -> None:
        """``release`` can run on this site's nodes (a node init; on a VM site, a kernel): else bad input."""
        self.require_bootable(release, self.kind)

    def require_bootable(self, release: str, kind: str = "namespace") -> None:
        """A release whose image has no node init cannot run as a node: say so before anything starts."""
        if kind == "vm" and self.store.manifest(release).boot is None:
            raise InputError(f"release {release!r} has no kernel to boot (built as a tree only): a VM site needs "
                             f"'imageupdate build {release} --os imageupdate-debian-machine ...'", release=release)
        if (self.path / "releases" / release / NODE_INIT).is_file():
            return  # unpacked already: no need to read the 2 MB file index on every rebuild
        if NODE_INIT not in self.store.file_index(release):
            raise InputError(f"release {release!r} has no /{NODE_INIT} (built before imageupdate-node "
                             f"shipped one?); rebuild it with 'imageupdate build {release} --force ...'",
                             release=release)

    def unpack(self, release: str) -> None:
        """What a node of this site needs of ``release``: its tree (services, migrations, the namespace node's
        root) and, on a VM site, its kernel, initrd and root image."""
        ensure_release(self.store, release, self.path / "releases", self.path)
        if self.kind == "vm":
            ensure_machine(self.store, release, self.path / "releases", self.path)
