"""What the watch sees of the stack (rollout/view.py): one listing, then only the events since the newest one
seen, whatever the fleet's size; the listing again when the marker was purged, every ``resync`` seconds,
and never longer than Heat's silence allows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imageupdate.heat.client import Event, HeatError, ResourceState, Stack
from imageupdate.rollout import engine
from imageupdate.rollout.engine import Orchestrator, RolloutOptions
from imageupdate.rollout.model import HeatLost
from imageupdate.rollout.path import FleetPlan
from imageupdate.rollout.view import StackView
from tests.unit.fakeheat import FakeFleet, FakeHeat, verdicts

STACK = Stack("s1", "fleet", "UPDATE", "IN_PROGRESS", "", {})


class Scripted:
    """A HeatClient whose resources and events the test writes; it counts what it is asked."""

    def __init__(self) -> None:
        self.listed: dict[str, ResourceState] = {}
        self.log: list[Event] = []
        self.calls: list[str] = []
        self.purged = False
        self.replay = False
        self.down = 0

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.down:
            self.down -= 1
            raise HeatError(f"{what} failed: Heat does not answer", step="heat")

    def stack(self, name: str) -> Stack:
        self._call("stack")
        return STACK

    def resources(self, stack_id: str) -> dict[str, ResourceState]:
        self._call("resources")
        return dict(self.listed)

    def last_event(self, stack_id: str) -> Event | None:
        self._call("last_event")
        return self.log[-1] if self.log else None

    def events(self, stack_id: str, marker: str | None = None) -> list[Event]:
        self._call("events")
        ids = [e.id for e in self.log]
        if self.replay and marker not in ids:
            return list(self.log)  # what Heat does with a marker it no longer holds
        if self.purged or (marker is not None and marker not in ids):
            raise HeatError(f"listing the events of stack {stack_id} failed: ERROR: Not found", step="heat")
        return self.log[ids.index(marker) + 1:] if marker is not None else list(self.log)

    def happen(self, resource: str, state: str, physical: str = "", reason: str = "") -> None:
        self.log.append(Event(f"e{len(self.log)}", resource, state, reason, f"t{len(self.log):04d}", "T", physical))


def state(view: StackView, name: str) -> str | None:
    res = view.look()[1].get(name)
    return res.state if res is not None else None


def test_one_listing_then_only_the_events_since_the_newest_seen() -> None:
    heat = Scripted()
    heat.listed = {"server_node0": ResourceState("server_node0", "T", "CREATE", "COMPLETE", "", "p0")}
    heat.happen("server_node0", "CREATE_COMPLETE", "p0")
    view = StackView(heat, "s1", sleep=lambda s: None, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert state(view, "server_node0") == "CREATE_COMPLETE"
    heat.happen("server_node0", "UPDATE_IN_PROGRESS", "p0")
    heat.happen("gate_node0_t1", "CREATE_IN_PROGRESS")
    assert state(view, "server_node0") == "UPDATE_IN_PROGRESS"
    heat.happen("server_node0", "UPDATE_COMPLETE", "p0")
    heat.happen("gate_node0_t1", "CREATE_COMPLETE", "g0")
    heat.happen("fleet", "UPDATE_COMPLETE", "s1")  # the stack's own event is not a resource
    for _ in range(20):
        resources = view.look()[1]
    assert resources["server_node0"].state == "UPDATE_COMPLETE" and resources["gate_node0_t1"].physical_id == "g0"
    assert "fleet" not in resources
    assert heat.calls.count("resources") == 1 and view.listings == 1 and view.events_read == 5


def test_deletions_are_not_applied_a_replaced_servers_cleanup_least_of_all() -> None:
    """Heat replaces a FAILED server by creating the new row, then deleting the old one: both carry the node's
    name as physical id, so the old row's deletion looks like the live server's."""
    heat = Scripted()
    heat.listed = {"server_node0": ResourceState("server_node0", "T", "UPDATE", "FAILED", "boom", "node0"),
                   "gate_node0_t1": ResourceState("gate_node0_t1", "T", "CREATE", "FAILED", "Engine went down", "")}
    view = StackView(heat, "s1", sleep=lambda s: None, clock=lambda: 0.0)  # type: ignore[arg-type]
    view.look()
    heat.happen("server_node0", "CREATE_IN_PROGRESS", "node0")  # the replacement
    heat.happen("server_node0", "CREATE_COMPLETE", "node0")
    heat.happen("server_node0", "DELETE_IN_PROGRESS", "node0")  # the old row, cleaned up after
    heat.happen("server_node0", "DELETE_COMPLETE", "node0")
    heat.happen("gate_node0_t1", "CREATE_IN_PROGRESS")
    heat.happen("gate_node0_t1", "DELETE_COMPLETE")
    resources = view.look()[1]
    assert resources["server_node0"].state == "CREATE_COMPLETE"
    assert resources["gate_node0_t1"].state == "CREATE_IN_PROGRESS"


def test_a_stack_that_stops_is_listed_once_more() -> None:
    """An event committed behind the marker (several engines on MySQL) would never be read: a settled stack
    is listed again, once."""
    heat = Scripted()
    stacks = iter([STACK, STACK, Stack("s1", "fleet", "UPDATE", "COMPLETE", "", {})] * 1 + [
        Stack("s1", "fleet", "UPDATE", "COMPLETE", "", {})] * 5)
    heat.stack = lambda name: next(stacks)  # type: ignore[method-assign]
    view = StackView(heat, "s1", sleep=lambda s: None, clock=lambda: 0.0)  # type: ignore[arg-type]
    view.look()
    view.look()
    heat.listed = {"gate_node0_t1": ResourceState("gate_node0_t1", "T", "CREATE", "COMPLETE", "", "g0")}
    assert state(view, "gate_node0_t1") == "CREATE_COMPLETE" and view.listings == 2
    for _ in range(3):
        view.look()
    assert view.listings == 2


def test_a_purged_marker_and_the_resync_period_list_again() -> None:
    heat = Scripted()
    now = [0.0]
    view = StackView(heat, "s1", sleep=lambda s: None, clock=lambda: now[0], resync=30.0)  # type: ignore[arg-type]
    view.look()
    heat.happen("server_node0", "UPDATE_IN_PROGRESS", "p0")
    view.look()
    assert view.listings == 1
    heat.purged = True
    heat.listed = {"server_node0": ResourceState("server_node0", "T", "UPDATE", "COMPLETE", "", "p0")}
    assert state(view, "server_node0") == "UPDATE_COMPLETE" and view.listings == 2
    heat.purged = False
    # real Heat answers a marker it no longer holds with every event from the oldest: older than the marker
    heat.happen("server_node0", "UPDATE_COMPLETE", "p0")
    view.look()
    heat.log.insert(0, Event("e-old", "server_node0", "CREATE_IN_PROGRESS", "", "s", "T", "p0"))
    view.marker = "gone"
    heat.listed["server_node0"] = ResourceState("server_node0", "T", "UPDATE", "COMPLETE", "", "p0")
    heat.replay = True
    assert state(view, "server_node0") == "UPDATE_COMPLETE" and view.listings == 3
    heat.replay = False
    now[0] = 31.0
    heat.listed["server_node1"] = ResourceState("server_node1", "T", "UPDATE", "COMPLETE", "", "p1")
    assert state(view, "server_node1") == "UPDATE_COMPLETE" and view.listings == 4


def test_heat_silent_for_longer_than_allowed_is_heat_lost() -> None:
    heat = Scripted()
    view = StackView(heat, "s1", sleep=lambda s: None, clock=lambda: 0.0, lost_after=3)  # type: ignore[arg-type]
    heat.down = 2
    view.look()  # two failures are waited out
    heat.down = 100
    with pytest.raises(HeatLost, match="Heat stopped answering"):
        view.look()


@pytest.mark.parametrize("nodes", [3, 60])
def test_the_watch_lists_the_stack_a_fixed_number_of_times_whatever_the_fleets_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodes: int) -> None:
    """Before: every look listed every resource, and a 200-node listing took Heat 15 to 30 s."""
    monkeypatch.setattr(engine, "plan_fleet", lambda fleet, target, nodes=None: FleetPlan(target, {}, []))
    monkeypatch.setattr(engine, "check_fleet_config", lambda fleet, fp, given=None: [])
    h = FakeHeat({f"node{i}": "R1" for i in range(nodes)})
    fleet = FakeFleet(tmp_path, h, {"R1", "R2"})
    orch = Orchestrator(fleet, sleep=lambda s: None, poll=0.01, verify=verdicts(None))  # type: ignore[arg-type]
    out = orch.rollout("R2", RolloutOptions(probe=False, batch_size=3))
    assert out.status == "succeeded", out.reason
    assert set(h.releases.values()) == {"R2"}
    listings = h.calls.count("resources")
    assert h.looks > 2 * nodes and listings <= 4, (h.looks, listings)


def test_the_client_reads_the_stack_without_resolving_outputs_and_the_newest_event_alone() -> None:
    """Resolving outputs makes Heat load every resource: 57 % of Heat's CPU at 50 nodes, at five looks a
    second. The marker is one event, the newest."""
    from types import SimpleNamespace

    from imageupdate.heat.client import HeatClient

    asked: list[tuple[str, dict[str, Any]]] = []

    def get(ref: str, **kw: Any) -> Any:
        asked.append(("stacks.get", kw))
        return SimpleNamespace(id="s1", stack_name="fleet", action="UPDATE", status="IN_PROGRESS",
                               stack_status_reason="", outputs=None, description="")

    def events(ref: str, **kw: Any) -> list[Any]:
        asked.append(("events.list", kw))
        return [SimpleNamespace(id="e9", resource_name="gate_node0_t1", resource_status="CREATE_COMPLETE",
                                resource_status_reason="", event_time="t", resource_type="OS::Heat::WaitCondition",
                                physical_resource_id="g0")]

    client = HeatClient("http://127.0.0.1:1/v1/admin")
    client._hc = SimpleNamespace(stacks=SimpleNamespace(get=get), events=SimpleNamespace(list=events))
    assert client.stack("s1") is not None
    assert client.last_event("s1") == Event("e9", "gate_node0_t1", "CREATE_COMPLETE", "", "t",
                                            "OS::Heat::WaitCondition", "g0")
    client.events("s1", "e8")
    assert asked == [("stacks.get", {"resolve_outputs": False}), ("events.list", {"sort_dir": "desc", "limit": 1}),
                     ("events.list", {"sort_dir": "asc", "marker": "e8"})]
