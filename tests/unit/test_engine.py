"""The orchestrator's operations and fault handling against a scripted Heat (tests/unit/fakeheat.py): gate
failures and timeouts, Heat not answering or restarting, a kill at every step followed by resume or cancel,
cancelling a rollback. No root, nothing waits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from imageupdate.base.errors import InputError
from imageupdate.rollout import drive, engine, stack, watch
from imageupdate.rollout.engine import HeatLost, Orchestrator, RolloutOptions
from imageupdate.rollout.path import FleetPlan
from tests.unit.fakeheat import FakeFleet, FakeHeat, verdicts

NODES = ("node0", "node1", "node2")


class Killed(BaseException):
    """Stands for SIGKILL: passes every handler (the kernel would also drop the lock)."""


@pytest.fixture(autouse=True)
def _no_planning(monkeypatch: pytest.MonkeyPatch) -> None:
    """No store catalog in these tests: no state migrations, no config findings."""
    monkeypatch.setattr(engine, "plan_fleet", lambda fleet, target, nodes=None: FleetPlan(target, {}, []))
    monkeypatch.setattr(engine, "check_fleet_config", lambda fleet, fp, given=None: [])


def make(tmp_path: Path, failing: set[str] | None = None, **heat: Any) -> tuple[FakeHeat, FakeFleet, Orchestrator]:
    h = FakeHeat({n: "R1" for n in NODES}, **heat)
    fleet = FakeFleet(tmp_path, h, {"R1", "R2", "R3"})
    return h, fleet, Orchestrator(fleet, sleep=lambda s: None, poll=0.01,  # type: ignore[arg-type]
                                  verify=verdicts(failing))


def again(fleet: FakeFleet, failing: set[str] | None = None) -> Orchestrator:
    """A new imageupdate process on the same site."""
    return Orchestrator(fleet, sleep=lambda s: None, poll=0.01, verify=verdicts(failing))  # type: ignore[arg-type]


def kill_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    def crash(step: str, kind: str | None = None, node: str | None = None) -> None:
        names = {step} | ({f"{step}@{node}"} if node else set())
        names |= {f"{kind}:{n}" for n in names} if kind else set()
        if point in names:
            monkeypatch.setattr(drive, "crashpoint", lambda *a, **k: None)
            monkeypatch.setattr(stack, "crashpoint", lambda *a, **k: None)
            monkeypatch.setattr(watch, "crashpoint", lambda *a, **k: None)
            raise Killed(point)
    for module in (drive, stack, watch):
        monkeypatch.setattr(module, "crashpoint", crash)


def one_release(h: FakeHeat) -> set[str]:
    return set(h.releases.values())


def test_a_rollout_rebuilds_and_gates_every_node(tmp_path: Path) -> None:
    h, fleet, orch = make(tmp_path)
    out = orch.rollout("R2", RolloutOptions(probe=False))
    assert out.status == "succeeded", out.reason
    assert h.releases == {n: "R2" for n in NODES}
    steps = {(s.node, s.step): s.status for s in fleet.history.steps(out.rollout.id)}
    assert set(steps.values()) == {"succeeded"} and len(steps) == 6
    assert fleet.history.rollout(out.rollout.id).stage == "ended"  # type: ignore[union-attr]
    assert fleet.history.active() is None


def test_a_machine_that_does_not_finish_booting_fails_its_gate_with_why(tmp_path: Path) -> None:
    """On a cloud Nova says ACTIVE when the machine starts: the gate waits for its boot, and one that never
    ends fails with the console's say (checks never run against a half-booted node)."""
    h, fleet, orch = make(tmp_path)
    fleet.unbooted = {("node0", "R2"): "node0 did not finish booting within 540 s (no answer); console ends: "
                                       "Kernel panic"}
    out = orch.rollout("R2", RolloutOptions(probe=False))
    assert out.status == "rolled-back" and "Kernel panic" in (out.reason or ""), out.reason
    checks = [(c["node"], c["name"], c["ok"]) for c in fleet.history.checks(out.rollout.id)]
    assert ("node0", "boot", False) in checks and not any(n == "node1" for n, _, _ in checks)


def test_a_failed_gate_rolls_the_touched_nodes_back(tmp_path: Path) -> None:
    h, fleet, orch = make(tmp_path, failing={"node1"})
    out = orch.rollout("R2", RolloutOptions(probe=False))
    assert out.status == "failed" and "node1 runs the wrong thing" in (out.reason or "")
    assert out.rollback is not None and out.rollback.status == "failed"  # node1 fails on the way back too
    assert out.next is not None and "imageupdate rollback" in out.next  # says where each node is, what next
    assert fleet.history.active() is None


