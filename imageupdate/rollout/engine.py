"""The orchestrator: plan a change of releases, send the chain to Heat, gate each node, roll back.

One operation at a time per site (``RolloutLock``). An operation is a row in the history; its tag names
its gates in the stack. The orchestrator sends the chain, then watches the stack: when a gate of its tag
waits, it runs the node's checks and signals SUCCESS or FAILURE with the verdict; Heat moves on only on
SUCCESS. A failed or timed-out gate fails the stack update and nothing further is touched; the touched
nodes are then rolled back by a forward update to their last good release, gated the same way
(DESIGN.md decision 2). Everything the orchestrator learns goes to the history as it happens, so
``resume`` can take over after a crash of imageupdate (re-attach) or of Heat (re-send the same template).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from imageupdate.crashpoints import crashpoint
from imageupdate.errors import InputError, OperationError
from imageupdate.heat import chain
from imageupdate.heat.client import HeatClient, HeatError
from imageupdate.history.db import RolloutRow
from imageupdate.rollout.fleet import Fleet, HeatHandle
from imageupdate.rollout.lock import RolloutLock
from imageupdate.rollout.path import FleetPlan, check_config, plan_fleet
from imageupdate.upgrade import config
from imageupdate.upgrade.plan import UpgradePlan
from imageupdate.verify.checks import CheckResult, Verdict, last_line, probe_check, verify_node
from imageupdate.verify.probe import DEFAULT_INTERVAL, Prober, endpoints_for
from imageupdate.verify.resources import DEFAULT_TIMEOUT as HOOK_TIMEOUT
from imageupdate.verify.resources import HookRun, ResourceHooks

POLL = 0.2  # seconds between looks at the stack
HEAT_LOST_AFTER = 15.0  # seconds of failing Heat calls before the watch gives up (resume takes over)
CANCELLED = "cancelled by operator"
DEFAULT_GATE_TIMEOUT = 600
STALE_AFTER = 10.0  # seconds a complete stack may lack this operation's gates before the watch gives up
SETTLE_AFTER_GATES = 300.0  # seconds Heat may go on cleaning up after the last gate passed


class RolloutInterrupted(InputError):
    """An earlier operation is paused or was interrupted: resume or cancel it first."""


class NothingToResume(InputError):
    pass


class HeatLost(OperationError):
    """Heat stopped answering while an operation ran; the operation stays open for ``resume``."""


@dataclass
class RolloutOptions:
    batch_size: int = 1
    canary: bool = False
    limit: list[str] | None = None
    pause_between_batches: bool = False
    gate_timeout: int = DEFAULT_GATE_TIMEOUT
    rollback: bool = True
    resources: str | None = None  # the operator's resource hooks directory
    keep_resources: bool = False
    hook_timeout: float = HOOK_TIMEOUT
    probe: bool = True
    probe_interval: float = DEFAULT_INTERVAL
    rehearse: bool = True  # run the state migrations on a copy of the first node's state before anything

    def validate(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.gate_timeout < 1:
            raise InputError(f"--gate-timeout must be at least 1 second, not {self.gate_timeout}")
        if self.hook_timeout <= 0:
            raise InputError(f"--hook-timeout must be above 0 seconds, not {self.hook_timeout:g}")
        if not 0.01 <= self.probe_interval <= 10:
            raise InputError(f"--probe-interval must be between 0.01 and 10 seconds, not {self.probe_interval:g}")


@dataclass(frozen=True)
class RolloutEvent:
    rollout: int
    node: str | None
    what: str  # plan | rebuild | rebuilt | checking | passed | failed | paused | finished | info
    message: str
    at: float = field(default_factory=time.time)


@dataclass
class Outcome:
    rollout: RolloutRow
    status: str  # succeeded | failed | rolled-back | paused | cancelled | nothing-to-do
    reason: str | None
    nodes: dict[str, str]  # the release each node runs at the end
    rollback: Outcome | None = None
    resources: str | None = None  # what became of the operator's resources, if there were hooks
    resources_ok: bool = True

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "paused", "nothing-to-do") and self.resources_ok

    def to_dict(self) -> dict[str, Any]:
        return {"rollout": self.rollout.to_dict(), "status": self.status, "reason": self.reason,
                "nodes": self.nodes, "rollback": self.rollback.to_dict() if self.rollback else None,
                "resources": self.resources}


@dataclass
class _Watch:
    """What one watch of the stack has seen so far."""

    paused: dict[str, str] = field(default_factory=dict)  # barrier -> the hook it waits on
    cleared: set[str] = field(default_factory=set)  # barriers whose pause this operation has cleared
    rebuilding: set[str] = field(default_factory=set)
    rebuilt: set[str] = field(default_factory=set)
    checking: dict[str, Future[Verdict]] = field(default_factory=dict)
    noapi: dict[str, Future[list[HookRun]]] = field(default_factory=dict)  # verify_noapi per node rebuilt
    noapi_skip: set[str] = field(default_factory=set)
    signalled: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    cancelling: bool = False
    cancel_sent: bool = False
    stale_looks: int = 0  # looks at a complete stack that lacks this operation's gates
    passed: set[str] = field(default_factory=set)
    all_passed_at: float | None = None  # when the last gate passed (Heat then cleans up what was replaced)
    failure: str | None = None
    # servers that had failed in an earlier operation: their FAILED is stale until Heat works on them again
    failed_before: set[str] = field(default_factory=set)
    prober: Prober | None = None  # the downtime probe: what it saw of a node during its gate is gate evidence


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
        self.hooks: ResourceHooks | None = None  # the operator's resource hooks for this operation

    # public operations ---------------------------------------------------------------------------

    def rollout(self, release: str, opts: RolloutOptions) -> Outcome:
        opts.validate()
        self.fleet.store.manifest(release)  # ReleaseNotFound: bad input, nothing started
        self._check_limit(opts)
        self.hooks = self._load_hooks(opts)  # BadHooksDir: bad input, nothing started
        self.fleet.require_up()
        with self.lock:
            self.lock.acquire()
            self._refuse_active()
            states = self.fleet.states()
            nodes = self.fleet.node_names()
            selected = set(opts.limit or nodes)
            before = {n: states[n].release for n in nodes}
            changing = [n for n in nodes if n in selected and before[n] != release]
            after = {n: (release if n in changing else before[n]) for n in nodes}
            upgrade = plan_fleet(self.fleet, release, changing)  # a downgrade or a blocked path: bad input
            findings = check_config(self.fleet, upgrade)
            config.raise_errors(findings)  # an option the path removes: bad input, nothing started
            client, heat = self.fleet.connect()
            stack_id = self._ensure_stack(client)
            published = self.fleet.publish(release) if changing else None
            outcome = self._operate(client, heat, stack_id, "rollout", release, None, opts, before, after, changing,
                                    upgrade, findings, published)
            return self._end_resources(outcome, opts)

    def rollback(self, to: str | None, opts: RolloutOptions) -> Outcome:
        """Undo the newest rollout (the nodes it touched go back to their last good release from before
        it), or with ``to`` roll every (``--limit``) node to that release."""
        opts.validate()
        self.hooks = None
        if to is not None:
            self.fleet.store.manifest(to)
        self._check_limit(opts)
        self.fleet.require_exists()  # stopped nodes are fine: bringing them back is a rollback's job
        with self.lock:
            self.lock.acquire()
            self._refuse_active()
            client, heat = self.fleet.connect()
            stack_id = self._ensure_stack(client)
            states = self.fleet.states()
            nodes = self.fleet.node_names()
            selected = set(opts.limit or nodes)
            before = {n: states[n].release for n in nodes}
            after = dict(before)
            parent = None
            if to is not None:
                after |= {n: to for n in nodes if n in selected}
            elif (undo := self.history.undoable()) is not None:
                parent = undo.id
                for n in self._touched(undo) & selected:
                    after[n] = self.history.last_good(n, before=undo.id) or undo.plan["before"][n]
            changing = [n for n in nodes if after[n] != before[n] or (n in selected and not states[n].running)]
            return self._operate(client, heat, stack_id, "rollback", to, parent, opts, before, after, changing)

    def resume(self) -> Outcome:
        row = self.history.active()
        if row is None:
            raise NothingToResume("nothing to resume: no rollout is paused or interrupted "
                                  f"(see 'imageupdate status --site {self.fleet.path}')")
        self.fleet.require_up()
        with self.lock:
            self.lock.acquire(row.id)
            row = self.history.active() or row
            client, heat = self.fleet.connect()
            stack = client.stack(self.fleet.stack_name)
            if stack is None:
                raise OperationError(f"the stack {self.fleet.stack_name} is gone; rollout {row.id} cannot resume",
                                     step="resume")
            opts = RolloutOptions(**row.options)
            self.hooks = self._load_hooks(opts)
            self.history.update(row.id, status="running", pid=os.getpid())
            self._say(row, None, "info", f"resuming {row.kind} {row.id} (was {row.status})")
            watch = _Watch()
            if row.status == "paused":
                self._find_pauses_all(client, stack.id, row, watch)
                for barrier, hook in watch.paused.items():
                    client.clear_hook(stack.id, barrier, hook)
                    self._say(row, None, "info", f"continuing: {barrier} may start")
                watch.cleared |= set(watch.paused)
                watch.paused.clear()
            else:
                nodes = self.fleet.node_names()
                gates = [chain.parse_gate(name, nodes) for name in client.resources(stack.id)]
                seen = any(g is not None and g[1] == row.tag for g in gates)
                heat_restarted = stack.status == "IN_PROGRESS" and row.heat != heat.instance
                sent = self.history.sent(row.id)
                if heat_restarted and sent is not None:
                    template, env = sent
                    self._say(row, None, "info", "Heat restarted since the update was sent: sending the same template")
                    client.update(stack.id, template, env["environment"], env["files"], self._timeout_mins(row, opts))
                    self.history.update(row.id, heat=heat.instance, sent=time.time())
                elif not seen and stack.status != "IN_PROGRESS":
                    self._say(row, None, "info", "the update never reached Heat: sending it")
                    self._send(client, heat, stack.id, row, opts)
            return self._end_resources(self._finish(client, heat, stack.id, self._reload(row), opts, watch), opts)

    def cancel(self) -> Outcome | None:
        """Stop the running, paused or interrupted operation; roll back what it touched (unless it said not to)."""
        row = self.history.active()
        if row is None:
            raise NothingToResume("nothing to cancel: no rollout is running, paused or interrupted in "
                                  f"{self.fleet.path}")
        self.history.update(row.id, cancel_requested=time.time())
        if self.lock.held_by_other():  # its owner sees the request at its next look and acts on it
            self._say(row, None, "info", "cancel requested; the running rollout stops at its next gate")
            return None
        with self.lock:
            self.lock.acquire(row.id)
            client, heat = self.fleet.connect()
            stack = client.stack(self.fleet.stack_name)
            opts = RolloutOptions(**row.options)
            self.hooks = self._load_hooks(opts)
            self.history.update(row.id, status="running", pid=os.getpid())
            if stack is not None and stack.status == "IN_PROGRESS" and row.status == "paused":
                self._say(row, None, "info", "cancelling the paused update")
                client.cancel_update(stack.id)
            return self._end_resources(
                self._finish(client, heat, stack.id if stack else "", self._reload(row), opts, _Watch()), opts)

    # planning and sending ------------------------------------------------------------------------

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

    def _ensure_stack(self, client: HeatClient) -> str:
        """The fleet's stack; created on first use from what the nodes run now (the 'adopt' operation)."""
        name = self.fleet.stack_name
        stack = client.stack(name)
        if stack is not None:
            return stack.id
        states = self.fleet.states()
        nodes = self.fleet.node_names()
        current = {n: states[n].release for n in nodes}
        row = self.history.start("adopt", None, {}, {"batches": [], "before": current, "after": current},
                                 pid=os.getpid())
        template = chain.render(chain.ChainSpec(nodes, current, [], row.tag, 1, self.fleet.server_options()))
        files, env = self.fleet.environment()
        stack_id = client.create(name, template, env, files, timeout_mins=30)
        self._say(row, None, "info", f"created stack {name} from the fleet as it runs")
        stack = self._wait_settled(client, stack_id)
        if stack.status != "COMPLETE":
            self.history.finish(row.id, "failed", stack.reason)
            raise OperationError(f"creating the fleet's stack {name} failed: {stack.reason}", step="adopt")
        for n in nodes:
            if self.history.last_good(n) is None:
                self.history.reached(n, current[n], row.id, good=True)
        self.history.finish(row.id, "succeeded")
        return stack_id

    def _wait_settled(self, client: HeatClient, stack_id: str) -> Any:
        while True:
            stack = client.stack(stack_id)
            if stack is None:
                raise OperationError(f"stack {stack_id} disappeared", step="heat")
            if stack.status != "IN_PROGRESS":
                return stack
            self.sleep(self.poll)

    def _operate(self, client: HeatClient, heat: HeatHandle, stack_id: str, kind: str, target: str | None,
                 parent: int | None, opts: RolloutOptions, before: dict[str, str], after: dict[str, str],
                 changing: list[str], upgrade: FleetPlan | None = None,
                 findings: list[config.Finding] | None = None, published: str | None = None) -> Outcome:
        batches = chain.batches(changing, opts.batch_size, opts.canary and kind == "rollout")
        plan: dict[str, Any] = {"batches": batches, "before": before, "after": after}
        if upgrade is not None and upgrade.migrates:
            plan["upgrade"] = upgrade.to_dict()
        row = self.history.start(kind, target, asdict(opts), plan, parent=parent, pid=os.getpid())
        self.lock.record(row.id)
        if not changing:
            said = (f"every selected node already runs {target}" if target
                    else "no node to roll back: every node runs its last good release")
            self.history.finish(row.id, "succeeded", said)
            self._say(row, None, "finished", f"nothing to do: {said}")
            return Outcome(self._reload(row), "nothing-to-do", said, after)
        self._say(row, None, "plan",
                  " | ".join(f"batch {k + 1}: {', '.join(b)}" for k, b in enumerate(plan["batches"])))
        for k, b in enumerate(plan["batches"]):
            for n in b:
                self.history.step(row.id, n, "rebuild", "pending", batch=k, from_release=before[n], to_release=after[n])
        if published:
            self._say(row, None, "info", published)
        for f in findings or []:
            self._say(row, None, "info", f"config {f}")
        if upgrade is not None and upgrade.migrates:
            for names, p in upgrade.groups():
                self._say(row, None, "plan", f"{', '.join(names)}: state {p.from_state} -> {p.to_state} through "
                          + ", ".join(f"{m.name} ({m.kind}, {m.release})" for m in p.steps))
            first = batches[0][0]
            if opts.rehearse and not self.fleet.can_rehearse:
                self._say(row, None, "info", "no rehearsal: this fleet's state lives on its servers (rehearse on a "
                          "local site with the same releases)")
            elif opts.rehearse and upgrade.nodes.get(first) is not None and upgrade.nodes[first].steps:
                failure = self._rehearse(row, first, upgrade.nodes[first])
                if failure is not None:
                    self.history.finish(row.id, "failed", failure)
                    self._say(row, None, "failed", f"{failure}; no node was touched")
                    return Outcome(self._reload(row), "failed", failure, self._nodes())
        if self.hooks is not None and kind == "rollout":
            failed = [r for r in self._hook_phase(row, "create", None, target) if not r.ok]
            if failed:
                reason = f"resource hook {failed[0].script} create failed: {_last_line(failed[0].output)}"
                self.history.finish(row.id, "failed", reason)
                self._say(row, None, "failed", f"{reason}; no node was touched")
                return Outcome(self._reload(row), "failed", reason, self._nodes())
        watch = _Watch()
        resources = client.resources(stack_id)
        watch.failed_before = {n for n in changing if (r := resources.get(chain.server_name(n))) is not None
                               and r.status == "FAILED"}
        self._send(client, heat, stack_id, row, opts)
        return self._finish(client, heat, stack_id, self._reload(row), opts, watch)

    def _send(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow,
              opts: RolloutOptions) -> None:
        nodes = self.fleet.node_names()
        plan = row.plan
        changing = {n for b in plan["batches"] for n in b}
        resources = client.resources(stack_id)
        keep: dict[str, str] = {}
        for name, res in resources.items():
            parsed = chain.parse_gate(name, nodes)
            if parsed and parsed[0] not in changing and res.state in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
                keep[parsed[0]] = name
        spec = chain.ChainSpec(nodes, plan["after"], plan["batches"], row.tag, opts.gate_timeout,
                               self.fleet.server_options(), keep, client.template(stack_id))
        template = chain.render(spec)
        files, env = self.fleet.environment()
        if opts.pause_between_batches:
            env.setdefault("resource_registry", {})["resources"] = chain.pause_hooks(plan["batches"])
        self.history.update(row.id, template=template, environment={"environment": env, "files": files},
                            heat=heat.instance, sent=time.time())
        crashpoint("before-update")
        client.update(stack_id, template, env, files, self._timeout_mins(row, opts))

    @staticmethod
    def _timeout_mins(row: RolloutRow, opts: RolloutOptions) -> int:
        count = sum(len(b) for b in row.plan["batches"])
        return max(60, math.ceil(count * (opts.gate_timeout + 300) / 60))

    # watching ------------------------------------------------------------------------------------

    def _finish(self, client: HeatClient, heat: HeatHandle, stack_id: str, row: RolloutRow,
                opts: RolloutOptions, watch: _Watch) -> Outcome:
        prober = watch.prober = self._start_probe(row, opts)
        try:
            result = self._watch(client, stack_id, row, opts, watch)
        finally:
            self._stop_probe(row, prober)
        if result == "paused":
            self.history.update(row.id, status="paused", pid=None)
            waiting = ", ".join(sorted(r.removeprefix("server_") for r in watch.paused))
            self._say(row, None, "paused", f"paused before {waiting}; continue with 'imageupdate resume', "
                                           "stop with 'imageupdate cancel'")
            return Outcome(self._reload(row), "paused", None, self._nodes())
        if result == "succeeded":
            self.history.finish(row.id, "succeeded")
            self._say(row, None, "finished", f"{row.kind} {row.id} succeeded")
            if row.kind == "rollback" and row.parent:
                self.history.update(row.parent, status="rolled-back")
            return Outcome(self._reload(row), "succeeded", None, self._nodes())
        status = "cancelled" if watch.cancelling else "failed"
        reason = watch.failure or "the stack update failed"
        self.history.finish(row.id, status, reason)
        self._say(row, None, "failed", f"{row.kind} {row.id} {status}: {reason}")
        rollback = None
        if row.kind == "rollout" and opts.rollback:
            rollback = self._rollback_after(client, heat, stack_id, row, opts)
            if rollback.status == "succeeded":
                status = "rolled-back" if status == "failed" else status
                self.history.update(row.id, status=status)
        elif row.kind == "rollout":
            touched = self._touched(row)
            self._say(row, None, "info", "--no-rollback: the fleet is left as it is for inspection ("
                      + ", ".join(f"{n} on {r}" for n, r in self._nodes().items() if n in touched)
                      + "); roll back with 'imageupdate rollback'")
        return Outcome(self._reload(row), status, reason, self._nodes(), rollback)

    def _rollback_after(self, client: HeatClient, heat: HeatHandle, stack_id: str, failed: RolloutRow,
                        opts: RolloutOptions) -> Outcome:
        nodes = self.fleet.node_names()
        states = self.fleet.states()
        before = {n: states[n].release for n in nodes}
        touched = self._touched(failed)
        after = {n: (self.history.last_good(n, before=failed.id) or failed.plan["before"][n]) if n in touched
                 else before[n] for n in nodes}
        # a node whose rebuild failed before its switch still runs (or, stopped, still is on) its old release,
        # but Heat holds the failed target for it and its state may be half migrated: it goes back through
        # the chain too, so its rebuild restores the state if a contract migration began
        changing = [n for n in nodes if n in touched and (after[n] != before[n] or not states[n].running)]
        # a short --gate-timeout may be what failed the rollout: the way back gets at least the default
        rb_opts = RolloutOptions(batch_size=opts.batch_size, gate_timeout=max(opts.gate_timeout, DEFAULT_GATE_TIMEOUT),
                                 rollback=False)
        self._say(failed, None, "info", "rolling back " + (", ".join(f"{n} to {after[n]}" for n in changing) or
                                                         "nothing: no node was changed"))
        return self._operate(client, heat, stack_id, "rollback", None, failed.id, rb_opts, before, after, changing)

    def _touched(self, row: RolloutRow) -> set[str]:
        """Nodes the operation started to rebuild (the failed one included)."""
        return {s.node for s in self.history.steps(row.id) if s.step == "rebuild" and s.status != "pending"}

    def _watch(self, client: HeatClient, stack_id: str, row: RolloutRow, opts: RolloutOptions,
               watch: _Watch) -> str:
        plan = row.plan
        batch_of = {n: k for k, b in enumerate(plan["batches"]) for n in b}
        # not a with-block: on an interrupt, checks still running must not hold the exit up
        pool = ThreadPoolExecutor(max_workers=max(2, min(32, 2 * opts.batch_size + 1)))
        try:
            while True:
                stack, resources = self._look(client, stack_id)
                if opts.pause_between_batches:
                    self._find_pauses(client, stack_id, row, resources, watch)
                if not watch.cancelling and self._cancel_requested(row):
                    watch.cancelling = True
                    watch.failure = CANCELLED
                    self._say(row, None, "info", "cancel requested: failing the next gate")
                now = time.time()
                for node, k in batch_of.items():
                    self._track_node(client, stack_id, row, node, k, resources, watch, pool, now)
                if self.hooks is not None and not watch.cancelling:
                    self._start_noapi(row, watch, pool)
                if watch.paused and opts.pause_between_batches and not watch.checking:
                    if not watch.cancelling:
                        return "paused"
                    if not watch.cancel_sent:
                        client.cancel_update(stack_id)
                        watch.cancel_sent = True
                if stack.status == "COMPLETE":
                    if len(watch.finished) == len(batch_of):
                        return "succeeded"
                    watch.stale_looks += 1
                    if watch.stale_looks * self.poll > STALE_AFTER:
                        missing = sorted(set(batch_of) - watch.finished)
                        raise OperationError(f"the stack is complete but the gates of {', '.join(missing)} for "
                                             f"{row.kind} {row.id} never ran; 'imageupdate resume' sends the "
                                             "update again", step="watch")
                if watch.passed and watch.passed == set(batch_of) and stack.status != "COMPLETE":
                    # every node passed its gate: what is left is Heat deleting what the chain replaced
                    watch.all_passed_at = watch.all_passed_at or time.time()
                    if stack.status == "FAILED" or time.time() - watch.all_passed_at > SETTLE_AFTER_GATES:
                        said = stack.reason if stack.status == "FAILED" else "still cleaning up"
                        self._say(row, None, "info", f"every node passed its gate; Heat after the last gate: "
                                                     f"{said} (the next operation cleans up again)")
                        return "succeeded"
                if stack.status == "FAILED":
                    for fut in watch.checking.values():
                        fut.cancel()
                    watch.failure = watch.failure or stack.reason
                    return "failed"
                self.sleep(self.poll)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _look(self, client: HeatClient, stack_id: str) -> tuple[Any, dict[str, Any]]:
        def once() -> tuple[Any, dict[str, Any]]:
            stack = client.stack(stack_id)
            if stack is None:
                raise OperationError(f"stack {stack_id} disappeared during the rollout", step="heat")
            return stack, client.resources(stack_id)

        try:
            return Retrying(stop=stop_after_delay(HEAT_LOST_AFTER), wait=wait_fixed(1.0), sleep=self.sleep,
                            retry=retry_if_exception_type(HeatError), reraise=True)(once)
        except HeatError as e:
            raise HeatLost(f"Heat stopped answering ({e.message}); the rollout stays open: "
                           "'imageupdate resume' restarts Heat and finishes it", step="heat") from None

    def _find_pauses(self, client: HeatClient, stack_id: str, row: RolloutRow, resources: dict[str, Any],
                     watch: _Watch) -> None:
        """Servers of the next batch held by their pre-update hook (``--pause-between-batches``). Heat says so
        only in an event ("UPDATE paused until Hook pre-update is cleared", the status still reads COMPLETE),
        and events of one second come in no reliable order, so: a pause event since this update was sent, on
        a server of a batch whose previous batch has passed and that has not started rebuilding."""
        batches = row.plan["batches"]
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(math.floor(row.sent or 0)))
        for k in range(1, len(batches)):
            if not set(batches[k - 1]) <= watch.finished:
                break
            for node in batches[k]:
                server = chain.server_name(node)
                res = resources.get(server)
                if server in watch.paused or server in watch.cleared or node in watch.rebuilt or res is None \
                        or res.status == "IN_PROGRESS" or node in watch.rebuilding:
                    continue
                for e in client.resource_events(stack_id, server):
                    m = re.search(r"paused until Hook (\S+) is cleared", e.reason)
                    if m and e.time.rstrip("Z") >= since:
                        watch.paused[server] = m.group(1)

    def _find_pauses_all(self, client: HeatClient, stack_id: str, row: RolloutRow, watch: _Watch) -> None:
        resources = client.resources(stack_id)
        for node in (n for b in row.plan["batches"] for n in b):
            gate = resources.get(chain.gate_name(node, row.tag))
            if gate is not None and gate.state == "CREATE_COMPLETE":
                watch.finished.add(node)
        self._find_pauses(client, stack_id, row, resources, watch)
        watch.finished.clear()

    def _track_node(self, client: HeatClient, stack_id: str, row: RolloutRow, node: str, batch: int,
                    resources: dict[str, Any], watch: _Watch, pool: ThreadPoolExecutor, now: float) -> None:
        release = row.plan["after"][node]
        server = resources.get(chain.server_name(node))
        gate_res = resources.get(chain.gate_name(node, row.tag))
        if gate_res is not None and gate_res.action == "INIT":  # listed from the template, not created yet
            gate_res = None
        if server is not None and server.status == "IN_PROGRESS":
            watch.failed_before.discard(node)
        if server is not None and server.status == "FAILED" and node in watch.failed_before:
            server = None  # the failure of an earlier operation; this one has not reached the node yet
        if server is not None and node not in watch.rebuilding and node not in watch.rebuilt \
                and server.status == "IN_PROGRESS":
            watch.rebuilding.add(node)
            self.history.step(row.id, node, "rebuild", "running", started=now)
            self._say(row, node, "rebuild", f"rebuilding {node} to {release}")
        if node not in watch.rebuilt and (gate_res is not None or (server is not None and server.status == "FAILED")):
            watch.rebuilt.add(node)
            self._record_state(row, node)
            if self.history.step_status(row.id, node, "rebuild") in ("succeeded", "failed"):
                pass  # recorded before a crash
            elif server is not None and server.status == "FAILED":
                said = _heat_reason(server.reason)
                self.history.step(row.id, node, "rebuild", "failed", finished=now, reason=said)
                self._say(row, node, "failed", said)
                watch.failure = watch.failure or said
            else:
                attrs = client.attributes(stack_id, chain.server_name(node))
                started = _float(attrs.get("rebuild_started")) or (None if node in watch.rebuilding else now)
                try:
                    phases = json.loads(attrs.get("phases") or "{}")
                except (TypeError, ValueError):
                    phases = {}
                self.history.step(row.id, node, "rebuild", "succeeded", started=started,
                                  finished=_float(attrs.get("rebuild_finished")) or now,
                                  data={"phases": phases} if phases else None)
                self._say(row, node, "rebuilt", f"{node} runs {release}")
        if gate_res is None or node in watch.finished:
            return
        gate = chain.gate_name(node, row.tag)
        if gate_res.state == "CREATE_IN_PROGRESS" and node not in watch.checking and node not in watch.signalled:
            self.history.step(row.id, node, "gate", "running", batch=batch, to_release=release, started=now)
            if watch.cancelling:
                client.signal(stack_id, chain.handle_name(gate), {"status": "FAILURE", "reason": CANCELLED,
                                                                  "id": node})
                watch.signalled.add(node)
                return
            self._say(row, node, "checking", f"checking {node}")
            watch.checking[node] = pool.submit(self._check_node, row, node, release, watch)
        fut = watch.checking.get(node)
        if fut is not None and fut.done():
            del watch.checking[node]
            verdict = fut.result()
            for r in verdict.results:
                self.history.check(row.id, node, r.name, r.ok, r.seconds, r.output)
            status = "SUCCESS" if verdict.ok and not watch.cancelling else "FAILURE"
            reason = verdict.reason if not watch.cancelling else CANCELLED
            data = {"checks": [{"name": r.name, "ok": r.ok, "seconds": r.seconds} for r in verdict.results],
                    "failed": [{"name": r.name, "why": _last_line(r.output)} for r in verdict.failed]}
            crashpoint("before-signal")
            client.signal(stack_id, chain.handle_name(gate), {"status": status, "reason": reason, "id": node,
                                                              "data": data})
            watch.signalled.add(node)
            self.history.step(row.id, node, "gate", "running", data=verdict.to_dict())
            self._say(row, node, "checked", verdict.reason)
            if status == "FAILURE":
                watch.failure = watch.failure or reason
        if gate_res.state == "CREATE_COMPLETE":
            watch.finished.add(node)
            watch.passed.add(node)
            if self.history.step_status(row.id, node, "gate") == "succeeded":
                return  # recorded before a crash; a resumed watch says nothing twice
            self.history.step(row.id, node, "gate", "succeeded", finished=now)
            self.history.reached(node, release, row.id, good=True)
            self._say(row, node, "passed", f"{node} passed its gate on {release}")
        elif gate_res.status == "FAILED":
            watch.finished.add(node)
            if self.history.step_status(row.id, node, "gate") in ("failed", "timed-out"):
                return
            timed_out = "timed out" in gate_res.reason.lower() or "timeout" in gate_res.reason.lower()
            self.history.step(row.id, node, "gate", "timed-out" if timed_out else "failed", finished=now,
                              reason=gate_res.reason)
            self.history.reached(node, release, row.id, good=False)
            if timed_out:
                watch.failure = watch.failure or f"gate of {node} timed out after {row.options.get('gate_timeout')} s"
            self._say(row, node, "failed", f"{node} failed its gate on {release}: {watch.failure or gate_res.reason}")

    def _rehearse(self, row: RolloutRow, node: str, upgrade: UpgradePlan) -> str | None:
        """The migration path on a copy of ``node``'s state; the reason it failed, or None."""
        self._say(row, node, "info", f"rehearsing the migrations on a copy of {node}'s state")
        began = time.time()
        report = self.fleet.rehearse(node, upgrade)
        summary = {k: getattr(report, k) for k in ("state_bytes", "copy_seconds", "prepare_seconds", "seconds")}
        self.history.migration(row.id, node, "rehearsal", began, ok=report.ok, seconds=report.seconds,
                               output=json.dumps(summary | {"problems": report.problems}))
        started = began + report.copy_seconds + report.prepare_seconds
        for s in report.steps:
            took = s.seconds + (s.rerun_seconds or 0.0)
            self.history.migration(row.id, node, "rehearsal", started, release=s.release, migration=s.migration,
                                   kind=s.kind, state_version=s.state_version, ok=s.ok and s.idempotent is not False,
                                   seconds=round(took, 3), output=s.output)
            started += took
        if not report.ok:
            return f"rehearsal failed: {report.problems[0]}"
        self._say(row, node, "info", f"rehearsal passed in {report.seconds:.2f} s: {len(report.steps)} step(s), each "
                  f"run twice on a copy of {report.state_bytes / 1e6:.1f} MB (copied in {report.copy_seconds:.2f} s, "
                  f"images unpacked in {report.prepare_seconds:.2f} s)")
        return None

    def _record_state(self, row: RolloutRow, node: str) -> None:
        """Copy what the node's rebuild did to its state (from the journal on its state partition) into the
        history, in time order: snapshots, migration steps, restores."""
        try:
            record = self.fleet.state_record(node)
        except (OSError, ValueError):
            return
        happened: list[tuple[float, Any]] = [(s.started, s) for s in record.steps if s.started >= row.started]
        happened += [(e["at"], e) for e in record.events
                     if e.get("at", 0) >= row.started and e.get("event") in ("snapshot", "restored")]
        for at, x in sorted(happened, key=lambda h: h[0]):
            if isinstance(x, dict):
                phase = "snapshot" if x["event"] == "snapshot" else "restore"
                took = (x.get("seconds") or 0.0) + (x.get("verify_seconds") or 0.0)  # a snapshot counts its read-back
                if not self.history.migration(row.id, node, phase, at, state_version=x.get("version"), ok=True,
                                              seconds=round(took, 3), output=json.dumps(x)):
                    continue
                if phase == "restore":
                    self._say(row, node, "info", f"restored the state snapshot at version {x['version']} because "
                              f"{x.get('because')} had run: changes made since the snapshot are gone")
                else:
                    self._say(row, node, "info", f"state snapshot at version {x['version']} taken and read back")
            elif self.history.migration(row.id, node, "migration", at, release=x.release, migration=x.migration,
                                        kind=x.kind, state_version=x.state_version, ok=x.ok,
                                        seconds=None if x.finished is None else round(x.finished - x.started, 3),
                                        output=x.output):
                how = {True: "done", False: "FAILED"}.get(x.ok, "interrupted")
                self._say(row, node, "info", f"migration {x.migration} ({x.kind}, from {x.release}) {how}: "
                          f"state version {x.state_version if x.ok else record.version}")

    def _check_node(self, row: RolloutRow, node: str, release: str, watch: _Watch) -> Verdict:
        """The gate's checks: built-ins and shipped tests, what the downtime probe saw of the node while they
        ran (a service down from the gate's start to its end fails it), then the resource hooks (verify_noapi,
        run while the node was rebuilt, and verify)."""
        prober = watch.prober
        since = prober.clock() if prober is not None else 0.0

        def hooks() -> list[CheckResult]:
            results: list[CheckResult] = []
            if prober is not None and (seen := probe_check(prober.probes.get(node), since, prober.clock())):
                results.append(seen)
            noapi = watch.noapi.get(node)
            if noapi is not None:
                results += [r.as_check() for r in noapi.result()]
            if self.hooks is not None:
                results += [r.as_check() for r in self._hook_phase(row, "verify", node, release)]
            return results
        try:
            return self.verify(self.fleet.target(node), self.fleet.expectation(release), extra=hooks)
        except Exception as e:  # noqa: BLE001 - fail closed: a check that cannot run fails the gate
            return Verdict(node, release, [CheckResult("checks", False, 0.0, f"the checks could not run: {e}")],
                           finished=time.time())

    def _start_noapi(self, row: RolloutRow, watch: _Watch, pool: ThreadPoolExecutor) -> None:
        """verify_noapi for each node of a batch as the batch begins (the first at once, the next when the
        one before has passed): it runs while Heat rebuilds the node and asks the rest of the fleet."""
        batches = row.plan["batches"]
        for k, batch in enumerate(batches):
            if k > 0 and not set(batches[k - 1]) <= watch.passed:
                break
            for node in batch:
                if node in watch.noapi or node in watch.noapi_skip or node in watch.finished:
                    continue
                if self.history.step_status(row.id, node, "gate") in ("succeeded", "failed", "timed-out"):
                    watch.noapi_skip.add(node)  # gated before a crash: resume does not run it again
                    continue
                watch.noapi[node] = pool.submit(self._hook_phase, row, "verify_noapi", node,
                                                row.plan["after"][node])

    def _load_hooks(self, opts: RolloutOptions) -> ResourceHooks | None:
        if opts.resources is None:
            return None
        nodes = " ".join(f"{n}={self.fleet.target(n).address}" for n in self.fleet.node_names())
        return ResourceHooks(Path(opts.resources), self.fleet.path / "resources" / "kv", opts.hook_timeout,
                             env={"IMAGEUPDATE_SITE": str(self.fleet.path), "IMAGEUPDATE_NODES": nodes,
                                  "IMAGEUPDATE_SSH_KEY": str(self.fleet.target(self.fleet.node_names()[0]).key)})

    def _hook_phase(self, row: RolloutRow, phase: str, node: str | None, release: str | None) -> list[HookRun]:
        assert self.hooks is not None
        env = {"IMAGEUPDATE_ROLLOUT": str(row.id), "IMAGEUPDATE_RELEASE": release or ""}
        if node is not None:
            env["IMAGEUPDATE_NODE_ADDRESS"] = self.fleet.target(node).address
        runs = self.hooks.run(phase, node, env)
        for r in runs:
            self.history.hook(row.id, r.script, r.phase, r.node, r.ok, r.started, r.seconds, r.output)
            if not r.ok:
                self._say(row, node, "info", f"resource hook {r.script} {phase}"
                          f"{' on ' + node if node else ''} failed: {_last_line(r.output)}")
        return runs

    def _end_resources(self, outcome: Outcome, opts: RolloutOptions) -> Outcome:
        """``destroy`` once the operation has ended (rolled back or not), unless the operator keeps them."""
        if self.hooks is None or outcome.status == "paused":
            return outcome
        row = outcome.rollout
        if row.kind == "rollback" and row.parent is not None:  # a resumed rollback: its rollout made them
            row = self.history.rollout(row.parent) or row
        ran = {h["phase"] for h in self.history.hooks(row.id)}
        if "create" not in ran or "destroy" in ran:
            return outcome
        if opts.keep_resources:
            outcome.resources = f"kept (--keep-resources); their data: {self.hooks.kv_root}"
            self._say(row, None, "info", f"resources {outcome.resources}")
            return outcome
        failed = [r for r in self._hook_phase(row, "destroy", None, row.target) if not r.ok]
        if failed:
            outcome.resources = f"destroy failed: {failed[0].script}: {_last_line(failed[0].output)}"
            outcome.resources_ok = False
            self._say(row, None, "failed", f"resources {outcome.resources}; their data stays in {self.hooks.kv_root}")
        else:
            self.hooks.forget()
            outcome.resources = "destroyed"
            self._say(row, None, "info", "resources destroyed")
        return outcome

    def _start_probe(self, row: RolloutRow, opts: RolloutOptions) -> Prober | None:
        if not opts.probe:
            return None
        endpoints = []
        for node in (n for b in row.plan["batches"] for n in b):
            release = row.plan["after"][node]
            ep = endpoints_for(self.fleet.store.manifest(release).services, node, self.fleet.target(node).address)
            if ep is not None:
                endpoints.append(ep)
        return Prober(endpoints, opts.probe_interval).start() if endpoints else None

    def _stop_probe(self, row: RolloutRow, prober: Prober | None) -> None:
        if prober is None:
            return
        started = prober.started or time.time()
        for probe in prober.stop().values():
            result = probe.to_dict()
            self.history.probe(row.id, result, started, time.time())
            if result["failures"]:
                self._say(row, probe.endpoint.node, "info",
                          f"{probe.endpoint.node} was down {result['downtime']:.2f} s "
                          f"({result['failures']} of {result['requests']} probes failed)")

    def _cancel_requested(self, row: RolloutRow) -> bool:
        fresh = self.history.rollout(row.id)
        return bool(fresh and fresh.cancel_requested)

    # helpers -------------------------------------------------------------------------------------

    def _reload(self, row: RolloutRow) -> RolloutRow:
        return self.history.rollout(row.id) or row

    def _nodes(self) -> dict[str, str]:
        return {n: s.release for n, s in self.fleet.states().items()}

    def _say(self, row: RolloutRow, node: str | None, what: str, message: str) -> None:
        self.history.say(row.id, message, node)
        self.on_event(RolloutEvent(row.id, node, what, message))


def _heat_reason(reason: str) -> str:
    """A resource's failure without Heat's "Error: resources.NAME: " wrapping."""
    return re.sub(r"^(\w+: )?resources\.[^:]+: ", "", reason)


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _last_line(text: str) -> str:
    return last_line(text, "no output")[:200]
