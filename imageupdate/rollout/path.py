"""The fleet's upgrade path to a release: one plan per node (from what it runs and its state version),
and the config each node keeps, checked against every release on the way. Used by ``plan``,
``check-config``, ``rehearse`` and before a rollout starts."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageupdate.base.errors import InputError
from imageupdate.rollout.fleet import Fleet
from imageupdate.upgrade import config
from imageupdate.upgrade.catalog import catalog
from imageupdate.upgrade.plan import ReleaseInfo, UpgradePlan, pick, plan
from imageupdate.upgrade.rehearse import Rehearsal


@dataclass
class FleetPlan:
    target: str
    nodes: dict[str, UpgradePlan]
    between: list[ReleaseInfo]  # every versioned release after the oldest the fleet runs, up to the target

    @property
    def migrates(self) -> bool:
        return any(p.steps for p in self.nodes.values())

    def groups(self) -> list[tuple[list[str], UpgradePlan]]:
        """Nodes that share a plan, in the fleet's order."""
        out: list[tuple[list[str], UpgradePlan]] = []
        for node, p in self.nodes.items():
            for names, q in out:
                if q.to_dict() == p.to_dict():
                    names.append(node)
                    break
            else:
                out.append(([node], p))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "migrates": self.migrates,
                "groups": [{"nodes": names, **p.to_dict()} for names, p in self.groups()]}


def plan_fleet(fleet: Fleet, target: str, nodes: list[str] | None = None) -> FleetPlan:
    fleet.store.manifest(target)  # ReleaseNotFound
    releases = catalog(fleet.store)
    preferred = fleet.history.good_releases()
    states = fleet.states()
    out: dict[str, UpgradePlan] = {}
    for node in nodes if nodes is not None else fleet.node_names():
        current = states[node].release
        if current == target:
            continue
        out[node] = plan(releases, current, fleet.state_record(node).version, target, preferred,
                         str(fleet.store.root))
    return FleetPlan(target, out, _between(releases, [states[n].release for n in out] or [target], target,
                                           preferred))


def require_in_image(fp: FleetPlan) -> None:
    """On a fleet whose nodes migrate themselves at boot (``Fleet.migrates_in_image``), each runs only what
    its new image ships: a path with another release's migrations on it is refused before anything starts."""
    for node, p in fp.nodes.items():
        for hop in p.hops:
            if hop.migrations and hop.release != fp.target:
                names = ", ".join(m.name for m in hop.migrations)
                raise InputError(f"{node}: the path {p.from_release} -> {fp.target} runs {hop.release}'s "
                                 f"migrations ({names}), but a node of this fleet runs only those its new image "
                                 f"ships, at boot: roll out {hop.release} first, then {fp.target}",
                                 node=node, release=fp.target, step="plan")


def _between(releases: dict[str, ReleaseInfo], current: list[str], target: str,
             preferred: set[str]) -> list[ReleaseInfo]:
    """One release per version after the oldest the fleet runs and before the target, then the target."""
    tgt = releases[target].meta
    if tgt is None:
        return []
    metas = [releases[c].meta for c in current]
    low = min((m.key for m in metas if m is not None), default=tgt.key)
    by_version: dict[tuple[int, ...], list[ReleaseInfo]] = {}
    for r in releases.values():
        if r.meta is not None and low < r.meta.key < tgt.key:
            by_version.setdefault(r.meta.key, []).append(r)
    return [*(pick(by_version[k], preferred) for k in sorted(by_version)), releases[target]]


def fleet_configs(fleet: Fleet, fp: FleetPlan) -> list[config.ConfigFile]:
    """The config files the nodes keep on their state partitions, for every file a release on the path
    has a schema for."""
    schemas = sorted({p for r in fp.between if r.meta for p in r.meta.config})
    out = []
    for node in fp.nodes or fleet.node_names():
        for path in schemas:
            text = fleet.state_file(node, path)
            if text is not None:
                out.append(config.ConfigFile(f"{node}:{path}", path, text))
    return out


def check_fleet_config(fleet: Fleet, fp: FleetPlan, given: list[Path] | None = None) -> list[config.ConfigFinding]:
    schemas = {p for r in fp.between if r.meta for p in r.meta.config}
    files = config.files_given(given, schemas) if given else fleet_configs(fleet, fp)
    return config.check(files, fp.between, fp.target)


def configs_between(store_releases: dict[str, ReleaseInfo], current: str, target: str,
                    given: list[Path]) -> list[config.ConfigFinding]:
    """``check-config --from R``: no site, the operator's files against the releases after R up to target."""
    for r in (current, target):
        if r not in store_releases:
            raise InputError(f"release {r} is not in the store; build it or pick another")
    between = _between(store_releases, [current], target, set())
    schemas = {p for r in between if r.meta for p in r.meta.config}
    return config.check(config.files_given(given, schemas), between, target)


def rehearse_fleet(fleet: Fleet, target: str, node: str | None = None) -> tuple[Rehearsal, Path]:
    """The migration path to ``target`` on a copy of one node's state (default: the first node that would
    change); the report is also written to ``SITE/upgrade/rehearsals/``."""
    if node is not None and node not in fleet.node_names():
        raise InputError(f"unknown node {node!r} (nodes: {', '.join(fleet.node_names())})", node=node)
    fp = plan_fleet(fleet, target, [node] if node else None)
    chosen = node or next((n for n, p in fp.nodes.items() if p.steps), None)
    if chosen is None or not fp.nodes.get(chosen) or not fp.nodes[chosen].steps:
        raise InputError(f"nothing to rehearse: {target} needs no state migration on "
                         f"{chosen or 'any node'} (see 'imageupdate plan --to {target}')", release=target)
    report = fleet.rehearse(chosen, fp.nodes[chosen])
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = fleet.path / "upgrade" / "rehearsals" / f"{stamp}-{chosen}-{target}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report, out