def test_a_failed_gate_rolls_back_to_where_each_node_was(tmp_path: Path) -> None:
    h, fleet, orch = make(tmp_path)

    def verify(target: Any, want: Any, extra: Any = None) -> Any:
        # node1 fails on R2 only
        return verdicts({"node1"} if want == "R2" else set())(target, want, extra)
    orch.driver.verify = verify
    out = orch.rollout("R2", RolloutOptions(probe=False))
    assert out.status == "rolled-back", out.reason
    assert h.releases == {"node0": "R1", "node1": "R1", "node2": "R1"}
    assert out.rollback is not None and out.rollback.status == "succeeded"
    assert sorted(out.rollback.rollout.plan["batches"][0] + out.rollback.rollout.plan["batches"][1]) == \
        ["node0", "node1"]


def test_heat_not_answering_for_a_while_is_waited_out(tmp_path: Path) -> None:
    h, fleet, orch = make(tmp_path)
    real = h._step

    def flaky() -> None:
        if h.looks == 5:
            h.down = 4  # the next four calls fail
        real()
    h._step = flaky  # type: ignore[method-assign]
    out = orch.rollout("R2", RolloutOptions(probe=False))
    assert out.status == "succeeded"


def test_heat_lost_leaves_the_operation_open_and_resume_resends_after_a_restart(tmp_path: Path) -> None:
    h, fleet, orch = make(tmp_path)
    real = h._step

    def dies() -> None:
        real()
        if h.releases["node0"] == "R2" and h.instance == "heat@1":
            h.down = 1000  # Heat is gone
    h._step = dies  # type: ignore[method-assign]
    with pytest.raises(HeatLost):
        orch.rollout("R2", RolloutOptions(probe=False))
    row = fleet.history.active()
    assert row is not None and row.status == "running"
    h._step = real  # type: ignore[method-assign]
    h.down = 0
    h.restart()  # a new Heat: the update in progress failed with the old engine
    h.stack_status = ("UPDATE", "IN_PROGRESS")  # ... and the resume finds it running again
    out = again(fleet).resume()
    assert out.status == "succeeded", out.reason
    assert h.releases == {n: "R2" for n in NODES}


def heat_dies_then_restarts(h: FakeHeat, orch: Orchestrator, resource: str, state: str) -> None:
    """Heat stops answering once ``resource`` reaches ``state`` (the rollout gives up: HeatLost), then
    comes back as a new instance that fails what the dead engine held."""
    real = h._step

    def dies() -> None:
        real()
        res = h.resources.get(resource)
        if res is not None and res.state == state and h.instance == "heat@1":
            h.down = 1000
    h._step = dies  # type: ignore[method-assign]
    with pytest.raises(HeatLost):
        orch.rollout("R2", RolloutOptions(probe=False))
    h._step = real  # type: ignore[method-assign]
    h.down = 0
    h.restart()


def test_a_gate_failed_by_a_dead_heat_engine_is_not_a_verdict(tmp_path: Path) -> None:
    """Heat killed during node0's gate: the new engine fails the gate it held and, the same template
    re-sent, creates it again; the watch must not take that FAILED as node0's verdict."""
    h, fleet, orch = make(tmp_path)
    orch.driver.verify = lambda *a, **k: __import__("time").sleep(0.2) or verdicts()(*a, **k)  # type: ignore[assignment]
    heat_dies_then_restarts(h, orch, "gate_node0_r2", "CREATE_IN_PROGRESS")
    assert h.resources["gate_node0_r2"].status == "FAILED"
    h.stack_status = ("UPDATE", "IN_PROGRESS")
    out = again(fleet).resume()
    assert out.status == "succeeded", out.reason
    steps = {(s.node, s.step): s.status for s in fleet.history.steps(out.rollout.id)}
    assert steps[("node0", "gate")] == "succeeded"
    assert fleet.history.last_good("node0") == "R2"


def test_a_rebuild_failed_by_a_dead_heat_engine_is_not_the_rebuilds_outcome(tmp_path: Path) -> None:
    """Heat killed while node0 rebuilds: after the restart and the re-sent template, the new engine shows the
    dead one's server FAILED ("Worker went down during resource UPDATE") and then rebuilds it again; the
    history must not say the rebuild failed (seen in the fault matrix: node0 gated and passed on R2)."""
    h, fleet, orch = make(tmp_path, rebuild_looks=3)
    heat_dies_then_restarts(h, orch, "server_node0", "UPDATE_IN_PROGRESS")
    h._set("server_node0", "UPDATE", "FAILED", "Worker went down during resource UPDATE")  # Heat's wording
    h.stack_status = ("UPDATE", "IN_PROGRESS")  # as the gate's case: Heat 27 leaves the stack in progress
    out = again(fleet).resume()
    assert out.status == "succeeded", out.reason
    steps = {(s.node, s.step): s.status for s in fleet.history.steps(out.rollout.id)}
    assert steps[("node0", "rebuild")] == "succeeded"
    assert steps[("node0", "gate")] == "succeeded"
    assert one_release(h) == {"R2"}


