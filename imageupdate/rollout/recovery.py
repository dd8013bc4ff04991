"""Resume and cancel: picking up the open operation that a pause, an interrupt or a kill left behind.

Where the operation stopped decides what happens. Before the chain was sent (stage ``planned``,
``rehearsing`` or ``creating-resources``) no node was touched: ``resume`` redoes the steps that did not
finish, ``cancel`` just closes it. After, ``resume`` clears the pause hooks or sends the update again when
it never reached Heat or Heat restarted under it, then watches; ``cancel`` fails the next gate and lets
the driver roll back what the rollout touched (a cancelled rollback stops where it is).
"""

from __future__ import annotations

import os
import time

from imageupdate.base.errors import InputError, OperationError
from imageupdate.rollout import policy, stack
from imageupdate.rollout.drive import Driver
from imageupdate.rollout.extras import Extras
from imageupdate.rollout.model import CANCELLED, NothingToResume, Outcome, RolloutOptions
from imageupdate.rollout.path import plan_fleet
from imageupdate.rollout.watch import Watch

BEFORE_HEAT = (None, "planned", "rehearsing", "creating-resources")  # stages in which no node was touched


def resume(d: Driver) -> Outcome:
    """Continue the open operation from where it stopped."""
    history, fleet = d.history, d.fleet
    row = history.active()
    if row is None:
        raise NothingToResume("nothing to resume: no operation is paused or interrupted "
                              f"(see 'imageupdate status --site {fleet.path}')")
    # nodes may be down: a rebuild Heat started may still hold one, or was killed (the chain redoes it)
    fleet.require_exists()
    with d.lock:
        d.lock.acquire(row.id)
        row = history.active() or row
        d.discard_leftovers()
        opts = RolloutOptions.from_stored(row.options, row.options_version)
        extras = Extras(fleet, history, d.say, opts)
        client, heat = fleet.connect()
        found = client.stack(fleet.stack_name)
        if found is None:
            raise OperationError(f"the stack {fleet.stack_name} is gone; {row.kind} {row.id} cannot "
                                 "resume: 'imageupdate cancel' closes it", step="resume")
        history.update(row.id, status="running", pid=os.getpid())
        d.say(row, None, "info", f"resuming {row.kind} {row.id} (was {row.status}, at {row.stage or 'start'})")
        watch = Watch()
        if row.status == "paused":
            watcher = d.watcher(client, found.id, extras)
            watcher.find_pauses_all(row, watch)
            for barrier, hook in watch.paused.items():
                client.clear_hook(found.id, barrier, hook)
                d.say(row, None, "info", f"continuing: {barrier} may start")
            watch.cleared |= set(watch.paused)
            watch.paused.clear()
        elif row.stage in BEFORE_HEAT and (row.stage is not None or row.sent is None):
            d.say(row, None, "info", "no node was touched yet: redoing the steps that did not finish")
            upgrade = None
            if row.kind == "rollout" and row.target is not None and row.plan.get("upgrade"):
                changing = [n for b in row.plan["batches"] for n in b]
                upgrade = plan_fleet(fleet, row.target, changing)
            return extras.end(d.run(client, heat, found.id, d.reload(row), opts, extras, upgrade), opts)
        else:
            heat_restarted = found.status == "IN_PROGRESS" and row.heat != heat.instance
            if heat_restarted and history.sent(row.id) is not None:
                d.say(row, None, "info", "Heat restarted since the update was sent: sending the same template")
                stack.resend(client, history, found.id, row, opts.gate_timeout, heat.instance)
            elif not stack.reached_heat(client, found.id, row, fleet.node_names()):
                d.say(row, None, "info", "the update never reached Heat: sending it")
                d.send(client, heat, found.id, row, opts)
        return extras.end(d.finish(client, heat, found.id, d.reload(row), opts, extras, watch), opts)


def cancel(d: Driver) -> Outcome | None:
    """End the open operation: close it if no node was touched, else fail its next gate and roll back what it
    touched (a rollout, unless it said not to); a cancelled rollback stops where it is. None when another
    process runs the operation: it sees the request at its next look at the stack and acts on it."""
    history, fleet = d.history, d.fleet
    row = history.active()
    if row is None:
        raise NothingToResume("nothing to cancel: no operation is running, paused or interrupted in "
                              f"{fleet.path}")
    history.update(row.id, cancel_requested=time.time())
    if d.lock.held_by_other():
        d.say(row, None, "info", f"cancel requested; the running {row.kind} stops at its next gate")
        return None
    with d.lock:
        d.lock.acquire(row.id)
        row = history.active() or row
        d.discard_leftovers()
        opts = RolloutOptions.from_stored(row.options, row.options_version)
        try:
            extras = Extras(fleet, history, d.say, opts)
        except InputError as e:  # the hooks went away: cancel still ends the operation
            d.say(row, None, "info", f"resource hooks not run: {e}")
            extras = Extras(fleet, history, d.say, RolloutOptions())
        history.update(row.id, status="running", pid=os.getpid())
        if row.stage in BEFORE_HEAT and (row.stage is not None or row.sent is None):
            return extras.end(d.close_untouched(row, "cancelled", CANCELLED), opts)
        client, heat = fleet.connect()
        found = client.stack(fleet.stack_name)
        if found is None:
            return extras.end(d.close_untouched(row, "cancelled", f"{CANCELLED}; the fleet's stack "
                                                f"{fleet.stack_name} is gone"), opts)
        if not policy.touched(history, row) and not stack.reached_heat(client, found.id, row, fleet.node_names()):
            return extras.end(d.close_untouched(row, "cancelled", CANCELLED), opts)
        cancelled = False
        if found.status == "IN_PROGRESS" and row.status == "paused":
            d.say(row, None, "info", "cancelling the paused update")
            client.cancel_update(found.id)
            cancelled = True
        elif found.status == "IN_PROGRESS" and row.heat != heat.instance and history.sent(row.id):
            # the engine that ran the update is gone: nothing moves until the update is sent again, and the
            # node it held must end on one release before the next gate fails and the way back starts
            d.say(row, None, "info", "Heat restarted since the update was sent: sending the same template; "
                                     "its next gate fails")
            stack.resend(client, history, found.id, row, opts.gate_timeout, heat.instance)
        watch = Watch(cancelling=True, failure=CANCELLED, cancel_sent=cancelled)  # once: Heat refuses a second
        return extras.end(d.finish(client, heat, found.id, d.reload(row), opts, extras, watch), opts)
