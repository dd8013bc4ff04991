"""Which nodes an operation changes, and where a rollback takes them: one computation for every operation.

- A rollout moves the selected nodes that do not run the target release.
- A rollback (``imageupdate rollback``) moves the nodes the newest rollout touched back to the release each
  ran before it, or with ``--to`` every selected node to that release; stopped nodes are brought back too.
- After a failed or cancelled rollout the nodes it touched go back the same way, automatically.
- A cancelled rollback stops where it is: nodes it already brought back stay back, the rest stay on the
  failed release, and ``imageupdate rollback`` finishes the way back (the rollout it undid is still the one
  to undo).

"The release a node ran before" is the rollout's recorded ``before`` when that release ever passed a gate
on the node (or the fleet was adopted on it); otherwise the newest release that passed there earlier.
"""

from __future__ import annotations

from dataclasses import dataclass

from imageupdate.history.db import History, RolloutRow
from imageupdate.rollout.fleet import NodeState


@dataclass(frozen=True)
class Change:
    nodes: list[str]
    before: dict[str, str]  # what each node runs now
    after: dict[str, str]  # what each node runs once the operation succeeded
    changing: list[str]  # the nodes the operation rebuilds, in fleet order

    @property
    def plan(self) -> dict[str, object]:
        return {"before": self.before, "after": self.after}


def change(states: dict[str, NodeState], nodes: list[str], targets: dict[str, str],
           bring_back: set[str] | frozenset[str] = frozenset(),
           unproven: set[str] | frozenset[str] = frozenset()) -> Change:
    """``targets``: the release wanted per node (others stay); ``bring_back``: nodes rebuilt and gated even on
    the release they hold when they do not run (a stopped node, one whose rebuild failed before its switch)
    or are ``unproven`` there (a rollback that failed or was killed left them on it without a passed gate)."""
    before = {n: states[n].release for n in nodes}
    after = before | {n: r for n, r in targets.items() if n in before}
    changing = [n for n in nodes if after[n] != before[n]
                or (n in bring_back and (not states[n].running or n in unproven))]
    return Change(nodes, before, after, changing)


def unproven(history: History, states: dict[str, NodeState]) -> set[str]:
    """Nodes whose newest gate verdict is not a pass on the release they hold: it failed there, or the node
    reached that release without a gate (its rebuild was killed after the switch, say)."""
    verdicts = history.last_verdicts()
    return {n for n, s in states.items() if verdicts.get(n) not in (None, (s.release, True))}


def touched(history: History, row: RolloutRow) -> set[str]:
    """Nodes the operation started to rebuild (the failed one included)."""
    return {s.node for s in history.steps(row.id) if s.step == "rebuild" and s.status != "pending"}


def way_back(history: History, row: RolloutRow, node: str) -> str:
    """The release ``node`` goes back to when ``row`` (a rollout) is undone."""
    before = row.plan.get("before", {}).get(node)
    if before is not None and history.was_good(node, before, before_rollout=row.id):
        return str(before)
    return history.last_good(node, before=row.id) or str(before)


def rollback_targets(history: History, row: RolloutRow, selected: set[str]) -> dict[str, str]:
    return {n: way_back(history, row, n) for n in touched(history, row) & selected}
