"""``imageupdate status``: which node runs which release, and what is going on, from the site and history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imageupdate.history.db import RolloutRow
from imageupdate.rollout.fleet import Fleet
from imageupdate.rollout.lock import RolloutLock
from imageupdate.site import procs


@dataclass
class NodeLine:
    name: str
    address: str
    release: str
    last_good: str | None
    running: bool


@dataclass
class FleetStatus:
    site: str
    nodes: list[NodeLine]
    heat: dict[str, Any]
    stack: dict[str, Any] | None
    active: dict[str, Any] | None  # the running/paused/interrupted operation, with its state
    last: dict[str, Any] | None  # the newest operation, with its steps
    recent: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "nodes": [n.__dict__ for n in self.nodes], "heat": self.heat,
                "stack": self.stack, "active": self.active, "last": self.last, "recent": self.recent}


def _describe(fleet: Fleet, row: RolloutRow) -> dict[str, Any]:
    d = row.to_dict()
    d["steps"] = [s.to_dict() for s in fleet.history.steps(row.id)]
    if row.status == "running":
        owner = RolloutLock(fleet.path).owner()
        alive = row.pid is not None and procs.alive(row.pid) and RolloutLock(fleet.path).held_by_other()
        d["state"] = "running" if alive else "interrupted"
        d["owner"] = owner.__dict__ if owner else None
    else:
        d["state"] = row.status
    return d


def fleet_status(fleet: Fleet, rollout: int | None = None) -> FleetStatus:
    states = fleet.states()
    nodes = [NodeLine(n, s.address, s.release, fleet.history.last_good(n), s.running) for n, s in states.items()]
    heat, client = fleet.heat_status()
    stack = None
    if client is not None:
        s = client.stack(fleet.stack_name)
        if s is not None:
            stack = {"id": s.id, "name": s.name, "state": s.state, "reason": s.reason}
    active_row = fleet.history.active()
    rows = fleet.history.rollouts(limit=10)
    chosen = fleet.history.rollout(rollout) if rollout is not None else (rows[0] if rows else None)
    return FleetStatus(
        str(fleet.path), nodes, heat, stack,
        _describe(fleet, active_row) if active_row else None,
        _describe(fleet, chosen) if chosen else None,
        [{"id": r.id, "kind": r.kind, "target": r.target, "status": r.status, "started": r.started,
          "finished": r.finished, "reason": r.reason} for r in rows],
    )
