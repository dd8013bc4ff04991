"""``imageupdate status``: one answer, from one place, to "what runs where and what is going on".

Every line comes from what is, read once: the release each node runs and whether it runs, is paused
(frozen for a consistent copy) or is being rebuilt; the open operation (running, paused or interrupted)
with its stage and each node's step in it; and the newest operations. The state of an operation is
decided by ``operation_state`` alone; the step shown for a node by ``node_step`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imageupdate.base import procs
from imageupdate.history.db import RolloutRow, StepRow
from imageupdate.rollout import policy
from imageupdate.rollout.fleet import Fleet, NodeState
from imageupdate.rollout.lock import RolloutLock

NEXT = {
    "paused": "continue with 'imageupdate resume', stop with 'imageupdate cancel'",
    "interrupted": "its process is gone: 'imageupdate resume' finishes it, 'imageupdate cancel' ends it "
                   "(rolling back what it touched)",
}


@dataclass
class NodeLine:
    name: str
    address: str
    release: str
    last_good: str | None
    running: bool
    state: str = "running"  # running | stopped | paused | unfinished (stopped in a rebuild to ``release``)
    target: str | None = None  # the release the open operation takes it to
    step: str | None = None  # where the open operation is with it
    # its newest gate verdict is not a pass on ``release`` (a rollback failed, was cancelled or killed after
    # the switch): the next rollout or rollback that includes it gates it there again
    unproven: bool = False


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


def operation_state(fleet: Fleet, row: RolloutRow) -> str:
    """running (its process lives and holds the site's operation lock), paused, interrupted, or how it ended."""
    if row.status == "paused":
        return "paused"
    if row.status != "running":
        return row.status
    lock = RolloutLock(fleet.path)
    alive = row.pid is not None and procs.alive(row.pid) and lock.held_by_other()
    return "running" if alive else "interrupted"


def node_step(row: RolloutRow, node: str, runs: str, steps: dict[tuple[str, str], StepRow]) -> str | None:
    """The node's place in the operation, from its recorded steps and what it runs now."""
    if node not in {n for b in row.plan.get("batches", []) for n in b}:
        return None
    target = row.plan.get("after", {}).get(node)
    gate = steps.get((node, "gate"))
    rebuild = steps.get((node, "rebuild"))
    if gate is not None and gate.status != "running":
        return f"gate {gate.status}"
    if gate is not None:
        return "checking"
    if rebuild is not None and rebuild.status == "failed":
        return "rebuild failed"
    if rebuild is not None and rebuild.status == "running":
        return "rebuilding"
    if runs == target and row.plan.get("before", {}).get(node) != target:
        return "rebuilt, not yet gated"
    return "pending"


def _describe(fleet: Fleet, row: RolloutRow, states: dict[str, NodeState]) -> dict[str, Any]:
    d = row.to_dict()
    steps = fleet.history.steps(row.id)
    d["steps"] = [s.to_dict() for s in steps]
    d["state"] = operation_state(fleet, row)
    if d["state"] in ("running", "paused", "interrupted"):
        by = {(s.node, s.step): s for s in steps}
        d["nodes"] = {n: node_step(row, n, s.release, by) for n, s in states.items()
                      if node_step(row, n, s.release, by) is not None}
        d["next"] = NEXT.get(d["state"])
        if d["state"] == "running":
            owner = RolloutLock(fleet.path).owner()
            d["owner"] = owner.__dict__ if owner else None
    return d


def fleet_status(fleet: Fleet, rollout: int | None = None) -> FleetStatus:
    states = fleet.states()
    active_row = fleet.history.active()
    active = _describe(fleet, active_row, states) if active_row else None
    nodes = []
    doubtful = policy.unproven(fleet.history, states)
    for n, s in states.items():
        state = "paused" if s.paused else "running" if s.running else "unfinished" if s.unfinished else "stopped"
        line = NodeLine(n, s.address, s.release, fleet.history.last_good(n), s.running, state,
                        unproven=n in doubtful)
        if active is not None and n in active.get("nodes", {}):
            line.target = active_row.plan["after"].get(n) if active_row else None
            line.step = active["nodes"][n]
        nodes.append(line)
    heat, client = fleet.heat_status()
    stack = None
    if client is not None:
        found = client.stack(fleet.stack_name)
        if found is not None:
            stack = {"id": found.id, "name": found.name, "state": found.state, "reason": found.reason}
    rows = fleet.history.rollouts(limit=10)
    chosen = fleet.history.rollout(rollout) if rollout is not None else (rows[0] if rows else None)
    if chosen is not None and active_row is not None and chosen.id == active_row.id:
        last = active
    else:
        last = _describe(fleet, chosen, states) if chosen else None
    return FleetStatus(
        str(fleet.path), nodes, heat, stack, active, last,
        [{"id": r.id, "kind": r.kind, "target": r.target, "status": operation_state(fleet, r), "started": r.started,
          "finished": r.finished, "reason": r.reason} for r in rows],
    )
