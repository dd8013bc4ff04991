"""The orchestrator: a fleet's operations (rollout, rollback, resume, cancel), each checked before it opens.

One operation at a time per site (``RolloutLock``). An operation is a row in the history, open from its
first step to its last (status ``running`` or ``paused``); its tag names its gates in the stack. Its steps,
in order, each recorded as its ``stage``: ``planned``, ``rehearsing`` (the migrations on a copy of one
node's state), ``creating-resources`` (the operator's ``create`` hooks), ``sending`` (the chain goes to
Heat), ``watching`` (Heat rebuilds node after node; each gate runs the node's checks and is signalled
with the verdict), ``ended``. Nothing before ``sending`` touches a node: a failure there closes the
operation as failed, and ``resume`` after a crash there redoes every step that did not finish, in order.

A failed or timed-out gate fails the stack update and nothing further is touched; the touched nodes are
then rolled back by a forward update to the release each ran before (``policy``), gated the same way.
``cancel`` always ends the open operation: before any node was touched it just closes it; after, it fails
the next gate and rolls back (a cancelled rollback stops where it is and says what ``imageupdate rollback``
will finish).

This module refuses what cannot start (an unknown or untrusted release, an unknown node, a blocked upgrade
path, another open operation) before anything is written, plans the change and opens the operation. The
parts: ``drive`` (an open operation from its first unfinished step to its end, and the rollback a failed
rollout starts), ``recovery`` (resume and cancel of the open operation), ``policy`` (which nodes change and
where a rollback takes them), ``stack`` (adopt, send, look), ``watch`` (the stack watch and the gates),
``extras`` (resource hooks and the downtime probe), ``recording`` (rehearsal and state journal into the
history).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from imageupdate.base.errors import InputError, ReleaseNotFound, StoreError, UntrustedRelease
from imageupdate.rollout import policy, recovery
from imageupdate.rollout.drive import Driver
from imageupdate.rollout.extras import Extras
from imageupdate.rollout.fleet import Fleet
from imageupdate.rollout.lock import RolloutLock
from imageupdate.rollout.model import (
    CANCELLED,
    DEFAULT_GATE_TIMEOUT,
    HeatLost,
    NothingToResume,
    Outcome,
    RolloutEvent,
    RolloutInterrupted,
    RolloutOptions,
)
from imageupdate.rollout.path import check_fleet_config, plan_fleet, require_in_image
from imageupdate.rollout.watch import POLL
from imageupdate.upgrade import config
from imageupdate.verify.checks import Verdict, verify_node

# the operation's vocabulary, for callers that drive the orchestrator
__all__ = ["HeatLost", "NothingToResume", "Orchestrator", "Outcome", "RolloutEvent", "RolloutInterrupted",
           "RolloutOptions", "CANCELLED", "DEFAULT_GATE_TIMEOUT"]


class Orchestrator:
    """A fleet's operations; ``on_event`` hears every step as it is recorded."""

    def __init__(self, fleet: Fleet, on_event: Callable[[RolloutEvent], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, poll: float = POLL,
                 verify: Callable[..., Verdict] = verify_node) -> None:
        self.fleet = fleet
        self.history = fleet.history
        self.lock = RolloutLock(fleet.path)
        self.driver = Driver(fleet, self.lock, on_event or (lambda e: None), sleep, poll, verify)

    # public operations ---------------------------------------------------------------------------

    def rollout(self, release: str, opts: RolloutOptions) -> Outcome:
        opts.validate()
        self.fleet.store.require_trusted(release, self.fleet.path)  # not found, not signed: nothing started
        self.fleet.require_runnable(release)  # e.g. no kernel for a VM site: nothing started
        self._check_limit(opts)
        extras = Extras(self.fleet, self.history, self.driver.say, opts)  # BadHooksDir: bad input, nothing started
        self.fleet.require_up()
        with self.lock:
            self.lock.acquire()
            self._refuse_active()
            self.driver.discard_leftovers()
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
            stack_id = self.driver.ensure_stack(client)
            row = self.driver.start("rollout", release, None, opts, ch, upgrade)
            for f in findings:
                self.driver.say(row, None, "info", f"config {f}")
            return extras.end(self.driver.run(client, heat, stack_id, row, opts, extras, upgrade), opts)

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
        extras = Extras(self.fleet, self.history, self.driver.say, RolloutOptions())
        self.fleet.require_exists()  # stopped nodes are fine: bringing them back is a rollback's job
        with self.lock:
            self.lock.acquire()
            self._refuse_active()
            self.driver.discard_leftovers()
            client, heat = self.fleet.connect()
            stack_id = self.driver.ensure_stack(client)
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
            row = self.driver.start("rollback", to, parent, opts, ch, None)
            return self.driver.run(client, heat, stack_id, row, opts, extras)

    def resume(self) -> Outcome:
        """Continue the open operation (paused, or its process gone) from where it stopped."""
        return recovery.resume(self.driver)

    def cancel(self) -> Outcome | None:
        """End the open operation: close it if no node was touched, else fail its next gate and roll back
        what it touched (a rollout, unless it said not to); a cancelled rollback stops where it is. None
        when another process runs it: that process acts on the request at its next gate."""
        return recovery.cancel(self.driver)

    # checks before an operation opens ----------------------------------------------------------

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
