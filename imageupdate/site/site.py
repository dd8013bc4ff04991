"""The local site: a directory that holds a small fleet on one machine, and what can be done to it.

``LocalSite`` is the one object callers hold. It is its directory (``sitedir``: layout, configuration,
locks, the releases unpacked in it) with the site's operations: bring-up and teardown (``lifecycle``: up,
down, destroy, heat stop), one node's rebuild (``rebuild``), and recovery after a crash (``recover``,
below). ``LocalFleet`` (``site.fleet``) is the same site as the orchestrator sees it.

While an operation (a rollout or rollback) is open, ``site down``, ``site destroy``, ``heat stop`` and
``site rebuild`` refuse unless forced (:mod:`imageupdate.site.guard`).
"""

from __future__ import annotations

import os
from pathlib import Path

from imageupdate.images.store import ImageStore
from imageupdate.site import lifecycle
from imageupdate.site import rebuild as node_rebuild
from imageupdate.site.node import NodeStatus
from imageupdate.site.rebuild import MAX_LOCK_WAIT
from imageupdate.site.sitedir import SiteDir, SiteStatus

# MAX_LOCK_WAIT (defined in site.rebuild) is imported from here by the front door's 'site rebuild --wait-lock'
__all__ = ["DEFAULT_SITE", "MAX_LOCK_WAIT", "LocalSite", "SiteStatus", "default_site"]

DEFAULT_SITE = Path("/var/lib/imageupdate/site")


def default_site() -> Path:
    return Path(os.environ.get("IMAGEUPDATE_SITE") or DEFAULT_SITE)


class LocalSite(SiteDir):
    """Construction touches nothing; every operation takes the site lock."""

    def __init__(self, path: Path | None = None, store: ImageStore | None = None) -> None:
        super().__init__(Path(path) if path is not None else default_site(), store or ImageStore())

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

    # bring-up and teardown (lifecycle) -----------------------------------------------------------

    def up(self, nodes: int | None = None, release: str | None = None, kind: str | None = None) -> SiteStatus:
        """A new site of ``nodes`` ``kind`` nodes on ``release``, or this one brought back up."""
        return lifecycle.up(self, nodes, release, kind)

    def down(self, force: bool = False) -> SiteStatus:
        """Stop every node and the site's Heat and remove the network; state stays."""
        return lifecycle.down(self, force)

    def destroy(self, force: bool = False) -> None:
        """``site down``, then delete the directory (nodes' state, snapshots, the history, everything)."""
        lifecycle.destroy(self, force)

    def stop_heat(self, force: bool = False) -> str:
        """Stop the site's Heat (its stacks stay in SITE/heat/heat.sqlite); say how it ended."""
        return lifecycle.stop_heat(self, force)

    # one node (rebuild) --------------------------------------------------------------------------

    def rebuild(self, node_name: str, release: str, wait: float = 0.0, force: bool = False,
                by_heat: bool = False) -> NodeStatus:
        """Rebuild one node onto ``release``; ``wait`` bounds how long to wait for its locks."""
        return node_rebuild.rebuild(self, node_name, release, wait, force, by_heat)

    # recovery ------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """After a crash: each node back on one complete release, running if it should; what was done."""
        with self.locked():
            return [f"{n.name}: {said}" for n in self.nodes() if n.exists() and (said := n.recover())]
