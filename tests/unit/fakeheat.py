"""A scripted Heat for the orchestrator's unit tests: it plays an operation's chain the way the real engine
does (servers rebuilt batch after batch, a wait condition per node that waits for its signal), one step per
look at the stack, with faults the test schedules: Heat not answering, Heat restarting (a new instance that
fails the update in progress), gates timing out, an update refused. No root, no processes, no waiting."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from imageupdate.heat import chain
from imageupdate.heat.client import Event, HeatError, ResourceState, Stack
from imageupdate.history.db import History
from imageupdate.rollout.fleet import NodeState
from imageupdate.verify.checks import CheckResult, Verdict


@dataclass
class FakeHeat:
    releases: dict[str, str]  # what each node runs (the rebuilds change it)
    instance: str = "heat@1"
    endpoint: str = "http://127.0.0.1:1"
    down: int = 0  # the next N calls fail as if Heat did not answer
    refuse_updates: str | None = None  # every update is refused with this message (a 400)
    timeout_gates: set[str] = field(default_factory=set)  # nodes whose gate times out instead of waiting
    rebuild_looks: int = 1  # looks a server stays UPDATE_IN_PROGRESS
    fail_rebuilds: set[str] = field(default_factory=set)
    stack_status: tuple[str, str] = ("CREATE", "COMPLETE")
    reason: str = ""
    resources: dict[str, ResourceState] = field(default_factory=dict)
    template: dict[str, Any] = field(default_factory=dict)
    queue: list[str] = field(default_factory=list)  # nodes to rebuild and gate, in order
    wanted: dict[str, str] = field(default_factory=dict)
    looks: int = 0
    calls: list[str] = field(default_factory=list)
    signals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    updates: int = 0
    _busy: int = 0
    recreate: set[str] = field(default_factory=set)  # failed gates the last update creates again
    lagging: set[str] = field(default_factory=set)  # failed servers the last update has not reached yet
    exists: bool = False
    events: list[Event] = field(default_factory=list)  # what happened to resources, oldest first

    # faults ------------------------------------------------------------------------------------------

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.down > 0:
            self.down -= 1
            raise HeatError(f"{what} failed: Heat does not answer", step="heat")

    def restart(self) -> None:
        """Heat died and came back: a new instance; the update in progress is failed by the new engine."""
        self.instance = f"heat@{int(self.instance.split('@')[1]) + 1}"
        if self.stack_status[1] == "IN_PROGRESS":
            self.stack_status = ("UPDATE", "FAILED")
            self.reason = "Engine went down during stack UPDATE"
            for name, r in list(self.resources.items()):
                if r.status == "IN_PROGRESS":
                    self._set(name, r.action, "FAILED", "Engine went down during resource UPDATE")
            self.queue.clear()

    # the HeatClient API ------------------------------------------------------------------------------

    def stack(self, name: str) -> Stack | None:
        self._call("stack")
        if not self.exists:
            return None
        self._step()
        return Stack("s1", "fleet", self.stack_status[0], self.stack_status[1], self.reason, {})

    def create(self, name: str, template: dict[str, Any], environment: dict[str, Any], files: dict[str, str],
               timeout_mins: int) -> str:
        self._call("create")
        self.exists = True
        self.template = copy.deepcopy(template)
        for rname, r in template["resources"].items():
            if r["type"] == chain.SERVER_TYPE:
                self._set(rname, "CREATE", "COMPLETE")
        self.stack_status = ("CREATE", "COMPLETE")
        return "s1"

    def update(self, stack_id: str, template: dict[str, Any], environment: dict[str, Any], files: dict[str, str],
               timeout_mins: int) -> None:
        self._call("update")
        if self.refuse_updates:
            raise HeatError(f"updating stack {stack_id} failed: ERROR: 400 Bad Request: {self.refuse_updates}",
                            step="heat")
        self.updates += 1
        self.template = copy.deepcopy(template)
        res = template["resources"]
        nodes = [n for n in self.releases if chain.server_name(n) in res]
        for name in list(self.resources):  # gates the new template drops are deleted
            if name not in res:
                del self.resources[name]
        order: list[tuple[int, str]] = []
        for n in nodes:
            server = res[chain.server_name(n)]
            self.wanted[n] = server["properties"]["release"]
            dep = server.get("depends_on") or []
            gates = [g for g in res if (p := chain.parse_gate(g, nodes)) is not None and p[0] == n
                     and (g not in self.resources or self.resources[g].status == "FAILED"
                          or self.resources[g].action == "INIT")]
            if self.resources[chain.server_name(n)].status == "FAILED":
                self.lagging.add(chain.server_name(n))  # shows FAILED to one more look, as Heat's new engine does
            if gates or self.wanted[n] != self.releases[n] or self.resources[chain.server_name(n)].status == "FAILED":
                batch = int(dep[0].rsplit("_", 1)[1]) + 1 if dep else 0
                order.append((batch, n))
            for g in gates:
                if g in self.resources and self.resources[g].status == "FAILED":
                    self.recreate.add(g)  # shows FAILED to one more look, as Heat's new engine does
                else:
                    self._set(g, "INIT", "COMPLETE")
        self.queue = [n for _, n in sorted(order, key=lambda x: x[0])]
        self.stack_status = ("UPDATE", "IN_PROGRESS")
        self.reason = ""
        self._busy = 0

    def template_of(self) -> dict[str, Any]:
        return copy.deepcopy(self.template)

    def resources_of(self) -> dict[str, ResourceState]:
        seen = dict(self.resources)
        for g in self.recreate:
            self._set(g, "INIT", "COMPLETE")
        self.recreate.clear()
        return seen

    def attributes(self, stack_id: str, resource: str) -> dict[str, Any]:
        self._call("attributes")
        return {}

    def resource_events(self, stack_id: str, resource: str) -> list[Event]:
        self._call("resource_events")
        return []

    def signal(self, stack_id: str, resource: str, data: dict[str, Any]) -> None:
        self._call("signal")
        self.signals.append((resource, data))
        gate = resource.removesuffix("_handle")
        if gate not in self.resources or self.resources[gate].state != "CREATE_IN_PROGRESS":
            return
        if data["status"] == "SUCCESS":
            self._set(gate, "CREATE", "COMPLETE")
            self.queue.pop(0)
            self._busy = 0
            if not self.queue:
                self.stack_status = ("UPDATE", "COMPLETE")
        else:
            self._fail(gate, f"WaitConditionFailure: resources.{gate}: {data.get('reason')}")

    def clear_hook(self, stack_id: str, resource: str, hook: str) -> None:
        self._call("clear_hook")

    def cancel_update(self, stack_id: str) -> None:
        self._call("cancel_update")
        if self.stack_status[1] != "IN_PROGRESS":  # as Heat 27 answers
            raise HeatError(f"cancelling the update of stack {stack_id} failed: 400 Bad Request: Cancelling update "
                            f"when stack is {'_'.join(self.stack_status)} is not supported.", step="heat")
        self.stack_status = ("UPDATE", "FAILED")
        self.reason = "Stack UPDATE cancelled"
        self.queue.clear()

    # one step of the engine per look ------------------------------------------------------------------

    def _set(self, name: str, action: str, status: str, reason: str = "") -> None:
        self.resources[name] = ResourceState(name, "T", action, status, reason, name)
        if action != "INIT":  # a resource the template lists and Heat has not created has no event
            n = len(self.events)  # one event a second, as Heat's event_time says
            self.events.append(Event(f"e{n + 1}", name, f"{action}_{status}", reason,
                                     f"2026-01-01T{n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z", "T", name))

    def _fail(self, name: str, reason: str) -> None:
        r = self.resources[name]
        self._set(name, r.action if r.action != "INIT" else "CREATE", "FAILED", reason)
        self.stack_status = ("UPDATE", "FAILED")
        self.reason = f"Resource {r.action} failed: {reason}"
        self.queue.clear()

    def _step(self) -> None:
        self.looks += 1
        if self.stack_status[1] != "IN_PROGRESS" or not self.queue:
            return
        node = self.queue[0]
        server = chain.server_name(node)
        gate = next((g for g in self.resources if g.startswith(f"gate_{node}_")
                     and self.resources[g].action == "INIT"), None)
        s = self.resources[server]
        if server in self.lagging:
            self.lagging.discard(server)
            return
        if s.status != "IN_PROGRESS" and (self.releases[node] != self.wanted[node] or s.status == "FAILED") \
                and self._busy == 0:
            self._set(server, "UPDATE", "IN_PROGRESS")
            self._busy = 1
            return
        if s.status == "IN_PROGRESS":
            if self._busy < self.rebuild_looks:
                self._busy += 1
                return
            if node in self.fail_rebuilds:
                self._fail(server, f"Error: resources.{server}: rebuild of {node} to {self.wanted[node]} failed")
                return
            self.releases[node] = self.wanted[node]
            self._set(server, "UPDATE", "COMPLETE")
            return
        if gate is not None:
            self._set(gate, "CREATE", "IN_PROGRESS")
            return
        live = next((g for g in self.resources if g.startswith(f"gate_{node}_")
                     and self.resources[g].state == "CREATE_IN_PROGRESS"), None)
        if live is not None and node in self.timeout_gates:
            self._fail(live, f"WaitConditionTimeout: resources.{live}: 0 of 1 received")


class FakeClient:
    """The HeatClient face of a FakeHeat (what the orchestrator calls)."""

    def __init__(self, heat: FakeHeat) -> None:
        self.heat = heat
        self.endpoint = heat.endpoint

    def stack(self, name: str) -> Stack | None:
        return self.heat.stack(name)

    def create(self, *a: Any, **k: Any) -> str:
        return self.heat.create(*a, **k)

    def update(self, *a: Any, **k: Any) -> None:
        self.heat.update(*a, **k)

    def template(self, stack_id: str) -> dict[str, Any]:
        self.heat._call("template")
        return self.heat.template_of()

    def resources(self, stack_id: str) -> dict[str, ResourceState]:
        self.heat._call("resources")
        return self.heat.resources_of()

    def attributes(self, stack_id: str, resource: str) -> dict[str, Any]:
        return self.heat.attributes(stack_id, resource)

    def events(self, stack_id: str, marker: str | None = None) -> list[Event]:
        self.heat._call("events")
        ids = [e.id for e in self.heat.events]
        if marker is not None and marker not in ids:
            raise HeatError(f"listing the events of stack {stack_id} failed: ERROR: 404 not found", step="heat")
        return list(self.heat.events[ids.index(marker) + 1:] if marker is not None else self.heat.events)

    def last_event(self, stack_id: str) -> Event | None:
        self.heat._call("last_event")
        return self.heat.events[-1] if self.heat.events else None

    def resource_events(self, stack_id: str, resource: str) -> list[Event]:
        return self.heat.resource_events(stack_id, resource)

    def signal(self, stack_id: str, resource: str, data: dict[str, Any]) -> None:
        self.heat.signal(stack_id, resource, data)

    def clear_hook(self, stack_id: str, resource: str, hook: str) -> None:
        self.heat.clear_hook(stack_id, resource, hook)

    def cancel_update(self, stack_id: str) -> None:
        self.heat.cancel_update(stack_id)


class FakeFleet:
    """A fleet whose nodes are what the FakeHeat says they run; a real history in ``path``."""

    can_rehearse = False
    migrates_in_image = False

    def __init__(self, path: Path, heat: FakeHeat, releases: set[str]) -> None:
        self.path = path
        self.heat = heat
        self.history = History(path / "history.sqlite")
        self.known = releases
        self.store = SimpleNamespace(manifest=self._manifest, root=path / "store",
                                     require_trusted=lambda release, _fleet: self._manifest(release))
        self.stack_name = "fleet"
        self.stopped: set[str] = set()

    def _manifest(self, release: str) -> Any:
        from imageupdate.images.store import ReleaseNotFound

        if release not in self.known:
            raise ReleaseNotFound(f"release {release} not found")
        return SimpleNamespace(services=[], upgrade=None, state_paths=[])

    def node_names(self) -> list[str]:
        return list(self.heat.releases)

    def require_runnable(self, release: str) -> None:
        pass

    def states(self) -> dict[str, NodeState]:
        return {n: NodeState(n, f"10.0.0.{k}", r, n not in self.stopped)
                for k, (n, r) in enumerate(self.heat.releases.items())}

    def require_up(self) -> None:
        from imageupdate.rollout.fleet import SiteNotUp

        if self.stopped:
            raise SiteNotUp("not up")

    def require_exists(self) -> None:
        pass

    def server_options(self) -> dict[str, Any]:
        return {"site": str(self.path)}

    def environment(self) -> tuple[dict[str, str], dict[str, Any]]:
        return {}, {}

    def target(self, node: str) -> Any:
        return SimpleNamespace(name=node, address="10.0.0.1", key=self.path / "key", known_hosts=None)

    unbooted: dict[tuple[str, str], str] = {}  # (node, release) -> why it did not finish booting there

    def wait_booted(self, node: str, timeout: float) -> str | None:
        return self.unbooted.get((node, self.heat.releases.get(node, "")))

    def expectation(self, release: str) -> Any:
        return release

    def connect(self) -> tuple[FakeClient, Any]:
        return FakeClient(self.heat), SimpleNamespace(endpoint=self.heat.endpoint, instance=self.heat.instance)

    def publish(self, release: str) -> str | None:
        return None

    def heat_status(self) -> tuple[dict[str, Any], FakeClient | None]:
        return {"running": True, "endpoint": self.heat.endpoint, "pid": 1}, FakeClient(self.heat)

    def state_record(self, node: str) -> Any:
        raise OSError("no state journal in the fake")

    def state_file(self, node: str, path: str) -> str | None:
        return None

    def rehearse(self, node: str, upgrade: Any) -> Any:
        raise AssertionError("the fake fleet does not rehearse")


def verdicts(failing: set[str] | None = None) -> Any:
    """A verify() that passes every node but ``failing``."""
    def verify(target: Any, want: Any, extra: Any = None) -> Verdict:
        ok = target.name not in (failing or set())
        results = [CheckResult("release", ok, 0.0, "ok" if ok else f"{target.name} runs the wrong thing")]
        if extra is not None:
            results += extra()
        return Verdict(target.name, str(want), results)
    return verify
