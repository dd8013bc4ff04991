"""The rollout chain: one Heat template from the fleet and the release each node should run.

Shape (measured on Heat 27 with the convergence engine)::

    server_node0 ─> gate_node0_r7 ─┐
    server_node1 ─> gate_node1_r7 ─┴─> barrier_0 ─> server_node2 ─> gate_node2_r7 ─> barrier_1 ─> ...

- one ``ImageUpdate::Server`` per node (``server_NODE``, stable name: updated in place, never replaced);
- after each node whose release changes, a stock ``OS::Heat::WaitCondition`` gate with its handle, named
  with this operation's tag, so only changing nodes get a fresh gate that waits for a signal;
- after each batch a barrier with a stable name (``OS::Heat::Value``); the next batch's servers depend on
  the barrier, not on the gates (without it Heat deletes old gates too early and a later template that
  meant to keep one re-creates it and waits);
- gates of earlier operations that still stand complete are copied verbatim from the stack's current
  template, so Heat leaves them alone.

A chain of named resources rather than an ``OS::Heat::ResourceGroup`` with ``rolling_update``: the group
updates its highest index first and re-updates every member's nested stack in every batch, which re-arms
every member's wait condition in every batch. A canary is batch 0 of size 1; a pause between batches is a
``pre-update`` hook on the next batch's servers.

Rendering is pure: no Heat, no site. ``ChainSpec`` says what to render.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

TEMPLATE_VERSION = "2021-04-16"
SERVER_TYPE = "ImageUpdate::Server"
REBUILD_OPTION = "rebuild"  # in a server's options: the tag of the operation that brought it back
_NAME_OK = re.compile(r"[A-Za-z0-9_.-]+")


def server_name(node: str) -> str:
    return f"server_{node}"


def gate_name(node: str, tag: str) -> str:
    return f"gate_{node}_{tag}"


def handle_name(gate: str) -> str:
    return f"{gate}_handle"


def barrier_name(batch: int) -> str:
    return f"barrier_{batch}"


def parse_gate(resource: str, nodes: list[str]) -> tuple[str, str] | None:
    """(node, tag) of a gate resource name, or None for anything else (handles included)."""
    if not resource.startswith("gate_") or resource.endswith("_handle"):
        return None
    rest = resource[len("gate_"):]
    for node in sorted(nodes, key=len, reverse=True):  # "web_1" before "web": names may hold underscores
        if rest.startswith(node + "_"):
            return node, rest[len(node) + 1:]
    return None


def batches(nodes: list[str], batch_size: int, canary: bool) -> list[list[str]]:
    """Split the nodes to change into batches; a canary is batch 0 of size 1."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    out: list[list[str]] = []
    rest = list(nodes)
    if canary and rest:
        out.append([rest.pop(0)])
    while rest:
        out.append(rest[:batch_size])
        rest = rest[batch_size:]
    return out


@dataclass
class ChainSpec:
    nodes: list[str]  # every node of the fleet, in fleet order
    releases: dict[str, str]  # the release each node should run after this operation
    batches: list[list[str]]  # the nodes whose release changes, in the order they change
    tag: str  # unique to this operation, e.g. "r7": names this operation's gates
    gate_timeout: int  # seconds a gate waits for its signal
    server_options: dict[str, Any] = field(default_factory=dict)
    keep_gates: dict[str, str] = field(default_factory=dict)  # node -> gate resource to keep as it is
    previous: dict[str, Any] = field(default_factory=dict)  # the stack's current template

    def validate(self) -> None:
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("a node is listed twice in the fleet")
        for n in self.nodes:
            if not _NAME_OK.fullmatch(n):
                raise ValueError(f"node name {n!r} cannot name a Heat resource")
        changing = [n for b in self.batches for n in b]
        if len(set(changing)) != len(changing) or not set(changing) <= set(self.nodes):
            raise ValueError("every changing node must be a fleet node, once")
        if not _NAME_OK.fullmatch(self.tag):
            raise ValueError(f"tag {self.tag!r} cannot name a Heat resource")


def _options(spec: ChainSpec, node: str, previous: Any, changing: bool) -> dict[str, Any]:
    """The server's options. A changing node on the release Heat already holds for it (a node brought back
    after it died there) gets this operation's tag under ``rebuild``: a changed property is what makes Heat
    rebuild it. A node this operation leaves alone keeps the options it had, so it is not rebuilt."""
    props = previous.get("properties", {}) if isinstance(previous, dict) else {}
    before = props.get("options") if isinstance(props, dict) else None
    held = props.get("release") if isinstance(props, dict) else None
    if changing and held == spec.releases[node]:
        return spec.server_options | {REBUILD_OPTION: spec.tag}
    if not changing and isinstance(before, dict) \
            and {k: v for k, v in before.items() if k != REBUILD_OPTION} == spec.server_options:
        return before
    return dict(spec.server_options)


def render(spec: ChainSpec) -> dict[str, Any]:
    spec.validate()
    resources: dict[str, Any] = {}
    changing = {n: k for k, b in enumerate(spec.batches) for n in b}
    previous = spec.previous.get("resources", {})
    for node in spec.nodes:
        batch = changing.get(node)
        server: dict[str, Any] = {
            "type": SERVER_TYPE,
            "properties": {"name": node, "release": spec.releases[node],
                           "options": _options(spec, node, previous.get(server_name(node)), batch is not None)},
        }
        if batch:
            server["depends_on"] = [barrier_name(batch - 1)]
        resources[server_name(node)] = server
        if batch is None:
            kept = spec.keep_gates.get(node)
            if kept and kept in previous and handle_name(kept) in previous:
                resources[kept] = copy.deepcopy(previous[kept])
                resources[handle_name(kept)] = copy.deepcopy(previous[handle_name(kept)])
            continue
        gate = gate_name(node, spec.tag)
        resources[handle_name(gate)] = {"type": "OS::Heat::WaitConditionHandle"}
        resources[gate] = {
            "type": "OS::Heat::WaitCondition",
            "depends_on": [server_name(node)],
            "properties": {"handle": {"get_resource": handle_name(gate)}, "count": 1,
                           "timeout": spec.gate_timeout},
        }
    for k, batch_nodes in enumerate(spec.batches):
        resources[barrier_name(k)] = {
            "type": "OS::Heat::Value",
            "depends_on": [gate_name(n, spec.tag) for n in batch_nodes],
            "properties": {"type": "string", "value": f"{spec.tag}: batch {k + 1} of {len(spec.batches)} "
                                                      f"passed ({', '.join(batch_nodes)})"},
        }
    return {
        "heat_template_version": TEMPLATE_VERSION,
        "description": f"imageupdate chain {spec.tag}",
        "resources": resources,
        "outputs": {
            "releases": {"value": {n: spec.releases[n] for n in spec.nodes}},
            "tag": {"value": spec.tag},
        },
    }


def pause_hooks(batches: list[list[str]]) -> dict[str, Any]:
    """Environment fragment that pauses before every batch but the first (``--pause-between-batches``): a
    ``pre-update`` hook on its servers. (Heat fires ``pre-create`` hooks only while a stack is created, so a
    barrier new in an update could not hold one.)"""
    return {server_name(n): {"hooks": ["pre-update"]} for batch in batches[1:] for n in batch}
