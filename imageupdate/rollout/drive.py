"""Driving one open operation to its end: its history row and steps, the work before Heat, the watch, the ending.

An operation opened here (``Driver.start``) is a row in the history with one ``pending`` rebuild step per
node it changes. ``Driver.run`` takes it from its first unfinished step: rehearsal, the ``create`` hooks,
publishing, sending the chain. Nothing before the chain is in Heat touches a node, so a failure there
closes the operation as failed with the fleet as it was. ``Driver.finish`` watches the stack to its end and
records it; a rollout whose gate failed is followed by its rollback: a forward update to the release each
touched node ran before, gated like the rollout. Heat's own stack rollback is not used: it failed on the
convergence engine (``ResourcePropertiesData with id N not found``) and left the stack stuck.

The ``Orchestrator`` (``engine``) decides which operation to open and holds the site's lock around it;
``recovery`` picks an open operation up again after a pause or a kill. Both hand the row to this driver.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from imageupdate.base.crashpoints import crashpoint
from imageupdate.base.errors import ImageUpdateError
from imageupdate.heat import chain
from imageupdate.heat.client import HeatClient, HeatError
from imageupdate.history.db import RolloutRow
from imageupdate.rollout import policy, recording, stack
from imageupdate.rollout.extras import Extras
from imageupdate.rollout.fleet import Fleet, HeatHandle
from imageupdate.rollout.lock import RolloutLock
from imageupdate.rollout.model import DEFAULT_GATE_TIMEOUT, OPTIONS_VERSION, Outcome, RolloutEvent, RolloutOptions
from imageupdate.rollout.path import FleetPlan
from imageupdate.rollout.watch import Watch, Watcher
from imageupdate.upgrade.rehearse import discard_leftovers
from imageupdate.verify.checks import Verdict


class Driver:
    """What every operation shares: the fleet, its history, the site's lock, the event callback, the waits."""

    def __init__(self, fleet: Fleet, lock: RolloutLock, on_event: Callable[[RolloutEvent], None],
                 sleep: Callable[[float], None], poll: float, verify: Callable[..., Verdict]) -> None:
        self.fleet = fleet
        self.history = fleet.history
        self.lock = lock
        self.on_event = on_event
        self.sleep = sleep
        self.poll = poll
        self.verify = verify

    # before an operation opens -------------------------------------------------------------------

    def discard_leftovers(self) -> None:
        """What a killed rehearsal left (a copy of a node's private state) goes before anything else runs."""
        for gone in discard_leftovers(self.fleet.path / "upgrade" / "rehearsal"):
            self.history.say(None, f"removed what an interrupted rehearsal left: {gone}")

    def ensure_stack(self, client: HeatClient) -> str:
        """The fleet's stack; created on first use from what the nodes run now (the 'adopt' operation)."""
        found = client.stack(self.fleet.stack_name)
        if found is not None:
            return found.id
        current = {n: s.release for n, s in self.fleet.states().items()}
        stack_id = stack.adopt(self.history, client, self.fleet.stack_name, current, self.fleet.server_options(),
                               self.fleet.environment(), self.sleep, self.poll, pid=os.getpid())
        self.history.say(None, f"created stack {self.fleet.stack_name} from the fleet as it runs")
        return stack_id

    # opening and the steps before Heat -----------------------------------------------------------

    def start(self, kind: str, target: str | None, parent: int | None, opts: RolloutOptions,
              ch: policy.Change, upgrade: FleetPlan | None) -> RolloutRow:
        """The operation's history row: open from here on."""
        batches = chain.batches(ch.changing, opts.batch_size, opts.canary and kind == "rollout")
        plan: dict[str, object] = {"batches": batches, "before": ch.before, "after": ch.after}
        if upgrade is not None and upgrade.migrates:
            plan["upgrade"] = upgrade.to_dict()
        row = self.history.start(kind, target, opts.to_stored(), plan, parent=parent, pid=os.getpid(),
                                 stage="planned", options_version=OPTIONS_VERSION)
        self.lock.record(row.id)
        crashpoint("after-start", kind)
        for k, b in enumerate(batches):
            for n in b:
                self.history.step(row.id, n, "rebuild", "pending", batch=k, from_release=ch.before[n],
                                  to_release=ch.after[n])
        if batches:
            self.say(row, None, "plan", " | ".join(f"batch {k + 1}: {', '.join(b)}" for k, b in enumerate(batches)))
        if upgrade is not None and upgrade.migrates:
            for names, p in upgrade.groups():
                self.say(row, None, "plan", f"{', '.join(names)}: state {p.from_state} -> {p.to_state} through "
                         + ", ".join(f"{m.name} ({m.kind}, {m.release})" for m in p.steps))
        return row

    def run(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow, opts: RolloutOptions,
            extras: Extras, upgrade: FleetPlan | None = None) -> Outcome:
        """From the first step not done to the end. Until the chain is in Heat no node is touched: whatever
        fails there closes the operation as failed (an interrupt too, then re-raised)."""
        if not row.plan["batches"]:
            said = (f"every selected node already runs {row.target}" if row.target
                    else "no node to roll back: every node runs its last good release")
            self.history.finish(row.id, "succeeded", said)
            self.say(row, None, "finished", f"nothing to do: {said}")
            return Outcome(self.reload(row), "nothing-to-do", said, row.plan["after"])
        watch = Watch()
        try:
            failure = self._prepare(client, heat, stack_id, row, opts, extras, upgrade, watch)
        except KeyboardInterrupt:
            self.close_untouched(row, "failed", "interrupted before any node was touched")
            raise
        except ImageUpdateError as e:
            failure = e.message
        except Exception as e:  # noqa: BLE001 - a bug before any node is touched must not leave it open
            failure = f"{type(e).__name__}: {e}"
        if failure is not None:
            return self.close_untouched(row, "failed", failure)
        return self.finish(client, heat, stack_id, self.reload(row), opts, extras, watch)

    def _prepare(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow, opts: RolloutOptions,
                 extras: Extras, upgrade: FleetPlan | None, watch: Watch) -> str | None:
        """Rehearsal, resource creation, publishing, sending: the reason one failed, or None once sent."""
        if upgrade is not None and upgrade.migrates and opts.rehearse:
            first = row.plan["batches"][0][0]
            if not self.fleet.can_rehearse:
                self.say(row, None, "info", "no rehearsal: this fleet's state lives on its machines' own disks "
                         "(rehearse on a local site of namespace nodes with the same releases)")
            elif upgrade.nodes.get(first) is not None and upgrade.nodes[first].steps \
                    and not recording.rehearsed(self.history, row):
                self.history.update(row.id, stage="rehearsing")
                failure = self._rehearse(row, first, upgrade)
                if failure is not None:
                    return failure
        crashpoint("after-rehearsal", row.kind)
        self.history.update(row.id, stage="creating-resources")
        failure = extras.create(row)
        if failure is not None:
            return failure
        crashpoint("after-create-hooks", row.kind)
        if row.kind == "rollout" and row.target is not None:
            published = self.fleet.publish(row.target)
            if published:
                self.say(row, None, "info", published)
        resources = client.resources(stack_id)
        changing = [n for b in row.plan["batches"] for n in b]
        watch.failed_before = {n for n in changing if (r := resources.get(chain.server_name(n))) is not None
                               and r.status == "FAILED"}
        try:
            self.send(client, heat, stack_id, row, opts)
        except HeatError as e:
            if stack.refused(e) or not self._reached(client, stack_id, row):
                return f"Heat refused the update: {e.message}"
            raise
        return None

    def _reached(self, client: HeatClient, stack_id: str, row: RolloutRow) -> bool:
        """Whether a send that failed may still have reached Heat (Heat does not answer: assume it did)."""
        try:
            return stack.reached_heat(client, stack_id, row, self.fleet.node_names())
        except HeatError:
            return True

    def send(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow,
             opts: RolloutOptions) -> None:
        self.history.update(row.id, stage="sending")
        stack.send(client, self.history, stack_id, row, self.fleet.node_names(), opts.gate_timeout,
                   self.fleet.server_options(), self.fleet.environment(), opts.pause_between_batches, heat.instance)
        self.history.update(row.id, stage="watching")

    def _rehearse(self, row: RolloutRow, node: str, upgrade: FleetPlan) -> str | None:
        """The migration path on a copy of ``node``'s state; the reason it failed, or None."""
        plan = upgrade.nodes[node]
        assert plan is not None
        self.say(row, node, "info", f"rehearsing the migrations on a copy of {node}'s state")
        began = time.time()
        report = self.fleet.rehearse(node, plan)
        recording.rehearsal(self.history, row, node, began, report)
        if not report.ok:
            return f"rehearsal failed: {report.problems[0]}"
        self.say(row, node, "info", f"rehearsal passed in {report.seconds:.2f} s: {len(report.steps)} step(s), each "
                 f"run twice on a copy of {report.state_bytes / 1e6:.1f} MB (copied in {report.copy_seconds:.2f} s, "
                 f"images unpacked in {report.prepare_seconds:.2f} s)")
        return None

    def close_untouched(self, row: RolloutRow, status: str, reason: str) -> Outcome:
        """Close an operation that never reached a node: the fleet is as it was."""
        self.history.finish(row.id, status, reason)
        self.history.update(row.id, pid=None)
        self.say(row, None, "failed" if status == "failed" else "finished",
                 f"{row.kind} {row.id} {status}: {reason}; no node was touched")
        nxt = self._mixed_fleet(row, status) if row.kind == "rollback" else None
        return Outcome(self.reload(row), status, reason, self.nodes(), next=nxt)

    # watching and ending -------------------------------------------------------------------------

    def watcher(self, client: HeatClient, stack_id: str, extras: Extras) -> Watcher:
        return Watcher(client, stack_id, self.fleet, self.history, extras, self.verify, self.say, self.sleep,
                       self.poll)

    def finish(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow,
               opts: RolloutOptions, extras: Extras, watch: Watch) -> Outcome:
        """Watch the stack until the operation pauses or ends, record how, and roll back a failed rollout."""
        prober = watch.prober = extras.start_probe(row, opts)
        try:
            result = self.watcher(client, stack_id, extras).run(row, opts, watch)
        finally:
            extras.stop_probe(row, prober)
        if result == "paused":
            self.history.update(row.id, status="paused", pid=None)
            waiting = ", ".join(sorted(r.removeprefix("server_") for r in watch.paused))
            self.say(row, None, "paused", f"paused before {waiting}; continue with 'imageupdate resume', "
                                          "stop with 'imageupdate cancel'")
            return Outcome(self.reload(row), "paused", None, self.nodes())
        if result == "succeeded":
            self.history.finish(row.id, "succeeded")
            self.history.update(row.id, stage="ended")
            self.say(row, None, "finished", f"{row.kind} {row.id} succeeded")
            if row.kind == "rollback" and row.parent:
                self.history.update(row.parent, status="rolled-back")
            return Outcome(self.reload(row), "succeeded", None, self.nodes())
        status = "cancelled" if watch.cancelling else "failed"
        reason = watch.failure or "the stack update failed"
        self.history.finish(row.id, status, reason)
        self.history.update(row.id, stage="ended")
        self.say(row, None, "failed", f"{row.kind} {row.id} {status}: {reason}")
        rollback = None
        nxt = None
        if row.kind == "rollout" and opts.rollback:
            rollback = self._rollback_after(client, heat, stack_id, row, opts, extras)
            if rollback.status == "succeeded":
                status = "rolled-back" if status == "failed" else status
                self.history.update(row.id, status=status)
            elif rollback.status != "nothing-to-do":
                nxt = rollback.next
        elif row.kind == "rollout":
            touched = policy.touched(self.history, row)
            self.say(row, None, "info", "--no-rollback: the fleet is left as it is for inspection ("
                     + ", ".join(f"{n} on {r}" for n, r in self.nodes().items() if n in touched)
                     + "); roll back with 'imageupdate rollback'")
        else:
            nxt = self._mixed_fleet(row, status)
        return Outcome(self.reload(row), status, reason, self.nodes(), rollback, next=nxt)

    def _mixed_fleet(self, row: RolloutRow, status: str) -> str:
        """A rollback that ended early: where each of its nodes is and what finishes the way back."""
        states = self.fleet.states()
        nodes = {n: s.release for n, s in states.items()}
        gates = {s.node: s.status for s in self.history.steps(row.id) if s.step == "gate"}
        where = []
        for n in (m for b in row.plan["batches"] for m in b):
            gate = gates.get(n)
            said = f"{n} on {nodes.get(n)}"
            if n in states and states[n].unfinished:
                said = f"{n} stopped in a rebuild to {nodes.get(n)} that did not finish"
            elif n in states and not states[n].running:
                said = f"{n} stopped on {nodes.get(n)}"
            elif nodes.get(n) != row.plan["after"][n]:
                said += f" (not yet back on {row.plan['after'][n]})"
            elif gate != "succeeded":
                said += f" (gate {gate or 'not reached'})"
            where.append(said)
        what = ("'imageupdate rollback' finishes the way back" if status == "cancelled" else
                f"'imageupdate rollback' tries again once the cause is fixed (see 'imageupdate status --rollout "
                f"{row.id}')")
        said = f"{row.kind} {row.id} {status}, the fleet is left as it is: {', '.join(where)}; {what}"
        self.say(row, None, "info", said)
        return said

    def _rollback_after(self, client: HeatClient, heat: HeatHandle, stack_id: str, failed: RolloutRow,
                        opts: RolloutOptions, extras: Extras) -> Outcome:
        touched = policy.touched(self.history, failed)
        targets = {n: policy.way_back(self.history, failed, n) for n in touched}
        # a node whose rebuild failed before its switch still runs (or, stopped, still is on) its old release,
        # but Heat holds the failed target for it and its state may be half migrated: it goes back through
        # the chain too, so its rebuild restores the state if a contract migration began
        ch = policy.change(self.fleet.states(), self.fleet.node_names(), targets, bring_back=touched)
        # a short --gate-timeout may be what failed the rollout: the way back gets at least the default
        rb_opts = RolloutOptions(batch_size=opts.batch_size, gate_timeout=max(opts.gate_timeout, DEFAULT_GATE_TIMEOUT),
                                 rollback=False)
        self.say(failed, None, "info", "rolling back " + (", ".join(f"{n} to {ch.after[n]}" for n in ch.changing) or
                                                        "nothing: no node was changed"))
        row = self.start("rollback", None, failed.id, rb_opts, ch, None)
        return self.run(client, heat, stack_id, row, rb_opts, extras)

    # helpers -------------------------------------------------------------------------------------

    def reload(self, row: RolloutRow) -> RolloutRow:
        return self.history.rollout(row.id) or row

    def nodes(self) -> dict[str, str]:
        return {n: s.release for n, s in self.fleet.states().items()}

    def say(self, row: RolloutRow, node: str | None, what: str, message: str) -> None:
        self.history.say(row.id, message, node)
        self.on_event(RolloutEvent(row.id, node, what, message))
