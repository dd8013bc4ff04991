"""site: the local site's nodes; heat: its ephemeral Heat. Neither honours --cloud."""

from __future__ import annotations

import argparse

from rich.console import RenderableType

from imageupdate import api
from imageupdate.commands import render
from imageupdate.commands.spec import LOCAL, Arg, Command, Context, arg, seconds
from imageupdate.site.site import MAX_LOCK_WAIT


def warn_forced(ctx: Context, command: str, force: bool) -> None:
    """With --force, one warning line naming the open operation the command goes ahead against."""
    if force and (what := api.operation_open(**ctx.at)) is not None:
        path = api.open_site(**ctx.at).path
        ctx.out.warn(f"{what} on site {path}; '{command}' goes ahead (--force)")


def site_up(args: argparse.Namespace, ctx: Context) -> api.SiteView:
    with ctx.out.progress(f"bringing the site up in {api.open_site(**ctx.at).path}"):
        return api.site_up(args.nodes, args.release, args.kind, **ctx.at)


def site_down(args: argparse.Namespace, ctx: Context) -> api.SiteView:
    warn_forced(ctx, "site down", args.force)
    return api.site_down(args.force, **ctx.at)


def site_destroy(args: argparse.Namespace, ctx: Context) -> api.SiteDestroyed:
    warn_forced(ctx, "site destroy", args.force)
    return api.site_destroy(args.force, **ctx.at)


def site_rebuild(args: argparse.Namespace, ctx: Context) -> api.NodeView:
    if not args.by_heat:
        warn_forced(ctx, f"site rebuild {args.node} {args.release}", args.force)
    return api.site_rebuild(args.node, args.release, wait=args.wait_lock, force=args.force, by_heat=args.by_heat,
                            **ctx.at)


def heat_stop(args: argparse.Namespace, ctx: Context) -> api.HeatStopped:
    warn_forced(ctx, "heat stop", args.force)
    return api.heat_stop(args.force, **ctx.at)


def _heat_line(h: api.HeatInfo) -> str:
    return f"Heat {h.endpoint} (pid {h.pid})" if h.running else "Heat not running"


def _site_view(v: api.SiteView) -> RenderableType:
    return render.site_status(v.status)


def _force(breaks: str) -> Arg:
    return arg("--force", action="store_true", help=f"even while a rollout is running, paused or interrupted: {breaks}")


COMMANDS = [
    Command("site up", "create the site, or bring it back up", site_up, _site_view, honours=LOCAL, args=(
        arg("--nodes", type=int, metavar="N", help="number of nodes (new site)"),
        arg("--release", metavar="R", help="release the nodes start on (new site)"),
        arg("--kind", choices=["namespace", "vm"], default=None,
            help="new site: namespace nodes (default, fast) or vm nodes (QEMU booting each release's kernel; "
                 "releases built with --os imageupdate-debian-machine)"),
    )),
    Command("site status", "which node runs what", lambda a, c: api.site_status(**c.at), _site_view,
            honours=LOCAL),
    Command("site recover", "after a crash: finish or undo interrupted rebuilds",
            lambda a, c: api.site_recover(**c.at), lambda r: "\n".join(r.said) or "nothing to recover",
            honours=LOCAL),
    Command("site down", "stop every node and remove the network; state stays", site_down, _site_view,
            honours=LOCAL, args=(
                _force("its nodes and Heat stop under it (bring the site up, then 'imageupdate resume' or "
                       "'cancel')"),)),
    Command("site destroy", "site down, then delete the site directory", site_destroy,
            lambda d: f"destroyed {d.site}", honours=LOCAL, args=(
                _force("every node's state, snapshots and the history are deleted, and it can never be resumed "
                       "or cancelled"),)),
    Command("site rebuild", "rebuild one node from a release", site_rebuild,
            lambda v: render.node_line(v.status), honours=LOCAL, args=(
                arg("node"),
                arg("release"),
                arg("--wait-lock", type=seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for another operation on the node or site to finish (default: fail at "
                         f"once; at most {MAX_LOCK_WAIT:.0f})"),
                _force("the node changes under it, and the rollout then takes the node's release and state "
                       "migration as its own"),
                arg("--by-heat", action="store_true", help=argparse.SUPPRESS),  # the site's Heat, for the operation
            )),
    Command("heat start", "start it (or find it running)", lambda a, c: api.heat_start(**c.at), _heat_line,
            honours=LOCAL),
    Command("heat status", "is it running, where", lambda a, c: api.heat_status(**c.at), _heat_line,
            honours=LOCAL),
    Command("heat stop", "stop it; stacks stay in SITE/heat/heat.sqlite", heat_stop, lambda s: f"Heat: {s.how}",
            honours=LOCAL, args=(
                _force("its stack update stops half way ('imageupdate resume' restarts Heat and finishes it)"),)),
    Command("heat env", "shell exports for the openstack client, the site's Heat secret among them: "
            "eval \"$(imageupdate heat env)\"", lambda a, c: api.heat_env(**c.at),
            lambda e: "\n".join(f"export {k}={v}" for k, v in e.exports.items()), honours=LOCAL),
]
