"""The fault matrix (needs root): a rollout and a rollback with state migrations, each hit at the steps that
matter by each kind of fault, then ``status``, ``resume`` or ``cancel``; after each trial every node is on
exactly one complete release with its data as it was on that release, no process of a node is frozen, no
lock is held and the history is complete (``faultlib.check``).

R1 -> R2 runs a contract migration (``0002-json-to-sqlite``): a rollout takes a snapshot of each node's state
and migrates it; a rollback restores the snapshot. All the R1 <-> R2 trials share one 2-node site, in an order
where each starts where the one before ended (a trial that finds the fleet elsewhere brings it there first).
The R1 -> R4 trials (three migrations, two of them contract steps) run on a second 2-node site.

Each trial is one test; its row (step, fault, what was run after, outcome) goes into the table that
``conftest.py`` prints at the end of the session.
"""
from __future__ import annotations

import pytest

from tests.faults.conftest import Matrix
from tests.faults.faultlib import Baseline, Fault, Site, Trial, bring_to, run_trial

pytestmark = pytest.mark.functional

ROLLOUT = ("rollout", "R2")
ROLLBACK = ("rollback", "--to", "R1")
def trial(t: Trial, *marks: pytest.MarkDecorator) -> object:
    return pytest.param(t, id=t.name, marks=marks)


MATRIX = [
    trial(Trial("rollback-before-update", ROLLBACK, "R2", "before-update (template recorded, not sent)",
                Fault("imageupdate", "rollback:before-update"), "cancel",
                (("rollback", "cancelled"),), "R2")),
    trial(Trial("rollback-before-signal", ROLLBACK, "R2", "node0's gate: verdict known, not signalled",
                Fault("imageupdate", "rollback:before-signal@node0"), "resume",
                (("rollback", "succeeded"),), "R1")),
    trial(Trial("rollout-after-start", ROLLOUT, "R1", "after-start (recorded, nothing done)",
                Fault("imageupdate", "after-start"), "cancel",
                (("rollout", "cancelled"),), "R1")),
    trial(Trial("rollout-in-freeze", ROLLOUT, "R1", "rehearsal: node0 frozen for the copy",
                Fault("imageupdate", "in-freeze"), "resume",
                (("rollout", "succeeded"),), "R2")),
    trial(Trial("rollback-heat-rebuild", ROLLBACK, "R2", "node1 rebuilding (snapshot restore)",
                Fault("heat", node="node1", step="rebuild"), "resume",
                (("rollback", "succeeded"),), "R1")),
    trial(Trial("rollout-rebuild-killed", ROLLOUT, "R1", "node1 rebuilding (migration)",
                Fault("rebuild", node="node1", step="rebuild"), "status",
                (("rollout", "rolled-back"), ("rollback", "succeeded")), "R1")),
    trial(Trial("rollout-node-killed", ROLLOUT, "R1", "node0's gate",
                Fault("node", node="node0"), "status",
                (("rollout", "rolled-back"), ("rollback", "succeeded")), "R1")),
    trial(Trial("rollout-heat-cancel", ROLLOUT, "R1", "node1 rebuilding (migration)",
                Fault("heat", node="node1", step="rebuild"), "cancel",
                (("rollout", "cancelled"), ("rollback", "succeeded")), "R1", recovery_timeout=120)),
    trial(Trial("rollout-before-signal", ROLLOUT, "R1", "node1's gate: verdict known, not signalled",
                Fault("imageupdate", "before-signal@node1"), "cancel",
                (("rollout", "cancelled"), ("rollback", "succeeded")), "R1")),
    trial(Trial("rollout-after-create-hooks", ROLLOUT, "R1", "after-create-hooks (rehearsed, not sent)",
                Fault("imageupdate", "after-create-hooks"), "resume",
                (("rollout", "succeeded"),), "R2")),
    trial(Trial("rollback-rebuild-killed", ROLLBACK, "R2", "node0 rebuilding (snapshot restore)",
                Fault("rebuild", node="node0", step="rebuild"), "again",
                (("rollback", "failed"), ("rollback", "succeeded")), "R1")),
    trial(Trial("rollout-heat-gate", ROLLOUT, "R1", "node0's gate",
                Fault("heat", node="node0", step="gate"), "resume",
                (("rollout", "succeeded"),), "R2")),
    trial(Trial("rollback-node-killed", ROLLBACK, "R2", "node1's gate",
                Fault("node", node="node1"), "again",
                (("rollback", "failed"), ("rollback", "succeeded")), "R1")),
    trial(Trial("rollout-rebuild-killed-starting", ROLLOUT, "R1", "node1 switched to R2, being started",
                Fault("rebuild", node="node1", step="start"), "status",
                (("rollout", "rolled-back"), ("rollback", "succeeded")), "R1")),
]

UPGRADE = [
    trial(Trial("upgrade-in-freeze", ("rollout", "R4"), "R1", "rehearsal of 0002, 0003, 0004: node0 frozen",
                Fault("imageupdate", "in-freeze"), "cancel",
                (("rollout", "cancelled"),), "R1")),
    trial(Trial("upgrade-migration-killed", ("rollout", "R4"), "R1", "node0 migrating: 0003-add-created "
                "(after contract 0002)", Fault("migration", "migration:0003-add-created"), "status",
                (("rollout", "rolled-back"), ("rollback", "succeeded")), "R1")),
    trial(Trial("badmig-rollback-killed", ("rollout", "R4-badmig", "--no-rehearse"), "R1",
                "rollback of node0 after its failed 0004 (snapshot restored), its gate",
                Fault("imageupdate", "rollback:before-signal@node0"), "resume",
                (("rollout", "rolled-back"), ("rollback", "succeeded")), "R1")),
]


def run(site: Site, baseline: Baseline, t: Trial, matrix: Matrix) -> None:
    bring_to(site, t.start)
    result = run_trial(site, t, baseline)
    matrix.add(result.row())
    assert result.injected.hit, f"{t.name}: the fault missed ({t.fault.describe()}): {result.outcome}"
    problems = result.checked.problems
    assert not problems, f"{t.name}: {result.outcome}\nfault: {result.injected.stderr[-1500:]}\n" \
                         f"after: {result.recovery[2][-1500:]}"
    assert result.operations == list(t.expect), result.outcome
    assert set(result.checked.releases.values()) == {t.release}, result.outcome


@pytest.mark.parametrize("t", MATRIX)
def test_fault(t: Trial, fault_site: tuple[Site, Baseline], matrix: Matrix) -> None:
    run(*fault_site, t, matrix)


@pytest.mark.parametrize("t", UPGRADE)
def test_upgrade_fault(t: Trial, upgrade_site: tuple[Site, Baseline], matrix: Matrix) -> None:
    run(*upgrade_site, t, matrix)
