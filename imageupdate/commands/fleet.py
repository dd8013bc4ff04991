"""The fleet operations (rollout, rollback, resume, cancel) and what can be asked of a fleet (status, check,
report); each on the local site or, with --cloud, on a cloud fleet."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import RenderableType

from imageupdate import api
from imageupdate.commands import render
from imageupdate.commands.spec import FLEET, Arg, Command, Context, arg, node_list, seconds
from imageupdate.rollout.model import RolloutOptions

DEFAULT = RolloutOptions()  # the library's defaults, which the options' defaults are


def _outcome_failure(o: api.Outcome | api.CancelRequested) -> str | None:
    return None if isinstance(o, api.CancelRequested) or o.ok else render.outcome_line(o)


def _outcome_view(o: api.Outcome | api.CancelRequested) -> RenderableType:
    if isinstance(o, api.CancelRequested):
        return "cancel requested; the running rollout stops at its next gate"
    return render.outcome(o)


def rollout(args: argparse.Namespace, ctx: Context) -> api.Outcome:
    resources = args.resources or os.environ.get("IMAGEUPDATE_RESOURCES")
    opts = RolloutOptions(batch_size=args.batch_size, canary=args.canary, limit=args.limit,
                          pause_between_batches=args.pause_between_batches, gate_timeout=args.gate_timeout,
                          rollback=not args.no_rollback,
                          resources=str(Path(resources).resolve()) if resources else None,
                          keep_resources=args.keep_resources, hook_timeout=args.hook_timeout,
                          probe=not args.no_probe, probe_interval=args.probe_interval, rehearse=not args.no_rehearse)
    return api.rollout(args.release, opts, on_event=ctx.out.event, **ctx.at)


def rollback(args: argparse.Namespace, ctx: Context) -> api.Outcome:
    opts = RolloutOptions(batch_size=args.batch_size, limit=args.limit, gate_timeout=args.gate_timeout)
    return api.rollback(args.to, opts, on_event=ctx.out.event, **ctx.at)


GATES: tuple[Arg, ...] = (
    arg("--batch-size", type=int, default=DEFAULT.batch_size, metavar="N",
        help=f"nodes rebuilt at once (default {DEFAULT.batch_size})"),
    arg("--limit", type=node_list, metavar="NODE,...", help="only these nodes"),
    arg("--gate-timeout", type=int, default=DEFAULT.gate_timeout, metavar="SECONDS",
        help=f"how long a node's gate waits for its checks (default {DEFAULT.gate_timeout})"),
)

COMMANDS = [
    Command("rollout", "roll a release onto the fleet node by node, gated by each node's checks", rollout,
            _outcome_view, honours=FLEET, failure=_outcome_failure, args=(
                arg("release"),
                *GATES,
                arg("--canary", action="store_true", help="a first batch of one node before the others"),
                arg("--pause-between-batches", action="store_true",
                    help="stop after each batch; continue with 'imageupdate resume'"),
                arg("--no-rollback", action="store_true", help="on failure leave the fleet as it is for inspection"),
                arg("--resources", metavar="DIR", default=None,
                    help="resource survival hooks: scripts run as SCRIPT create|verify_noapi|verify|destroy "
                         "(default: $IMAGEUPDATE_RESOURCES)"),
                arg("--keep-resources", action="store_true", help="do not run the hooks' destroy phase at the end"),
                arg("--hook-timeout", type=seconds, default=DEFAULT.hook_timeout, metavar="SECONDS",
                    help=f"bound on each hook run (default {DEFAULT.hook_timeout:g})"),
                arg("--no-probe", action="store_true", help="do not probe the workload for downtime"),
                arg("--probe-interval", type=seconds, default=DEFAULT.probe_interval, metavar="SECONDS",
                    help=f"seconds between probes of each node's workload (default {DEFAULT.probe_interval:g})"),
                arg("--no-rehearse", action="store_true",
                    help="skip the rehearsal of the state migrations on a copy of the first node's state"),
            )),
    Command("rollback", "return each node to its last good release (or every node to --to R)", rollback,
            _outcome_view, honours=FLEET, failure=_outcome_failure, args=(
                *GATES, arg("--to", metavar="R", help="roll every (--limit) node to this release"))),
    Command("resume", "finish a paused or interrupted rollout",
            lambda a, c: api.resume(on_event=c.out.event, **c.at), _outcome_view, honours=FLEET,
            failure=_outcome_failure),
    Command("cancel", "stop the current rollout and roll back what it touched",
            lambda a, c: api.cancel(on_event=c.out.event, **c.at), _outcome_view, honours=FLEET,
            failure=_outcome_failure),
    Command("status", "which node runs what, and what is going on",
            lambda a, c: api.status(a.rollout, **c.at), render.fleet_status, honours=FLEET, args=(
                arg("--rollout", type=int, metavar="ID", help="show this rollout's steps (default: the newest)"),)),
    Command("check", "run the gate's checks on nodes now, against the release each runs",
            lambda a, c: api.check(a.nodes, **c.at), lambda r: render.verdicts(r.verdicts), honours=FLEET,
            failure=lambda r: None if r.ok else (
                f"{len([v for v in r.verdicts if not v.ok])} of {len(r.verdicts)} nodes failed their checks: "
                f"{next(v for v in r.verdicts if not v.ok).reason}"),
            args=(arg("nodes", nargs="*", metavar="NODE", help="nodes to check (default: all)"),)),
    Command("report", "write an HTML page of a rollout: per node timeline, checks, downtime, rollback",
            lambda a, c: api.report(a.rollout, a.output, **c.at),
            lambda r: f"report of {r.data['rollout']['kind']} {r.data['rollout']['id']}: {r.page}", honours=FLEET,
            args=(arg("rollout", nargs="?", type=int, metavar="ROLLOUT", help="rollout id (default: the newest)"),
                  arg("--output", "-o", metavar="FILE", help="where to write the page (default: SITE/reports/)"))),
]

