"""One node of the local site rebuilt onto a release: the node operation the site's Heat runs for each server.

A rebuild takes the site lock shared (so a batch of nodes can be rebuilt at once, but never during ``site
down``) and its node's lock exclusive, then switches the node to the release's image, migrating its state on
the way (``upgrade.migrate``), and waits until the node is ready. While an operation is open only its own
rebuilds run (started by the site's Heat for it); anyone else's is refused unless forced
(:mod:`imageupdate.site.guard`).
"""

from __future__ import annotations

import time

from imageupdate.base.errors import InputError, OperationError
from imageupdate.base.hostdeps import require_root
from imageupdate.history.db import History
from imageupdate.images.store import validate_release_id
from imageupdate.site.guard import refuse_while_open
from imageupdate.site.node import READY_TIMEOUT, Node, NodeStatus
from imageupdate.site.sitedir import SiteDir, SiteNotFound
from imageupdate.upgrade.migrate import Migrator, StateChange

MAX_LOCK_WAIT = 86400.0  # seconds a rebuild may wait for the site's or node's lock


def rebuild(site: SiteDir, node_name: str, release: str, wait: float = 0.0, force: bool = False,
            by_heat: bool = False) -> NodeStatus:
    """Rebuild one node; ``wait`` bounds how long to wait for a concurrent operation on it.

    While an operation is open only the operation's own rebuilds run (``by_heat``: started by the
    site's Heat for it); anyone else's is refused unless ``force``. Both checks (the site still
    exists, no operation forbids this) are made once the locks are held: a rebuild may have waited
    for minutes, and the site may have been destroyed meanwhile."""
    require_root("rebuilding a node mounts in its namespaces")
    if not 0 <= wait <= MAX_LOCK_WAIT:
        raise InputError(f"--wait-lock must be between 0 and {MAX_LOCK_WAIT:.0f} seconds (a day), not {wait:g}")
    site.node(node_name)  # unknown node or no site: say so before waiting for anything
    validate_release_id(release)  # nor a path made of a hostile release id
    command = f"site rebuild {node_name} {release}"
    breaks = (f"would change {node_name} under it, and it would then report that node's release and "
              "migration as its own")
    if not by_heat:
        refuse_while_open(site.path, command, breaks, force)
    with site.locked(shared=True, wait=wait, create=False):
        if not site.exists():
            raise SiteNotFound(f"site {site.path} was destroyed while the rebuild of {node_name} to {release} "
                               "waited for it; nothing was changed", node=node_name, release=release)
        node = site.node(node_name)
        if not node.dir.is_dir() or not node.net.bridge_exists():  # half built, or taken down while we waited
            raise InputError(f"site {site.path} is down (or node {node_name} was never created); bring it up "
                             f"with 'imageupdate site up --site {site.path}', then rebuild", node=node_name,
                             release=release)
        with site.node_locked(node, wait):
            if not by_heat:
                refuse_while_open(site.path, command, breaks, force)
            return switch(site, node, release)


def switch(site: SiteDir, node: Node, release: str) -> NodeStatus:
    """The rebuild itself, both locks held: unpack, migrate the state on the way, start, wait until ready."""
    site.require_bootable(release, site.kind)
    site.unpack(release)
    change = StateChange()
    migrator = node_migrator(site, node)
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


def node_migrator(site: SiteDir, node: Node) -> Migrator:
    """Runs ``node``'s state migrations; intermediate releases that passed a gate here are preferred."""
    return Migrator(site.path, site.store, node.name, node.state_dir, node.dir / "snapshots",
                    preferred=History(site.path / "history.sqlite").good_releases())
