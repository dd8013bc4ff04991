"""Watching the stack while Heat runs an operation's chain: when a gate of the operation waits, run the
node's checks and signal the verdict; record rebuilds, migrations and gates as they happen; decide when
the operation has succeeded, failed, paused or was cancelled.

The watch only reads the stack and signals gates: the ``HeatClient`` it is given can be a scripted one,
which is how its fault handling is tested without root (tests/unit/test_engine.py, against the scripted
Heat in tests/unit/fakeheat.py).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from imageupdate.base.crashpoints import crashpoint
from imageupdate.base.errors import OperationError
from imageupdate.heat import chain
from imageupdate.heat.client import HeatClient, HeatError, ResourceState
from imageupdate.history.db import History, RolloutRow
from imageupdate.rollout import recording
from imageupdate.rollout.extras import Extras, short
from imageupdate.rollout.fleet import Fleet
from imageupdate.rollout.model import CANCELLED, RolloutOptions
from imageupdate.rollout.stack import refused
from imageupdate.rollout.view import StackView
from imageupdate.verify.checks import CheckResult, Verdict, probe_check
from imageupdate.verify.probe import Prober
from imageupdate.verify.resources import HookRun

POLL = 0.2  # seconds between looks at the stack
STALE_AFTER = 10.0  # seconds a complete stack may lack this operation's gates before the watch gives up
SETTLE_AFTER_GATES = 300.0  # seconds Heat may go on cleaning up after the last gate passed
ENGINE_WENT_DOWN = re.compile(r"(Engine|Worker) went down during")

Say = Callable[[RolloutRow, "str | None", str, str], None]


@dataclass
class Watch:
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


class Watcher:
    def __init__(self, client: HeatClient, stack_id: str, fleet: Fleet, history: History, extras: Extras,
                 verify: Callable[..., Verdict], say: Say, sleep: Callable[[float], None], poll: float = POLL,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.stack_id = stack_id
        self.fleet = fleet
        self.history = history
        self.extras = extras
        self.verify = verify
        self.say = say
        self.sleep = sleep
        self.poll = poll
        self.clock = clock

    def run(self, row: RolloutRow, opts: RolloutOptions, watch: Watch) -> str:
        """Until the operation ends: ``succeeded``, ``failed`` (``watch.failure`` says why) or ``paused``."""
        plan = row.plan
        batch_of = {n: k for k, b in enumerate(plan["batches"]) for n in b}
        # not a with-block: on an interrupt, checks still running must not hold the exit up
        pool = ThreadPoolExecutor(max_workers=max(2, min(32, 2 * opts.batch_size + 1)))
        view = StackView(self.client, self.stack_id, self.sleep)
        try:
            while True:
                stack, resources = view.look()
                if opts.pause_between_batches:
                    self.find_pauses(row, resources, watch)
                if not watch.cancelling and self._cancel_requested(row):
                    watch.cancelling = True
                    watch.failure = CANCELLED
                    self.say(row, None, "info", "cancel requested: failing the next gate")
                now = self.clock()
                for node, k in batch_of.items():
                    self._track_node(row, node, k, resources, watch, pool, now)
                if watch.prober is not None:
                    watch.prober.focus(in_flight(plan["batches"], watch))
                if self.extras.hooks is not None and not watch.cancelling:
                    self._start_noapi(row, watch, pool)
                if watch.paused and opts.pause_between_batches and not watch.checking:
                    if not watch.cancelling:
                        return "paused"
                    if not watch.cancel_sent:
                        self._cancel(stack.status)
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
                    watch.all_passed_at = watch.all_passed_at or now
                    if stack.status == "FAILED" or now - watch.all_passed_at > SETTLE_AFTER_GATES:
                        said = stack.reason if stack.status == "FAILED" else "still cleaning up"
                        self.say(row, None, "info", f"every node passed its gate; Heat after the last gate: "
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

    def _cancel(self, status: str) -> None:
        """Cancel the update if it still runs. One that already stopped (a cancel sent before, Heat quick to
        act on it) is refused by Heat with a 400: that is the outcome asked for, not an error."""
        if status != "IN_PROGRESS":
            return
        try:
            self.client.cancel_update(self.stack_id)
        except HeatError as e:
            if not refused(e):
                raise

    def _cancel_requested(self, row: RolloutRow) -> bool:
        fresh = self.history.rollout(row.id)
        return bool(fresh and fresh.cancel_requested)

    # pauses (--pause-between-batches) --------------------------------------------------------------

    def find_pauses(self, row: RolloutRow, resources: dict[str, ResourceState], watch: Watch) -> None:
        """Servers of the next batch held by their pre-update hook. Heat says so only in an event ("UPDATE
        paused until Hook pre-update is cleared", the status still reads COMPLETE), and events of one second
        come in no reliable order, so: a pause event since this update was sent, on a server of a batch whose
        previous batch has passed and that has not started rebuilding."""
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
                for e in self.client.resource_events(self.stack_id, server):
                    m = re.search(r"paused until Hook (\S+) is cleared", e.reason)
                    if m and e.time.rstrip("Z") >= since:
                        watch.paused[server] = m.group(1)

    def find_pauses_all(self, row: RolloutRow, watch: Watch) -> None:
        resources = self.client.resources(self.stack_id)
        for node in (n for b in row.plan["batches"] for n in b):
            gate = resources.get(chain.gate_name(node, row.tag))
            if gate is not None and gate.state == "CREATE_COMPLETE":
                watch.finished.add(node)
        self.find_pauses(row, resources, watch)
        watch.finished.clear()

    # one node ------------------------------------------------------------------------------------

    def _track_node(self, row: RolloutRow, node: str, batch: int, resources: dict[str, ResourceState],
                    watch: Watch, pool: ThreadPoolExecutor, now: float) -> None:
        release = row.plan["after"][node]
        server = resources.get(chain.server_name(node))
        gate_res = resources.get(chain.gate_name(node, row.tag))
        if gate_res is not None and gate_res.action == "INIT":  # listed from the template, not created yet
            gate_res = None
        if server is not None and server.status == "FAILED" and ENGINE_WENT_DOWN.search(server.reason):
            # as for a gate: a restarted Heat fails what the dead engine held and, the template re-sent,
            # rebuilds it again (a rebuild is idempotent); not the rebuild's outcome
            server = None
        if server is not None and server.status == "IN_PROGRESS":
            watch.failed_before.discard(node)
        if server is not None and server.status == "FAILED" and node in watch.failed_before:
            server = None  # the failure of an earlier operation; this one has not reached the node yet
        if server is not None and node not in watch.rebuilding and node not in watch.rebuilt \
                and server.status == "IN_PROGRESS":
            watch.rebuilding.add(node)
            self.history.step(row.id, node, "rebuild", "running", started=now)
            self.say(row, node, "rebuild", f"rebuilding {node} to {release}")
        if node not in watch.rebuilt and (gate_res is not None or (server is not None and server.status == "FAILED")):
            watch.rebuilt.add(node)
            self._rebuilt(row, node, release, server, watch, now)
        if gate_res is None or node in watch.finished:
            return
        self._gate(row, node, batch, release, gate_res, watch, pool, now)

    def _rebuilt(self, row: RolloutRow, node: str, release: str, server: ResourceState | None, watch: Watch,
                 now: float) -> None:
        recording.node_state(self.history, self.fleet, row, node, self.say)
        if self.history.step_status(row.id, node, "rebuild") in ("succeeded", "failed"):
            return  # recorded before a crash
        if server is not None and server.status == "FAILED":
            said = _heat_reason(server.reason)
            self.history.step(row.id, node, "rebuild", "failed", finished=now, reason=said)
            self.say(row, node, "failed", said)
            watch.failure = watch.failure or said
            return
        attrs = self.client.attributes(self.stack_id, chain.server_name(node))
        started = _float(attrs.get("rebuild_started")) or (None if node in watch.rebuilding else now)
        try:
            phases = json.loads(attrs.get("phases") or "{}")
        except (TypeError, ValueError):
            phases = {}
        self.history.step(row.id, node, "rebuild", "succeeded", started=started,
                          finished=_float(attrs.get("rebuild_finished")) or now,
                          data={"phases": phases} if isinstance(phases, dict) and phases else None)
        self.say(row, node, "rebuilt", f"{node} runs {release}")

    def _gate(self, row: RolloutRow, node: str, batch: int, release: str, gate_res: ResourceState, watch: Watch,
              pool: ThreadPoolExecutor, now: float) -> None:
        gate = chain.gate_name(node, row.tag)
        if gate_res.state == "CREATE_IN_PROGRESS" and node not in watch.checking and node not in watch.signalled:
            self.history.step(row.id, node, "gate", "running", batch=batch, to_release=release, started=now)
            if watch.cancelling:
                self.client.signal(self.stack_id, chain.handle_name(gate),
                                   {"status": "FAILURE", "reason": CANCELLED, "id": node})
                watch.signalled.add(node)
                return
            self.say(row, node, "checking", f"checking {node}")
            watch.checking[node] = pool.submit(self.check_node, row, node, release, watch)
        fut = watch.checking.get(node)
        if fut is not None and fut.done():
            del watch.checking[node]
            self._signal(row, node, gate, fut.result(), watch)
        if gate_res.state == "CREATE_COMPLETE":
            watch.finished.add(node)
            watch.passed.add(node)
            if self.history.step_status(row.id, node, "gate") == "succeeded":
                return  # recorded before a crash; a resumed watch says nothing twice
            self.history.step(row.id, node, "gate", "succeeded", finished=now)
            self.history.reached(node, release, row.id, good=True)
            self.say(row, node, "passed", f"{node} passed its gate on {release}")
        elif gate_res.status == "FAILED" and ENGINE_WENT_DOWN.search(gate_res.reason):
            # a Heat that restarted fails what its dead engine held and, the same template re-sent, creates
            # the gate again: not a verdict (if the update stays failed, the stack's failure ends the watch)
            watch.checking.pop(node, None)
            watch.signalled.discard(node)
        elif gate_res.status == "FAILED":
            watch.finished.add(node)
            if self.history.step_status(row.id, node, "gate") in ("failed", "timed-out", "cancelled"):
                return
            reason = gate_res.reason.lower()
            timed_out = "timed out" in reason or "timeout" in reason
            cancelled = CANCELLED in gate_res.reason or (watch.cancelling and not timed_out)
            status = "cancelled" if cancelled else "timed-out" if timed_out else "failed"
            self.history.step(row.id, node, "gate", status, finished=now, reason=gate_res.reason)
            if not cancelled:  # a cancelled gate says nothing of the release
                self.history.reached(node, release, row.id, good=False)
            if timed_out:
                watch.failure = watch.failure or f"gate of {node} timed out after {row.options.get('gate_timeout')} s"
            self.say(row, node, "failed", f"{node} {'was stopped at' if cancelled else 'failed'} its gate on "
                                          f"{release}: {watch.failure or gate_res.reason}")

    def _signal(self, row: RolloutRow, node: str, gate: str, verdict: Verdict, watch: Watch) -> None:
        recording.node_state(self.history, self.fleet, row, node, self.say)  # a booted machine migrated itself
        for r in verdict.results:
            self.history.check(row.id, node, r.name, r.ok, r.seconds, r.output)
        status = "SUCCESS" if verdict.ok and not watch.cancelling else "FAILURE"
        reason = verdict.reason if not watch.cancelling else CANCELLED
        data = {"checks": [{"name": r.name, "ok": r.ok, "seconds": r.seconds} for r in verdict.results],
                "failed": [{"name": r.name, "why": short(r.output)} for r in verdict.failed]}
        crashpoint("before-signal", row.kind, node)
        self.client.signal(self.stack_id, chain.handle_name(gate), {"status": status, "reason": reason, "id": node,
                                                                     "data": data})
        watch.signalled.add(node)
        self.history.step(row.id, node, "gate", "running", data=verdict.to_dict())
        self.say(row, node, "checked", verdict.reason)
        if status == "FAILURE":
            watch.failure = watch.failure or reason

    def check_node(self, row: RolloutRow, node: str, release: str, watch: Watch) -> Verdict:
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
            if self.extras.hooks is not None:
                results += [r.as_check() for r in self.extras.phase(row, "verify", node, release)]
            return results
        try:
            started = time.time()
            why = self.fleet.wait_booted(node, max(10.0, float(row.options.get("gate_timeout") or 600) - 60.0))
            if why is not None:
                return Verdict(node, release, [CheckResult("boot", False, time.time() - started, why)],
                               finished=time.time())
            return self.verify(self.fleet.target(node), self.fleet.expectation(release), extra=hooks)
        except Exception as e:  # noqa: BLE001 - fail closed: a check that cannot run fails the gate
            return Verdict(node, release, [CheckResult("checks", False, 0.0, f"the checks could not run: {e}")],
                           finished=time.time())

    def _start_noapi(self, row: RolloutRow, watch: Watch, pool: ThreadPoolExecutor) -> None:
        """verify_noapi for each node of a batch as the batch begins (the first at once, the next when the
        one before has passed): it runs while Heat rebuilds the node and asks the rest of the fleet."""
        batches = row.plan["batches"]
        for k, batch in enumerate(batches):
            if k > 0 and not set(batches[k - 1]) <= watch.passed:
                break
            for node in batch:
                if node in watch.noapi or node in watch.noapi_skip or node in watch.finished:
                    continue
                if self.history.step_status(row.id, node, "gate") in ("succeeded", "failed", "timed-out",
                                                                       "cancelled"):
                    watch.noapi_skip.add(node)  # gated before a crash: resume does not run it again
                    continue
                watch.noapi[node] = pool.submit(self.extras.phase, row, "verify_noapi", node,
                                                row.plan["after"][node])


def in_flight(batches: list[list[str]], watch: Watch) -> set[str]:
    """The nodes Heat may be changing now: those of every batch whose previous batch has passed that have
    not ended their gate, and those whose checks still run."""
    nodes: set[str] = set(watch.checking)
    for k, batch in enumerate(batches):
        if k > 0 and not set(batches[k - 1]) <= watch.passed:
            break
        nodes.update(n for n in batch if n not in watch.finished)
    return nodes


def _heat_reason(reason: str) -> str:
    """A resource's failure without Heat's "Error: resources.NAME: " wrapping."""
    return re.sub(r"^(\w+: )?resources\.[^:]+: ", "", reason)


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