def test_cancel_after_heat_restarted_mid_update_ends_and_rolls_back(tmp_path: Path) -> None:
    """Heat killed while node0 rebuilds: the new engine runs nothing until the update is sent again, so cancel
    re-sends it and fails the next gate (before, it watched a stack that never moved again)."""
    h, fleet, orch = make(tmp_path)
    real = h._step

    def dies() -> None:
        real()
        if h.resources["server_node1"].status == "IN_PROGRESS" and h.instance == "heat@1":
            h.down = 1000
    h._step = dies  # type: ignore[method-assign]
    with pytest.raises(HeatLost):
        orch.rollout("R2", RolloutOptions(probe=False))
    h._step = real  # type: ignore[method-assign]
    h.down = 0
    h.restart()
    h.stack_status = ("UPDATE", "IN_PROGRESS")  # as the dead engine left it
    looks = h.looks
    real_step = h._step

    def bounded() -> None:
        assert h.looks - looks < 2000, "cancel watches a stack that never moves"
        real_step()
    h._step = bounded  # type: ignore[method-assign]
    out = again(fleet).cancel()
    assert out is not None and out.status == "cancelled", out.reason
    assert out.rollback is not None and out.rollback.status == "succeeded"
    assert one_release(h) == {"R1"} and fleet.history.active() is None


def test_a_gate_that_times_out_fails_and_is_rolled_back(tmp_path: Path) -> None:
    h, fleet, orch = make(tmp_path)
    h.timeout_gates = {"node0"}

    def slow(target: Any, want: Any, extra: Any = None) -> Any:
        import time
        time.sleep(0.05)
        return verdicts()(target, want, extra)
    orch.driver.verify = slow
    out = orch.rollout("R2", RolloutOptions(probe=False))
    assert out.status in ("rolled-back", "failed")
    steps = {(s.node, s.step): s.status for s in fleet.history.steps(out.rollout.id)}
    assert steps[("node0", "gate")] == "timed-out"


def test_an_update_heat_refuses_closes_the_operation_as_failed(tmp_path: Path) -> None:
    h, fleet, orch = make(tmp_path, refuse_updates="timeout_mins too large")
    out = orch.rollout("R2", RolloutOptions(probe=False))
    assert out.status == "failed" and "Heat refused the update" in (out.reason or "")
    assert fleet.history.active() is None  # nothing left open: the next command is not refused
    assert one_release(h) == {"R1"}
    h.refuse_updates = None
    assert again(fleet).rollout("R2", RolloutOptions(probe=False)).status == "succeeded"


def test_a_gate_timeout_beyond_a_day_is_bad_input() -> None:
    with pytest.raises(InputError, match="--gate-timeout must be at most 86400"):
        RolloutOptions(gate_timeout=99999999999999999999).validate()


