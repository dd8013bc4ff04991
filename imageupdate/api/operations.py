"""The fleet operations: rollout, rollback, resume, cancel; and what can be asked of a fleet without changing
it: status, check, plan, rehearse, check_config, report. Each returns a typed result with ``to_dict()`` (the
``--json`` document of the command of the same name)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageupdate.api.fleets import PathLike, open_fleet, open_site, open_store
from imageupdate.base.errors import InputError
from imageupdate.report.data import collect
from imageupdate.report.html import render_page, write_page
from imageupdate.rollout.check import check_nodes
from imageupdate.rollout.engine import Orchestrator, Outcome, RolloutEvent, RolloutOptions
from imageupdate.rollout.path import FleetPlan, check_fleet_config, configs_between, plan_fleet, rehearse_fleet
from imageupdate.rollout.status import FleetStatus, fleet_status
from imageupdate.site.fleet import LocalFleet
from imageupdate.upgrade.catalog import catalog
from imageupdate.upgrade.config import ConfigFinding
from imageupdate.upgrade.rehearse import Rehearsal
from imageupdate.verify.checks import Verdict

OnEvent = Callable[[RolloutEvent], None]


def rollout(release: str, options: RolloutOptions | None = None, *, site: PathLike | None = None,
            store: PathLike | None = None, cloud: str | None = None, on_event: OnEvent | None = None) -> Outcome:
    """Roll ``release`` onto the fleet node by node, each node gated by its checks."""
    fleet = open_fleet(site, store, cloud)
    return Orchestrator(fleet, on_event=on_event).rollout(release, options or RolloutOptions())


def rollback(to: str | None = None, options: RolloutOptions | None = None, *, site: PathLike | None = None,
             store: PathLike | None = None, cloud: str | None = None, on_event: OnEvent | None = None) -> Outcome:
    """Return each node the newest rollout touched to the release it ran before (or every node to ``to``).
    Of ``options`` a rollback honours batch_size, limit and gate_timeout."""
    given = options or RolloutOptions()
    opts = RolloutOptions(batch_size=given.batch_size, limit=given.limit, gate_timeout=given.gate_timeout,
                          rollback=False)
    return Orchestrator(open_fleet(site, store, cloud), on_event=on_event).rollback(to, opts)


def resume(*, site: PathLike | None = None, store: PathLike | None = None, cloud: str | None = None,
           on_event: OnEvent | None = None) -> Outcome:
    """Finish a paused or interrupted operation."""
    return Orchestrator(open_fleet(site, store, cloud), on_event=on_event).resume()


@dataclass(frozen=True)
class CancelRequested:
    """The operation runs in another process: it stops at its next gate and rolls back what it touched."""

    def to_dict(self) -> dict[str, Any]:
        return {"cancel": "requested"}


def cancel(*, site: PathLike | None = None, store: PathLike | None = None, cloud: str | None = None,
           on_event: OnEvent | None = None) -> Outcome | CancelRequested:
    """Stop the open operation and roll back what it touched."""
    outcome = Orchestrator(open_fleet(site, store, cloud), on_event=on_event).cancel()
    return CancelRequested() if outcome is None else outcome


def status(rollout: int | None = None, *, site: PathLike | None = None, store: PathLike | None = None,
           cloud: str | None = None) -> FleetStatus:
    """Which node runs what, and the newest (or the given) operation with its steps."""
    return fleet_status(open_fleet(site, store, cloud), rollout)


@dataclass(frozen=True)
class Checks:
    verdicts: list[Verdict]

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [v.to_dict() for v in self.verdicts], "ok": self.ok}


def check(nodes: list[str] | None = None, *, site: PathLike | None = None, store: PathLike | None = None,
          cloud: str | None = None) -> Checks:
    """Run the gate's checks on nodes now (default: all), against the release each runs."""
    return Checks(check_nodes(open_fleet(site, store, cloud), nodes or None))


@dataclass(frozen=True)
class Plan:
    plan: FleetPlan
    findings: list[ConfigFinding]

    def to_dict(self) -> dict[str, Any]:
        return self.plan.to_dict() | {"config": [f.to_dict() for f in self.findings]}


def plan(to: str, *, site: PathLike | None = None, store: PathLike | None = None,
         cloud: str | None = None) -> Plan:
    """The upgrade path to ``to``: the migrations each node's state goes through, and config findings."""
    fleet = open_fleet(site, store, cloud)
    fp = plan_fleet(fleet, to)
    return Plan(fp, check_fleet_config(fleet, fp))


@dataclass(frozen=True)
class RehearsalReport:
    rehearsal: Rehearsal
    page: Path

    @property
    def ok(self) -> bool:
        return self.rehearsal.ok

    def to_dict(self) -> dict[str, Any]:
        return self.rehearsal.to_dict() | {"report": str(self.page)}


def rehearse(to: str, node: str | None = None, *, site: PathLike | None = None,
             store: PathLike | None = None) -> RehearsalReport:
    """Run the migration path to ``to`` on a copy of a node's state (the local site only), timed."""
    report, page = rehearse_fleet(LocalFleet(open_site(site, store)), to, node)
    return RehearsalReport(report, page)


@dataclass(frozen=True)
class ConfigCheck:
    target: str
    findings: list[ConfigFinding]

    @property
    def errors(self) -> list[ConfigFinding]:
        return [f for f in self.findings if f.level == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ok": not self.errors, "findings": [f.to_dict() for f in self.findings]}


def check_config(to: str, configs: list[PathLike] | None = None, from_release: str | None = None, *,
                 site: PathLike | None = None, store: PathLike | None = None) -> ConfigCheck:
    """Check config files (default: each local node's) against ``to`` and every release before it; with
    ``from_release``, the ``configs`` given, written for that release."""
    given = [Path(c) for c in configs or []]
    if from_release:
        if not given:
            raise InputError("a config check from a given release checks the config files given: name at least one")
        return ConfigCheck(to, configs_between(catalog(open_store(store)), from_release, to, given))
    fleet = LocalFleet(open_site(site, store))
    return ConfigCheck(to, check_fleet_config(fleet, plan_fleet(fleet, to), given or None))


@dataclass(frozen=True)
class Report:
    data: dict[str, Any]
    page: Path

    def to_dict(self) -> dict[str, Any]:
        return self.data | {"page": str(self.page)}


def report(rollout: int | None = None, output: PathLike | None = None, *, site: PathLike | None = None,
           store: PathLike | None = None, cloud: str | None = None) -> Report:
    """Write an HTML page of an operation (default: the newest) to ``output`` (default: SITE/reports/)."""
    fleet = open_fleet(site, store, cloud)
    data = collect(fleet.history, rollout, site=str(fleet.path))
    page = Path(output) if output else fleet.path / "reports" / f"rollout-{data['rollout']['id']}.html"
    write_page(page, render_page(data))
    return Report(data, page)
