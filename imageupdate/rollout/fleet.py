"""What the orchestrator needs from a site: its nodes, what they run, how Heat reaches them.

Implemented beside each kind of site: ``imageupdate.site.fleet.LocalFleet`` (the local site with its
ephemeral Heat) and ``imageupdate.cloud.fleet.CloudFleet`` (nodes from the stack, Heat through Keystone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from imageupdate.base.errors import InputError
from imageupdate.heat.client import HeatClient
from imageupdate.history.db import History
from imageupdate.images.store import ImageStore
from imageupdate.upgrade import state
from imageupdate.upgrade.plan import UpgradePlan
from imageupdate.upgrade.rehearse import Rehearsal
from imageupdate.verify.builtin import Expectation
from imageupdate.verify.checks import NodeTarget


class SiteNotUp(InputError):
    """A rollout on a site whose nodes do not run."""


@dataclass(frozen=True)
class NodeState:
    name: str
    address: str
    release: str  # what the node runs now
    running: bool
    paused: bool = False  # frozen (SIGSTOP) for a consistent copy of its state
    unfinished: bool = False  # a rebuild to ``release`` began and did not finish (``site recover`` ends it)


class HeatHandle(Protocol):
    """The Heat an operation talks to: where, and which instance of it (a different one means it restarted)."""

    @property
    def endpoint(self) -> str: ...

    @property
    def instance(self) -> str: ...


class Fleet(Protocol):
    """What the orchestrator, status, checks and planning need of a fleet: ``LocalFleet`` (the local site) or
    ``imageupdate.cloud.fleet.CloudFleet`` (Nova servers in a Heat stack on a cloud)."""

    @property
    def can_rehearse(self) -> bool: ...

    # True when each node runs, at boot, only the migrations its new image ships (a cloud's machines); False
    # when imageupdate runs every release's migrations on the path from each release's own image (local site)
    migrates_in_image: bool
    history: History

    @property
    def path(self) -> Path: ...

    @property
    def store(self) -> ImageStore: ...

    @property
    def stack_name(self) -> str: ...

    def node_names(self) -> list[str]: ...

    def states(self) -> dict[str, NodeState]: ...

    def require_up(self) -> None: ...

    def require_runnable(self, release: str) -> None: ...

    def require_exists(self) -> None: ...

    def server_options(self) -> dict[str, Any]: ...

    def environment(self) -> tuple[dict[str, str], dict[str, Any]]: ...

    def target(self, node: str) -> NodeTarget: ...

    def wait_booted(self, node: str, timeout: float) -> str | None:
        """Wait until the node's init has started its services (or said why it could not); None when it has,
        else why not (a server whose machine is still booting is not yet something to gate)."""
        ...

    def expectation(self, release: str) -> Expectation: ...

    def connect(self) -> tuple[HeatClient, HeatHandle]: ...

    def publish(self, release: str) -> str | None: ...

    def heat_status(self) -> tuple[dict[str, Any], HeatClient | None]: ...

    def state_record(self, node: str) -> state.StateRecord: ...

    def state_file(self, node: str, path: str) -> str | None: ...

    def rehearse(self, node: str, upgrade: UpgradePlan) -> Rehearsal: ...
