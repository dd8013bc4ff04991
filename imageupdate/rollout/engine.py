"""The orchestrator: the operations (rollout, rollback, resume, cancel) and their life from first step to last.

One operation at a time per site (``RolloutLock``). An operation is a row in the history, open from its
first step to its last (status ``running`` or ``paused``); its tag names its gates in the stack. Its steps,
in order, each recorded as its ``stage``: ``planned``, ``rehearsing`` (the migrations on a copy of one
node's state), ``creating-resources`` (the operator's ``create`` hooks), ``sending`` (the chain goes to
Heat), ``watching`` (Heat rebuilds node after node; each gate runs the node's checks and is signalled
with the verdict). Nothing before ``sending`` touches a node: a failure there closes the operation as
failed, and ``resume`` after a crash there redoes every step that did not finish, in order.

A failed or timed-out gate fails the stack update and nothing further is touched; the touched nodes are
then rolled back by a forward update to the release each ran before (``policy``), gated the same way
(DESIGN.md decision 2). ``cancel`` always ends the open operation: before any node was touched it just
closes it; after, it fails the next gate and rolls back (a cancelled rollback stops where it is and says
what ``imageupdate rollback`` will finish).

The parts: ``policy`` (which nodes change and where a rollback takes them), ``stack`` (adopt, send, look),
``watch`` (the stack watch and the gates), ``extras`` (resource hooks and the downtime probe),
``recording`` (rehearsal and state journal into the history).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from imageupdate.base.crashpoints import crashpoint
from imageupdate.base.errors import (
    ImageUpdateError,
    InputError,
    OperationError,
    ReleaseNotFound,
    StoreError,
    UntrustedRelease,
)
from imageupdate.heat import chain
from imageupdate.heat.client import HeatClient, HeatError
from imageupdate.history.db import RolloutRow
from imageupdate.rollout import policy, recording, stack
from imageupdate.rollout.extras import Extras
from imageupdate.rollout.fleet import Fleet, HeatHandle
from imageupdate.rollout.lock import RolloutLock
from imageupdate.rollout.model import (
    CANCELLED,
    DEFAULT_GATE_TIMEOUT,
    OPTIONS_VERSION,
    HeatLost,
    NothingToResume,
    Outcome,
    RolloutEvent,
    RolloutInterrupted,
    RolloutOptions,
)
from imageupdate.rollout.path import FleetPlan, check_fleet_config, plan_fleet, require_in_image
from imageupdate.rollout.watch import POLL, Watch, Watcher
from imageupdate.upgrade import config
from imageupdate.upgrade.rehearse import discard_leftovers
from imageupdate.verify.checks import Verdict, verify_node

__all__ = ["HeatLost", "NothingToResume", "Orchestrator", "Outcome", "RolloutEvent", "RolloutInterrupted",
           "RolloutOptions", "CANCELLED", "DEFAULT_GATE_TIMEOUT"]

BEFORE_HEAT = (None, "planned", "rehearsing", "creating-resources")  # stages in which no node was touched


class Orchestrator:
    def __init__(self, fleet: Fleet, on_event: Callable[[RolloutEvent], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, poll: float = POLL,
                 verify: Callable[..., Verdict] = verify_node) -> None:
        self.fleet = fleet
        self.history = fleet.history
        self.on_event = on_event or (lambda e: None)
        self.sleep = sleep
        self.poll = poll
        self.verify = verify
        self.lock = RolloutLock(fleet.path)

    # public operations ---------------------------------------------------------------------------

    def rollout(self, release: str, opts: RolloutOptions) -> Outcome:
        opts.validate()
        self.fleet.store.require_trusted(release, self.fleet.path)  # not found, not signed: nothing started
        self.fleet.require_runnable(release)  # e.g. no kernel for a VM site: nothing started
        self._check_limit(opts)
        extras = Extras(self.fleet, self.history, self._say, opts)  # BadHooksDir: bad input, nothing started
        self.fleet.require_up()
        with self.lock:
            self.lock.acquire()
            self._refuse_active()
            self._discard_leftovers()
            nodes = self.fleet.node_names()
            states = self.fleet.states()
            selected = set(opts.limit or nodes)
            unproven = policy.unproven(self.history, states) & selected  # not gated on what it runs
            ch = policy.change(states, nodes, {n: release for n in selected}, bring_back=unproven,
                               unproven=unproven)
            if opts.rollback:  # the way back must be usable too: say so now, not after a failed gate
                self._require_way_back(states, ch.changing)
            upgrade = plan_fleet(self.fleet, release, ch.changing)  # a downgrade or a blocked path: bad input
            if self.fleet.migrates_in_image:
                require_in_image(upgrade)  # a skip-level path its nodes cannot run themselves: bad input
            findings = check_fleet_config(self.fleet, upgrade)
            config.raise_errors(findings)  # an option the path removes: bad input, nothing started
            client, heat = self.fleet.connect()
            stack_id = self._ensure_stack(client)
            row = self._start("rollout", release, None, opts, ch, upgrade)
            for f in findings:
                self._say(row, None, "info", f"config {f}")
            return extras.end(self._run(client, heat, stack_id, row, opts, extras, upgrade), opts)

    def _require_way_back(self, states: dict[str, Any], nodes: list[str]) -> None:
        for back in sorted({states[n].release for n in nodes} - {"?", ""}):
            try:
                self.fleet.store.require_trusted(back, self.fleet.path)
            except (ReleaseNotFound, StoreError):
                continue  # gone or damaged: that is the rollback's own failure to report, as before
            except UntrustedRelease as e:
                raise UntrustedRelease(f"a failed gate would roll back to {back}, which the fleet would refuse: "
                                       f"{e.message}; or roll out with --no-rollback", release=back,
                                       step="signature") from None

    def rollback(self, to: str | None, opts: RolloutOptions) -> Outcome:
        """Undo the newest rollout (the nodes it touched go back to the release each ran before it), or with
        ``to`` roll every (``--limit``) node to that release."""
        opts.validate()
        if to is not None:
            self.fleet.store.require_trusted(to, self.fleet.path)
            self.fleet.require_runnable(to)
        self._check_limit(opts)
        extras = Extras(self.fleet, self.history, self._say, RolloutOptions())
        self.fleet.require_exists()  # stopped nodes are fine: bringing them back is a rollback's job
        with self.lock:
            self.lock.acquire()
            self._refuse_active()
            self._discard_leftovers()
            client, heat = self.fleet.connect()
            stack_id = self._ensure_stack(client)
            nodes = self.fleet.node_names()
            selected = set(opts.limit or nodes)
            parent = None
            targets: dict[str, str] = {}
            if to is not None:
                targets = {n: to for n in selected}
            elif (undo := self.history.undoable()) is not None:
                parent = undo.id
                targets = policy.rollback_targets(self.history, undo, selected)
            for release in sorted(set(targets.values())):  # a key revoked since: say so before any node moves
                self.fleet.store.require_trusted(release, self.fleet.path)
            states = self.fleet.states()
            ch = policy.change(states, nodes, targets, bring_back=selected,
                               unproven=policy.unproven(self.history, states))
            row = self._start("rollback", to, parent, opts, ch, None)
            return self._run(client, heat, stack_id, row, opts, extras)

    def resume(self) -> Outcome:
        row = self.history.active()
        if row is None:
            raise NothingToResume("nothing to resume: no operation is paused or interrupted "
                                  f"(see 'imageupdate status --site {self.fleet.path}')")
        # nodes may be down: a rebuild Heat started may still hold one, or was killed (the chain redoes it)
        self.fleet.require_exists()
        with self.lock:
            self.lock.acquire(row.id)
            row = self.history.active() or row
            self._discard_leftovers()
            opts = RolloutOptions.from_stored(row.options, row.options_version)
            extras = Extras(self.fleet, self.history, self._say, opts)
            client, heat = self.fleet.connect()
            found = client.stack(self.fleet.stack_name)
            if found is None:
                raise OperationError(f"the stack {self.fleet.stack_name} is gone; {row.kind} {row.id} cannot "
                                     "resume: 'imageupdate cancel' closes it", step="resume")
            self.history.update(row.id, status="running", pid=os.getpid())
            self._say(row, None, "info", f"resuming {row.kind} {row.id} (was {row.status}, at {row.stage or 'start'})")
            watch = Watch()
            if row.status == "paused":
                watcher = self._watcher(client, found.id, extras)
                watcher.find_pauses_all(row, watch)
                for barrier, hook in watch.paused.items():
                    client.clear_hook(found.id, barrier, hook)
                    self._say(row, None, "info", f"continuing: {barrier} may start")
                watch.cleared |= set(watch.paused)
                watch.paused.clear()
            elif row.stage in BEFORE_HEAT and (row.stage is not None or row.sent is None):
                self._say(row, None, "info", "no node was touched yet: redoing the steps that did not finish")
                upgrade = None
                if row.kind == "rollout" and row.target is not None and row.plan.get("upgrade"):
                    changing = [n for b in row.plan["batches"] for n in b]
                    upgrade = plan_fleet(self.fleet, row.target, changing)
                return extras.end(self._run(client, heat, found.id, self._reload(row), opts, extras, upgrade), opts)
            else:
                heat_restarted = found.status == "IN_PROGRESS" and row.heat != heat.instance
                if heat_restarted and self.history.sent(row.id) is not None:
                    self._say(row, None, "info", "Heat restarted since the update was sent: sending the same template")
                    stack.resend(client, self.history, found.id, row, opts.gate_timeout, heat.instance)
                elif not stack.reached_heat(client, found.id, row, self.fleet.node_names()):
                    self._say(row, None, "info", "the update never reached Heat: sending it")
                    self._send(client, heat, found.id, row, opts)
            return extras.end(self._finish(client, heat, found.id, self._reload(row), opts, extras, watch), opts)

    def cancel(self) -> Outcome | None:
        """End the open operation: close it if no node was touched, else fail its next gate and roll back
        what it touched (a rollout, unless it said not to); a cancelled rollback stops where it is."""
        row = self.history.active()
        if row is None:
            raise NothingToResume("nothing to cancel: no operation is running, paused or interrupted in "
                                  f"{self.fleet.path}")
        self.history.update(row.id, cancel_requested=time.time())
        if self.lock.held_by_other():  # its owner sees the request at its next look and acts on it
            self._say(row, None, "info", f"cancel requested; the running {row.kind} stops at its next gate")
            return None
        with self.lock:
            self.lock.acquire(row.id)
            row = self.history.active() or row
            self._discard_leftovers()
            opts = RolloutOptions.from_stored(row.options, row.options_version)
            try:
                extras = Extras(self.fleet, self.history, self._say, opts)
            except InputError as e:  # the hooks went away: cancel still ends the operation
                self._say(row, None, "info", f"resource hooks not run: {e}")
                extras = Extras(self.fleet, self.history, self._say, RolloutOptions())
            self.history.update(row.id, status="running", pid=os.getpid())
            if row.stage in BEFORE_HEAT and (row.stage is not None or row.sent is None):
                return extras.end(self._close_untouched(row, "cancelled", CANCELLED), opts)
            client, heat = self.fleet.connect()
            found = client.stack(self.fleet.stack_name)
            if found is None:
                return extras.end(self._close_untouched(row, "cancelled", f"{CANCELLED}; the fleet's stack "
                                                        f"{self.fleet.stack_name} is gone"), opts)
            if not policy.touched(self.history, row) \
                    and not stack.reached_heat(client, found.id, row, self.fleet.node_names()):
                return extras.end(self._close_untouched(row, "cancelled", CANCELLED), opts)
            if found.status == "IN_PROGRESS" and row.status == "paused":
                self._say(row, None, "info", "cancelling the paused update")
                client.cancel_update(found.id)
            elif found.status == "IN_PROGRESS" and row.heat != heat.instance and self.history.sent(row.id):
                # the engine that ran the update is gone: nothing moves until the update is sent again, and the
                # node it held must end on one release before the next gate fails and the way back starts
                self._say(row, None, "info", "Heat restarted since the update was sent: sending the same template; "
                                             "its next gate fails")
                stack.resend(client, self.history, found.id, row, opts.gate_timeout, heat.instance)
            watch = Watch(cancelling=True, failure=CANCELLED)
            return extras.end(self._finish(client, heat, found.id, self._reload(row), opts, extras, watch), opts)

    # starting and preparing ----------------------------------------------------------------------

    def _check_limit(self, opts: RolloutOptions) -> None:
        if opts.limit is None:
            return
        nodes = self.fleet.node_names()
        unknown = [n for n in opts.limit if n not in nodes]
        if unknown or not opts.limit:
            raise InputError(f"--limit names unknown nodes: {', '.join(unknown) or '(none given)'} "
                             f"(nodes: {', '.join(nodes)})")

    def _refuse_active(self) -> None:
        row = self.history.active()
        if row is None:
            return
        what = "is paused" if row.status == "paused" else f"was interrupted (process {row.pid} is gone)"
        raise RolloutInterrupted(f"{row.kind} {row.id} to {row.target or 'last good releases'} {what}; finish it "
                                 f"with 'imageupdate resume' or stop it with 'imageupdate cancel'")

    def _discard_leftovers(self) -> None:
        """What a killed rehearsal left (a copy of a node's private state) goes before anything else runs."""
        for gone in discard_leftovers(self.fleet.path / "upgrade" / "rehearsal"):
            self.history.say(None, f"removed what an interrupted rehearsal left: {gone}")

    def _ensure_stack(self, client: HeatClient) -> str:
        """The fleet's stack; created on first use from what the nodes run now (the 'adopt' operation)."""
        found = client.stack(self.fleet.stack_name)
        if found is not None:
            return found.id
        current = {n: s.release for n, s in self.fleet.states().items()}
        stack_id = stack.adopt(self.history, client, self.fleet.stack_name, current, self.fleet.server_options(),
                               self.fleet.environment(), self.sleep, self.poll, pid=os.getpid())
        self.history.say(None, f"created stack {self.fleet.stack_name} from the fleet as it runs")
        return stack_id

    def _start(self, kind: str, target: str | None, parent: int | None, opts: RolloutOptions,
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
            self._say(row, None, "plan", " | ".join(f"batch {k + 1}: {', '.join(b)}" for k, b in enumerate(batches)))
        if upgrade is not None and upgrade.migrates:
            for names, p in upgrade.groups():
                self._say(row, None, "plan", f"{', '.join(names)}: state {p.from_state} -> {p.to_state} through "
                          + ", ".join(f"{m.name} ({m.kind}, {m.release})" for m in p.steps))
        return row

    def _run(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow, opts: RolloutOptions,
             extras: Extras, upgrade: FleetPlan | None = None) -> Outcome:
        """From the first step not done to the end. Until the chain is in Heat no node is touched: whatever
        fails there closes the operation as failed (an interrupt too, then re-raised)."""
        if not row.plan["batches"]:
            said = (f"every selected node already runs {row.target}" if row.target
                    else "no node to roll back: every node runs its last good release")
            self.history.finish(row.id, "succeeded", said)
            self._say(row, None, "finished", f"nothing to do: {said}")
            return Outcome(self._reload(row), "nothing-to-do", said, row.plan["after"])
        watch = Watch()
        try:
            failure = self._prepare(client, heat, stack_id, row, opts, extras, upgrade, watch)
        except KeyboardInterrupt:
            self._close_untouched(row, "failed", "interrupted before any node was touched")
            raise
        except ImageUpdateError as e:
            failure = e.message
        except Exception as e:  # noqa: BLE001 - a bug before any node is touched must not leave it open
            failure = f"{type(e).__name__}: {e}"
        if failure is not None:
            return self._close_untouched(row, "failed", failure)
        return self._finish(client, heat, stack_id, self._reload(row), opts, extras, watch)

    def _prepare(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow, opts: RolloutOptions,
                 extras: Extras, upgrade: FleetPlan | None, watch: Watch) -> str | None:
        """Rehearsal, resource creation, publishing, sending: the reason one failed, or None once sent."""
        if upgrade is not None and upgrade.migrates and opts.rehearse:
            first = row.plan["batches"][0][0]
            if not self.fleet.can_rehearse:
                self._say(row, None, "info", "no rehearsal: this fleet's state lives on its machines' own disks "
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
                self._say(row, None, "info", published)
        resources = client.resources(stack_id)
        changing = [n for b in row.plan["batches"] for n in b]
        watch.failed_before = {n for n in changing if (r := resources.get(chain.server_name(n))) is not None
                               and r.status == "FAILED"}
        try:
            self._send(client, heat, stack_id, row, opts)
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

    def _send(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow,
              opts: RolloutOptions) -> None:
        self.history.update(row.id, stage="sending")
        stack.send(client, self.history, stack_id, row, self.fleet.node_names(), opts.gate_timeout,
                   self.fleet.server_options(), self.fleet.environment(), opts.pause_between_batches, heat.instance)
        self.history.update(row.id, stage="watching")

    def _rehearse(self, row: RolloutRow, node: str, upgrade: FleetPlan) -> str | None:
        """The migration path on a copy of ``node``'s state; the reason it failed, or None."""
        plan = upgrade.nodes[node]
        assert plan is not None
        self._say(row, node, "info", f"rehearsing the migrations on a copy of {node}'s state")
        began = time.time()
        report = self.fleet.rehearse(node, plan)
        recording.rehearsal(self.history, row, node, began, report)
        if not report.ok:
            return f"rehearsal failed: {report.problems[0]}"
        self._say(row, node, "info", f"rehearsal passed in {report.seconds:.2f} s: {len(report.steps)} step(s), each "
                  f"run twice on a copy of {report.state_bytes / 1e6:.1f} MB (copied in {report.copy_seconds:.2f} s, "
                  f"images unpacked in {report.prepare_seconds:.2f} s)")
        return None

    def _close_untouched(self, row: RolloutRow, status: str, reason: str) -> Outcome:
        """Close an operation that never reached a node: the fleet is as it was."""
        self.history.finish(row.id, status, reason)
        self.history.update(row.id, pid=None)
        self._say(row, None, "failed" if status == "failed" else "finished",
                  f"{row.kind} {row.id} {status}: {reason}; no node was touched")
        nxt = self._mixed_fleet(row, status) if row.kind == "rollback" else None
        return Outcome(self._reload(row), status, reason, self._nodes(), next=nxt)

    # watching and ending -------------------------------------------------------------------------

    def _watcher(self, client: HeatClient, stack_id: str, extras: Extras) -> Watcher:
        return Watcher(client, stack_id, self.fleet, self.history, extras, self.verify, self._say, self.sleep,
                       self.poll)

    def _finish(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow,
                opts: RolloutOptions, extras: Extras, watch: Watch) -> Outcome:
        prober = watch.prober = extras.start_probe(row, opts)
        try:
            result = self._watcher(client, stack_id, extras).run(row, opts, watch)
        finally:
            extras.stop_probe(row, prober)
        if result == "paused":
            self.history.update(row.id, status="paused", pid=None)
            waiting = ", ".join(sorted(r.removeprefix("server_") for r in watch.paused))
            self._say(row, None, "paused", f"paused before {waiting}; continue with 'imageupdate resume', "
                                           "stop with 'imageupdate cancel'")
            return Outcome(self._reload(row), "paused", None, self._nodes())
        if result == "succeeded":
            self.history.finish(row.id, "succeeded")
            self.history.update(row.id, stage="ended")
            self._say(row, None, "finished", f"{row.kind} {row.id} succeeded")
            if row.kind == "rollback" and row.parent:
                self.history.update(row.parent, status="rolled-back")
            return Outcome(self._reload(row), "succeeded", None, self._nodes())
        status = "cancelled" if watch.cancelling else "failed"
        reason = watch.failure or "the stack update failed"
        self.history.finish(row.id, status, reason)
        self.history.update(row.id, stage="ended")
        self._say(row, None, "failed", f"{row.kind} {row.id} {status}: {reason}")
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
            self._say(row, None, "info", "--no-rollback: the fleet is left as it is for inspection ("
                      + ", ".join(f"{n} on {r}" for n, r in self._nodes().items() if n in touched)
                      + "); roll back with 'imageupdate rollback'")
        else:
            nxt = self._mixed_fleet(row, status)
        return Outcome(self._reload(row), status, reason, self._nodes(), rollback, next=nxt)

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
        self._say(row, None, "info", said)
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
        self._say(failed, None, "info", "rolling back " + (", ".join(f"{n} to {ch.after[n]}" for n in ch.changing) or
                                                         "nothing: no node was changed"))
        row = self._start("rollback", None, failed.id, rb_opts, ch, None)
        return self._run(client, heat, stack_id, row, rb_opts, extras)

    # helpers -------------------------------------------------------------------------------------

    def _reload(self, row: RolloutRow) -> RolloutRow:
        return self.history.rollout(row.id) or row

    def _nodes(self) -> dict[str, str]:
        return {n: s.release for n, s in self.fleet.states().items()}

    def _say(self, row: RolloutRow, node: str | None, what: str, message: str) -> None:
        self.history.say(row.id, message, node)
        self.on_event(RolloutEvent(row.id, node, what, message))
