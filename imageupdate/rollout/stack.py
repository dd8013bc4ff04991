"""The fleet's Heat stack: creating it from what the nodes run (adopt) and sending an operation's chain.
Used by the orchestrator and by ``cloud up``; the watch looks at it through ``rollout.view``."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

from imageupdate.base.crashpoints import crashpoint
from imageupdate.base.errors import OperationError
from imageupdate.heat import chain
from imageupdate.heat.client import HeatClient, HeatError, ResourceState, Stack
from imageupdate.history.db import History, RolloutRow

CLEANUP_SECONDS = 300  # what Heat may take per node beyond its gate (rebuild, replacing the gate)


def timeout_mins(nodes: int, gate_timeout: int) -> int:
    """The stack update's timeout: every node's gate and rebuild, one after the other, at least an hour."""
    return max(60, math.ceil(nodes * (gate_timeout + CLEANUP_SECONDS) / 60))


def wait_settled(client: HeatClient, stack_id: str, sleep: Callable[[float], None], poll: float) -> Stack:
    while True:
        stack = client.stack(stack_id)
        if stack is None:
            raise OperationError(f"stack {stack_id} disappeared", step="heat")
        if stack.status != "IN_PROGRESS":
            return stack
        sleep(poll)


def adopt(history: History, client: HeatClient, name: str, current: dict[str, str], options: dict[str, Any],
          environment: tuple[dict[str, str], dict[str, Any]], sleep: Callable[[float], None], poll: float,
          target: str | None = None, pid: int | None = None, timeout: int = 30) -> str:
    """Create the fleet's stack from the releases ``current`` (node -> release) as an ``adopt`` operation:
    every node passes as good on its release once the stack is complete."""
    nodes = list(current)
    row = history.start("adopt", target, {}, {"batches": [], "before": current, "after": current}, pid=pid)
    where = f" ({client.endpoint})"
    template = chain.render(chain.ChainSpec(nodes, current, [], row.tag, 1, options))
    files, env = environment
    try:
        stack_id = client.create(name, template, env, files, timeout_mins=timeout)
        stack = wait_settled(client, stack_id, sleep, poll)
    except OperationError as e:
        history.finish(row.id, "failed", e.message)
        raise
    if stack.status != "COMPLETE":
        history.finish(row.id, "failed", stack.reason)
        raise OperationError(f"creating the fleet's stack {name}{where} failed: {stack.reason}", step="adopt")
    for n in nodes:
        if history.last_good(n) is None:
            history.reached(n, current[n], row.id, good=True)
    history.finish(row.id, "succeeded")
    return stack_id


def kept_gates(resources: dict[str, ResourceState], nodes: list[str], changing: set[str]) -> dict[str, str]:
    """Gates of nodes this operation leaves alone that passed: the chain keeps them as they are."""
    keep: dict[str, str] = {}
    for name, res in resources.items():
        parsed = chain.parse_gate(name, nodes)
        if parsed and parsed[0] not in changing and res.state in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
            keep[parsed[0]] = name
    return keep


def send(client: HeatClient, history: History, stack_id: str, row: RolloutRow, nodes: list[str],
         gate_timeout: int, server_options: dict[str, Any], environment: tuple[dict[str, str], dict[str, Any]],
         pause_between_batches: bool, heat_instance: str) -> None:
    """Render the operation's chain and send it; the template and environment are recorded first, so a
    resume after a crash of Heat re-sends exactly these."""
    plan = row.plan
    changing = {n for b in plan["batches"] for n in b}
    keep = kept_gates(client.resources(stack_id), nodes, changing)
    spec = chain.ChainSpec(nodes, plan["after"], plan["batches"], row.tag, gate_timeout, server_options, keep,
                           client.template(stack_id))
    template = chain.render(spec)
    files, env = environment
    if pause_between_batches:
        env.setdefault("resource_registry", {})["resources"] = chain.pause_hooks(plan["batches"])
    history.update(row.id, template=template, environment={"environment": env, "files": files},
                   heat=heat_instance, sent=time.time())
    crashpoint("before-update", row.kind)
    client.update(stack_id, template, env, files, timeout_mins(len(changing), gate_timeout))


def resend(client: HeatClient, history: History, stack_id: str, row: RolloutRow, gate_timeout: int,
           heat_instance: str) -> bool:
    """Send again exactly what was sent (Heat restarted while it ran); False if nothing was recorded."""
    sent = history.sent(row.id)
    if sent is None:
        return False
    template, env = sent
    count = sum(len(b) for b in row.plan["batches"])
    client.update(stack_id, template, env["environment"], env["files"], timeout_mins(count, gate_timeout))
    history.update(row.id, heat=heat_instance, sent=time.time())
    return True


def reached_heat(client: HeatClient, stack_id: str, row: RolloutRow, nodes: list[str]) -> bool:
    """Whether Heat holds this operation's chain (its gates are in the stack, or an update runs)."""
    stack = client.stack(stack_id)
    if stack is not None and stack.status == "IN_PROGRESS":
        return True
    return any(g is not None and g[1] == row.tag for g in (chain.parse_gate(n, nodes)
                                                          for n in client.resources(stack_id)))


def refused(e: HeatError) -> bool:
    """Heat answered and refused the request (a 4xx): nothing of it reached the stack."""
    return bool(re.search(r"\b(400|403|404|409|413)\b|Bad Request|Invalid|Conflict", e.message))