def test_a_crash_before_any_node_is_touched_closes_the_operation(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    h, fleet, orch = make(tmp_path)

    def boom(*a: Any, **k: Any) -> None:
        raise TypeError("'NoneType' object is not subscriptable")
    monkeypatch.setattr(stack, "send", boom)
    out = orch.rollout("R2", RolloutOptions(probe=False))
    assert out.status == "failed" and "TypeError" in (out.reason or "")
    assert fleet.history.active() is None
    assert one_release(h) == {"R1"}


def test_a_probe_that_cannot_read_a_manifest_does_not_wedge_the_operation(tmp_path: Path) -> None:
    h, fleet, orch = make(tmp_path)
    fleet.store.manifest = lambda r: (_ for _ in ()).throw(ValueError("services: not a list"))  # type: ignore[attr-defined]
    fleet.known = set()
    orch2 = again(fleet)
    from imageupdate.rollout.extras import Extras

    extras = Extras(fleet, fleet.history, orch2.driver.say, RolloutOptions())  # type: ignore[arg-type]
    row = fleet.history.start("rollout", "R2", {}, {"batches": [["node0"]], "after": {"node0": "R2"}})
    assert extras.start_probe(row, RolloutOptions()) is None
    assert "cannot be read" in fleet.history.log(row.id)[-1]["message"]


KILL_POINTS = ["after-start", "after-rehearsal", "after-create-hooks", "before-update", "before-signal@node0",
               "before-signal@node1", "rollback:before-update", "rollback:before-signal@node0"]


def killed_rollout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str) -> tuple[FakeHeat, FakeFleet, set[str]]:
    """A rollout R1 -> R2 killed at ``point`` (node1 fails its gate when the point is in the rollback)."""
    failing = {"node1"} if point.startswith("rollback:") else set()
    h, fleet, orch = make(tmp_path, failing=failing)
    kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        orch.rollout("R2", RolloutOptions(probe=False))
    assert fleet.history.active() is not None  # open: status can explain it, resume or cancel finish it
    return h, fleet, failing


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_at_any_step_resume_ends_on_one_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       point: str) -> None:
    h, fleet, failing = killed_rollout(tmp_path, monkeypatch, point)
    again(fleet, failing).resume()
    assert fleet.history.active() is None
    assert len(one_release(h)) == 1, h.releases
    want = "R1" if failing else "R2"
    assert one_release(h) == {want}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_at_any_step_cancel_ends_on_one_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       point: str) -> None:
    h, fleet, failing = killed_rollout(tmp_path, monkeypatch, point)
    out = again(fleet, failing).cancel()
    assert out is not None
    active = fleet.history.active()
    if active is not None:  # a cancelled rollback leaves the way back to 'imageupdate rollback'
        pytest.fail(f"still open after cancel: {active}")
    assert out.status in ("cancelled", "rolled-back", "failed")
    if out.next is not None:
        assert "imageupdate rollback" in out.next
        done = again(fleet).rollback(None, RolloutOptions(probe=False))
        assert done.status in ("succeeded", "nothing-to-do"), done.reason
    assert one_release(h) == {"R1"}, h.releases


