"""Run a gate's checks on nodes now, outside any rollout (``imageupdate check``): what an operator asks
after a manual change, or to see stale code on a node that has been running for a while."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from imageupdate.base.errors import InputError
from imageupdate.rollout.fleet import Fleet
from imageupdate.verify.checks import Verdict, verify_node


def check_nodes(fleet: Fleet, names: list[str] | None = None) -> list[Verdict]:
    """The verdict of every (named) node against the release it runs, in node order."""
    nodes = fleet.node_names()
    unknown = [n for n in names or [] if n not in nodes]
    if unknown:
        raise InputError(f"unknown nodes: {', '.join(unknown)} (nodes: {', '.join(nodes)})")
    chosen = [n for n in nodes if not names or n in names]
    states = fleet.states()
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(chosen)))) as pool:
        futures = [pool.submit(verify_node, fleet.target(n), fleet.expectation(states[n].release)) for n in chosen]
        return [f.result() for f in futures]
