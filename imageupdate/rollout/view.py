"""What the watch sees of the stack while an operation runs, at a cost that does not grow with the fleet.

Listing a stack's resources makes Heat load the whole stack and walk its dependency graph for every
resource: at 200 nodes one listing took 15 to 30 s of Heat's CPU, and the watch asked five times a
second. So the watch lists the resources once, then reads only the events that came after the newest
one it has seen (``marker``) and applies them, in Heat's order, to what it listed. A look costs the
stack's status and the events since the last look: a few rows, whatever the number of nodes.

A full listing is taken again when the marker is gone (Heat purges old events; it then answers with
every event from the oldest, or a 404), when the stack stops (an event committed behind the marker, as
several engines on MySQL can do, would otherwise never be read) and every ``resync`` seconds. What a
listing shows and events do not: resources the template declares that were never created (``INIT``) are
absent here; the watch treats both alike. Deletions are not applied: in an operation Heat deletes only
what the template dropped and what it replaced, after the replacement ran (same name, and for a failed
server the same physical id), and neither is what the watch follows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_fixed

from imageupdate.base.errors import OperationError
from imageupdate.heat.client import Event, HeatClient, HeatError, ResourceState, Stack, split_status
from imageupdate.rollout.model import HeatLost

HEAT_LOST_AFTER = 15.0  # seconds of failing Heat calls before a look gives up (resume takes over)
RESYNC = 60.0  # seconds between full listings of the resources


class StackView:
    def __init__(self, client: HeatClient, stack_id: str, sleep: Callable[[float], None],
                 clock: Callable[[], float] = time.monotonic, resync: float = RESYNC,
                 lost_after: float = HEAT_LOST_AFTER) -> None:
        self.client = client
        self.stack_id = stack_id
        self.sleep = sleep
        self.clock = clock
        self.resync = resync
        self.lost_after = lost_after
        self.resources: dict[str, ResourceState] = {}
        self.marker: str | None = None
        self.listed_at: float | None = None  # when the resources were last listed in full
        self.marker_time = ""  # when the marker's event happened (Heat's event_time)
        self._settled = False  # the last look saw the stack settled (not IN_PROGRESS)
        self.listings = 0  # full listings taken (for the benchmark and the tests)
        self.events_read = 0

    def look(self) -> tuple[Stack, dict[str, ResourceState]]:
        """The stack and its resources, retried while Heat does not answer (``HeatLost`` after
        ``lost_after``). The stack is read first, then what happened to the resources: a stack that says
        COMPLETE comes with every event that led to it."""
        try:
            # a bound on attempts too: with an injected sleep no time passes
            stop = stop_after_delay(self.lost_after) | stop_after_attempt(int(self.lost_after) + 1)
            return Retrying(stop=stop, wait=wait_fixed(1.0), sleep=self.sleep,
                            retry=retry_if_exception_type(HeatError), reraise=True)(self._once)
        except HeatError as e:
            raise HeatLost(f"Heat stopped answering ({e.message}); the operation stays open: "
                           "'imageupdate resume' restarts Heat and finishes it", step="heat") from None

    def _once(self) -> tuple[Stack, dict[str, ResourceState]]:
        stack = self.client.stack(self.stack_id)
        if stack is None:
            raise OperationError(f"stack {self.stack_id} disappeared during the rollout", step="heat")
        now = self.clock()
        settled = stack.status != "IN_PROGRESS"
        # a stack that stopped is listed once more: with several engines and MySQL an event can be committed
        # behind the marker (created_at is taken before the commit) and would never be read
        if self.listed_at is None or now - self.listed_at >= self.resync or (settled and not self._settled):
            self._list(now)
        else:
            try:
                events = self.client.events(self.stack_id, self.marker)
            except HeatError as e:
                if "not found" not in e.message.lower() and "404" not in e.message:
                    raise
                events = None
            # Heat answers a marker it no longer holds (purged) with every event from the oldest, or a 404
            if events is None or (self.marker_time and any(e.time < self.marker_time for e in events)):
                self._list(now)
            else:
                self._apply(stack, events)
        self._settled = settled
        return stack, dict(self.resources)

    def _list(self, now: float) -> None:
        # the marker first: an event that lands between the two calls is read again and changes nothing
        last = self.client.last_event(self.stack_id)
        self.resources = self.client.resources(self.stack_id)
        self.marker = last.id if last is not None else None
        self.marker_time = last.time if last is not None else ""
        self.listed_at = now
        self.listings += 1

    def _apply(self, stack: Stack, events: list[Event]) -> None:
        for e in events:
            self.marker, self.marker_time = e.id, e.time
            self.events_read += 1
            if e.resource == stack.name or (e.physical_id and e.physical_id == stack.id):
                continue  # the stack's own event: its status was read from the stack
            action, status = split_status(e.state)
            if action == "DELETE":
                # in an operation Heat deletes what its template dropped (gates of earlier operations) and
                # what it replaced, after the replacement ran (a failed server's old row has the same name
                # and id as the new one): neither is what the watch follows; the next listing drops them
                continue
            old = self.resources.get(e.resource)
            physical = e.physical_id or (old.physical_id if old is not None and action != "CREATE" else "")
            self.resources[e.resource] = ResourceState(e.resource, e.type or (old.type if old else ""), action,
                                                       status, e.reason, physical)
