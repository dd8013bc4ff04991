"""The local site (its nodes and its ephemeral Heat) and a fleet's making on a cloud."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imageupdate.api.fleets import PathLike, cloud_dir, open_site, open_store
from imageupdate.base.errors import InputError
from imageupdate.cloud.fleet import CloudFleet
from imageupdate.cloud.setup import DEFAULT_PREFIX, DEFAULT_SSH_USER, fleet_config
from imageupdate.heat.service import HeatProcess
from imageupdate.site.fleet import LocalFleet
from imageupdate.site.guard import open_operation
from imageupdate.site.node import NodeStatus
from imageupdate.site.site import SiteStatus


@dataclass(frozen=True)
class SiteView:
    status: SiteStatus

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.status)


@dataclass(frozen=True)
class NodeView:
    status: NodeStatus

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.status)


def site_up(nodes: int | None = None, release: str | None = None, kind: str | None = None, *,
            site: PathLike | None = None, store: PathLike | None = None) -> SiteView:
    """Create the site (``nodes`` nodes on ``release``; ``kind`` namespace or vm), or bring it back up."""
    return SiteView(open_site(site, store).up(nodes, release, kind))


def site_status(*, site: PathLike | None = None, store: PathLike | None = None) -> SiteView:
    return SiteView(open_site(site, store).status())


def site_down(force: bool = False, *, site: PathLike | None = None, store: PathLike | None = None) -> SiteView:
    """Stop every node and remove the network; state stays. ``force``: even while an operation is open."""
    return SiteView(open_site(site, store).down(force=force))


@dataclass(frozen=True)
class SiteDestroyed:
    site: Path

    def to_dict(self) -> dict[str, Any]:
        return {"site": str(self.site), "destroyed": True}


def site_destroy(force: bool = False, *, site: PathLike | None = None,
                 store: PathLike | None = None) -> SiteDestroyed:
    s = open_site(site, store)
    s.destroy(force=force)
    return SiteDestroyed(s.path)


@dataclass(frozen=True)
class Recovered:
    said: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"recovered": self.said}


def site_recover(*, site: PathLike | None = None, store: PathLike | None = None) -> Recovered:
    """After a crash: finish or undo interrupted rebuilds."""
    return Recovered(open_site(site, store).recover())


def site_rebuild(node: str, release: str, *, wait: float = 0.0, force: bool = False, by_heat: bool = False,
                 site: PathLike | None = None, store: PathLike | None = None) -> NodeView:
    """Rebuild one node from a release; ``wait``: seconds to wait for another operation on it."""
    return NodeView(open_site(site, store).rebuild(node, release, wait=wait, force=force, by_heat=by_heat))


def operation_open(*, site: PathLike | None = None, store: PathLike | None = None) -> str | None:
    """The operation open on the site, said in words (None: none), for a warning before a forced command."""
    return open_operation(open_site(site, store).path)


@dataclass(frozen=True)
class HeatInfo:
    running: bool
    log: Path
    pid: int | None = None
    endpoint: str | None = None
    stack: str | None = None

    def to_dict(self) -> dict[str, Any]:
        info: dict[str, Any] = {"running": self.running, "log": str(self.log)}
        if self.running:
            info |= {"pid": self.pid, "endpoint": self.endpoint, "stack": self.stack}
        return info


def _heat_info(fleet: LocalFleet, proc: HeatProcess | None) -> HeatInfo:
    if proc is None:
        return HeatInfo(False, fleet.heat.paths.log)
    return HeatInfo(True, fleet.heat.paths.log, proc.pid, proc.endpoint, fleet.stack_name)


def heat_start(*, site: PathLike | None = None, store: PathLike | None = None) -> HeatInfo:
    """Start the site's Heat (or find it running)."""
    fleet = LocalFleet(open_site(site, store))
    fleet.site.config()  # SiteNotFound before a Heat starts for nothing
    return _heat_info(fleet, fleet.heat.ensure())


def heat_status(*, site: PathLike | None = None, store: PathLike | None = None) -> HeatInfo:
    fleet = LocalFleet(open_site(site, store))
    return _heat_info(fleet, fleet.heat.running())


@dataclass(frozen=True)
class HeatStopped:
    how: str

    def to_dict(self) -> dict[str, Any]:
        return {"stopped": self.how}


def heat_stop(force: bool = False, *, site: PathLike | None = None, store: PathLike | None = None) -> HeatStopped:
    """Stop the site's Heat; its stacks stay. ``force``: even while an operation is open."""
    return HeatStopped(open_site(site, store).stop_heat(force=force))


@dataclass(frozen=True)
class HeatEnv:
    exports: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.exports)


def heat_env(*, site: PathLike | None = None, store: PathLike | None = None) -> HeatEnv:
    """The environment the openstack client needs to talk to the site's Heat (its secret among it)."""
    fleet = LocalFleet(open_site(site, store))
    proc = fleet.heat.running()
    if proc is None:
        raise InputError(f"the Heat of site {fleet.path} is not running; start it with 'imageupdate heat start'")
    return HeatEnv({"OS_AUTH_TYPE": "admin_token", "OS_TOKEN": fleet.heat.secret(), "OS_ENDPOINT": proc.endpoint,
                    "IMAGEUPDATE_STACK": fleet.stack_name})


@dataclass(frozen=True)
class CloudFleetMade:
    cloud: str
    stack: str
    nodes: list[str]
    release: str
    directory: Path
    said: str

    def to_dict(self) -> dict[str, Any]:
        return {"cloud": self.cloud, "stack": self.stack, "nodes": self.nodes, "release": self.release,
                "directory": str(self.directory)}


def cloud_up(cloud: str, nodes: int, release: str, flavor: str, ssh_key: PathLike, *, network: str | None = None,
             key_name: str | None = None, ssh_user: str = DEFAULT_SSH_USER, stack: str | None = None,
             prefix: str = DEFAULT_PREFIX, site: PathLike | None = None,
             store: PathLike | None = None) -> CloudFleetMade:
    """Create a fleet's Heat stack on ``cloud``: ``nodes`` servers on ``release`` (uploaded to Glance)."""
    cfg = fleet_config(cloud, nodes, flavor, Path(ssh_key), network=network, key_name=key_name,
                       ssh_user=ssh_user, stack=stack, prefix=prefix)
    fleet = CloudFleet(cloud_dir(cloud, site), open_store(store), cloud)
    said = fleet.up(cfg, release)
    return CloudFleetMade(cloud, cfg.stack, cfg.nodes, release, fleet.path, said)


@dataclass(frozen=True)
class HostKeyForgotten:
    node: str
    forgotten: bool  # False: no key was pinned

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "forgotten": self.forgotten}


def forget_host_key(node: str, *, cloud: str, site: PathLike | None = None,
                    store: PathLike | None = None) -> HostKeyForgotten:
    """Drop a cloud server's pinned SSH host key (a server replaced on purpose)."""
    fleet = CloudFleet(cloud_dir(cloud, site), open_store(store), cloud)
    return HostKeyForgotten(node, fleet.forget_host_key(node))

