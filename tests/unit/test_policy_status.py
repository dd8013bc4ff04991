"""Where a rollback takes a node, and what status says of an open operation: one rule each."""

from __future__ import annotations

import os
from pathlib import Path

from imageupdate.history.db import History, StepRow
from imageupdate.rollout import policy
from imageupdate.rollout.fleet import NodeState
from imageupdate.rollout.status import node_step, operation_state


def _plan(before: dict[str, str], after: dict[str, str]) -> dict[str, object]:
    return {"batches": [[n] for n in after if after[n] != before[n]], "before": before, "after": after}


def test_a_rollback_takes_a_node_to_the_release_it_ran_before_not_to_a_newer_one_that_once_passed(
        tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    adopt = h.start("adopt", None, {}, _plan({"node0": "R1"}, {"node0": "R1"}))
    h.reached("node0", "R1", adopt.id, good=True)
    first = h.start("rollout", "R2", {}, _plan({"node0": "R1"}, {"node0": "R2"}))
    h.reached("node0", "R2", first.id, good=True)  # node0 passed R2 ...
    # ... the rollout failed elsewhere; its rollback was cancelled at node0's gate (nothing recorded as
    # reached), a later 'rollback --limit' brought node0 back to R1 without a gate of its own
    later = h.start("rollout", "R3", {}, _plan({"node0": "R1"}, {"node0": "R3"}))
    h.step(later.id, "node0", "rebuild", "running")
    assert h.last_good("node0", before=later.id) == "R2"  # the old rule took node0 to R2
    assert policy.way_back(h, later, "node0") == "R1"
    assert policy.rollback_targets(h, later, {"node0"}) == {"node0": "R1"}


def test_a_release_that_never_passed_there_falls_back_to_the_last_good(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    adopt = h.start("adopt", None, {}, _plan({"node0": "R1"}, {"node0": "R1"}))
    h.reached("node0", "R1", adopt.id, good=True)
    broken = h.start("rollout", "R3", {}, _plan({"node0": "R2"}, {"node0": "R3"}))  # R2 left by --no-rollback
    assert policy.way_back(h, broken, "node0") == "R1"


def test_one_change_computation() -> None:
    states = {n: NodeState(n, "a", r, running) for n, r, running in
              (("node0", "R1", True), ("node1", "R2", True), ("node2", "R2", False))}
    nodes = list(states)
    ch = policy.change(states, nodes, {n: "R2" for n in nodes})
    assert ch.changing == ["node0"] and ch.after == {"node0": "R2", "node1": "R2", "node2": "R2"}
    back = policy.change(states, nodes, {"node0": "R1"}, bring_back={"node2"})
    assert back.changing == ["node2"]  # node0 already there; node2 stopped: brought back on its release
    again = policy.change(states, nodes, {"node0": "R1"}, bring_back={"node1", "node2"}, unproven={"node1"})
    assert again.changing == ["node1", "node2"]  # node1 runs R2 but failed its gate there: gated again


def test_a_node_without_a_passed_gate_on_what_it_runs_is_unproven(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    states = {n: NodeState(n, "a", "R1", True) for n in ("node0", "node1", "node2", "node3", "node4")}
    h.reached("node0", "R1", 1, good=True)
    h.reached("node0", "R1", 2, good=False)  # a rollback to R1 failed its gate
    h.reached("node1", "R1", 2, good=False)
    h.reached("node1", "R1", 3, good=True)  # and the next one passed
    h.reached("node2", "R2", 2, good=True)  # passed on R2; its rebuild back to R1 was killed after the switch
    h.reached("node3", "R2", 2, good=False)  # failed on R2, runs R1 without a gate there since
    assert policy.unproven(h, states) == {"node0", "node2", "node3"}  # node4: no verdict at all (not adopted)


def _row(h: History, status: str = "running", pid: int | None = None):  # type: ignore[no-untyped-def]
    return h.start("rollout", "R2", {}, _plan({"node0": "R1", "node1": "R1"}, {"node0": "R2", "node1": "R2"}),
                   pid=pid, status=status)


class _Fleet:
    def __init__(self, path: Path) -> None:
        self.path = path


def test_an_operation_whose_process_is_gone_is_interrupted_and_a_paused_one_paused(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    dead = _row(h, pid=2 ** 22 + 7)
    assert operation_state(_Fleet(tmp_path), dead) == "interrupted"  # type: ignore[arg-type]
    mine = _row(h, pid=os.getpid())  # alive but not holding the site's operation lock: interrupted too
    assert operation_state(_Fleet(tmp_path), mine) == "interrupted"  # type: ignore[arg-type]
    paused = _row(h, status="paused")
    assert operation_state(_Fleet(tmp_path), paused) == "paused"  # type: ignore[arg-type]


def test_a_node_rebuilt_before_the_watch_recorded_it_is_not_shown_pending(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    row = _row(h)
    steps: dict[tuple[str, str], StepRow] = {}
    assert node_step(row, "node0", "R2", steps) == "rebuilt, not yet gated"
    assert node_step(row, "node1", "R1", steps) == "pending"
    steps[("node0", "gate")] = StepRow(row.id, "node0", 0, "gate", "R1", "R2", "running", 1.0, None, None, None)
    assert node_step(row, "node0", "R2", steps) == "checking"
    steps[("node0", "gate")] = StepRow(row.id, "node0", 0, "gate", "R1", "R2", "cancelled", 1.0, 2.0, None, None)
    assert node_step(row, "node0", "R2", steps) == "gate cancelled"
    assert node_step(row, "node9", "R2", steps) is None