def test_resume_after_a_kill_before_heat_redoes_the_create_hooks(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    script = hooks / "res"
    script.write_text("#!/bin/sh\necho \"$1\" >> " + str(tmp_path / "ran") + "\n")
    script.chmod(0o755)
    h, fleet, orch = make(tmp_path)
    kill_at(monkeypatch, "after-start")
    with pytest.raises(Killed):
        orch.rollout("R2", RolloutOptions(probe=False, resources=str(hooks)))
    assert not (tmp_path / "ran").exists()
    out = again(fleet).resume()
    assert out.status == "succeeded", out.reason
    ran = (tmp_path / "ran").read_text().split()
    assert ran[0] == "create" and "destroy" in ran


def test_cancelling_a_rollback_stops_there_and_rollback_finishes_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    h, fleet, orch = make(tmp_path)

    def verify(target: Any, want: Any, extra: Any = None) -> Any:
        if want == "R2" and target.name == "node1":
            return verdicts({"node1"})(target, want, extra)
        if want == "R1" and target.name == "node0":  # the way back: the operator cancels at node0's gate
            row = fleet.history.active()
            assert row is not None and row.kind == "rollback"
            fleet.history.update(row.id, cancel_requested=1.0)
        return verdicts()(target, want, extra)
    orch.driver.verify = verify
    out = orch.rollout("R2", RolloutOptions(probe=False, batch_size=1))
    assert out.status == "failed"
    assert out.rollback is not None and out.rollback.status == "cancelled"
    assert out.next is not None and "imageupdate rollback" in out.next and "node1 on R2" in out.next
    assert fleet.history.active() is None
    # node0 back on R1 passed?  it was cancelled at its gate: not recorded as reached either way
    done = again(fleet).rollback(None, RolloutOptions(probe=False))
    assert done.status == "succeeded", done.reason
    assert one_release(h) == {"R1"}
    # and a later rollout that is cancelled goes back to R1, not to a release a cancelled gate recorded
    out = again(fleet, {"node0"}).rollout("R2", RolloutOptions(probe=False))
    assert one_release(h) == {"R1"}


def test_options_from_an_older_history_load_with_defaults() -> None:
    opts = RolloutOptions.from_stored({"batch_size": 3, "gate_timeout": "x", "gone": 1, "probe": False})
    assert opts.batch_size == 3 and opts.gate_timeout == 600 and opts.probe is False


def test_a_rollback_run_again_gates_a_node_that_failed_on_the_release_it_holds(tmp_path: Path) -> None:
    """A rollback failed at node1's gate on R1 (node1 holds R1 already): running it again must rebuild and
    gate node1 (Heat needs a changed property for that: this operation's tag in its options), not say
    'nothing to do' over a node whose newest verdict there is a failure."""
    h, fleet, orch = make(tmp_path)
    assert orch.rollout("R2", RolloutOptions(probe=False)).status == "succeeded"
    failed = again(fleet, failing={"node1"}).rollback("R1", RolloutOptions(probe=False))
    assert failed.status == "failed" and h.releases["node1"] == "R1"
    before = copy.deepcopy(h.template["resources"])
    out = again(fleet).rollback("R1", RolloutOptions(probe=False))
    assert out.status == "succeeded", out.reason
    gates = {s.node: s.status for s in fleet.history.steps(out.rollout.id) if s.step == "gate"}
    assert gates.get("node1") == "succeeded"
    res = h.template["resources"]
    assert res["server_node1"]["properties"]["options"]["rebuild"] == out.rollout.tag
    for n in NODES:
        if n not in gates:  # left alone: its server's properties as they were, so Heat does not rebuild it
            assert res[f"server_{n}"]["properties"] == before[f"server_{n}"]["properties"]
    assert fleet.history.last_verdict("node1") == ("R1", True)


def test_a_rollback_run_again_gates_a_node_its_killed_rebuild_left_on_the_target(tmp_path: Path) -> None:
    """Seen in the soak: node0's rebuild to R1 was killed after it switched the node; the rollback failed, the
    next one succeeded, and node0 went from R2 to R1 without a passed gate there."""
    h, fleet, orch = make(tmp_path)
    assert orch.rollout("R2", RolloutOptions(probe=False)).status == "succeeded"
    h.fail_rebuilds = {"node0"}
    failed = again(fleet).rollback("R1", RolloutOptions(probe=False))
    assert failed.status == "failed"
    h.fail_rebuilds = set()
    h.releases["node0"] = "R1"  # the rebuild had switched and started the node before it was killed
    out = again(fleet).rollback("R1", RolloutOptions(probe=False))
    assert out.status == "succeeded", out.reason
    gates = {s.node: s.status for s in fleet.history.steps(out.rollout.id) if s.step == "gate"}
    assert gates.get("node0") == "succeeded"
    assert fleet.history.last_verdict("node0") == ("R1", True)


def test_a_rollout_whose_way_back_is_not_trusted_starts_nothing(tmp_path: Path) -> None:
    """Seen in review: a fleet on R1, built before releases were signed, rolled out R2; R2 failed its gate and
    the automatic rollback to R1 was refused node by node, leaving the fleet mixed. Now: refused up front."""
    from imageupdate.base.errors import UntrustedRelease

    h, fleet, orch = make(tmp_path, failing={"node1"})

    def trusted(release: str, _fleet: Path) -> Any:
        if release == "R1":
            raise UntrustedRelease(f"release {release!r} is not signed", release=release)
        return fleet._manifest(release)

    fleet.store.require_trusted = trusted
    with pytest.raises(UntrustedRelease, match="a failed gate would roll back to R1"):
        orch.rollout("R2", RolloutOptions(probe=False))
    assert h.releases == {n: "R1" for n in NODES} and fleet.history.active() is None
    out = orch.rollout("R2", RolloutOptions(probe=False, rollback=False))  # asked not to roll back: allowed
    assert out.status == "failed"


def test_status_says_which_nodes_a_cancelled_or_failed_rollback_left_unproven(tmp_path: Path) -> None:
    """Seen in the soak: a rollback cancelled at node0's gate left node0 on R1 with no passed gate there;
    status showed only RELEASE R1 beside LAST GOOD R2. Now it says 'unproven', in --json too."""
    from imageupdate.commands.render import fleet_status as render
    from imageupdate.rollout.status import fleet_status

    h, fleet, orch = make(tmp_path)
    assert orch.rollout("R2", RolloutOptions(probe=False)).status == "succeeded"
    assert not any(n.unproven for n in fleet_status(fleet).nodes)  # type: ignore[arg-type]
    h.fail_rebuilds = {"node0"}
    assert again(fleet).rollback("R1", RolloutOptions(probe=False)).status == "failed"
    h.releases["node0"] = "R1"  # the rebuild had switched the node before it was killed
    status = fleet_status(fleet)  # type: ignore[arg-type]
    assert {n.name: n.unproven for n in status.nodes} == {"node0": True} | {n: False for n in NODES[1:]}
    assert status.to_dict()["nodes"][0]["unproven"] is True
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(status))
    assert "unproven: no passed gate on the release it runs" in console.export_text()
    h.fail_rebuilds = set()
    assert again(fleet).rollback("R1", RolloutOptions(probe=False)).status == "succeeded"
    assert not any(n.unproven for n in fleet_status(fleet).nodes)  # type: ignore[arg-type]
