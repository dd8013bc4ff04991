"""Before a rollout: plan (the upgrade path), rehearse (the migrations on a copy of a node's state, local site
only), check-config (config against the target release and every release before it)."""

from __future__ import annotations

from imageupdate import api
from imageupdate.commands import render
from imageupdate.commands.spec import FLEET, LOCAL, Command, arg

TO = arg("--to", required=True, metavar="R", help="target release")


def _config_failure(c: api.ConfigCheck) -> str | None:
    errors = c.errors
    if not errors:
        return None
    return f"{errors[0].source}: {errors[0].message}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


COMMANDS = [
    Command("plan", "the upgrade path to a release: the migrations each node's state goes through, in order",
            lambda a, c: api.plan(a.to, **c.at), lambda p: render.fleet_plan(p.plan, p.findings), honours=FLEET,
            args=(TO,)),
    Command("rehearse", "run the migration path to a release on a copy of a node's state, timed; nothing on the "
            "fleet changes", lambda a, c: api.rehearse(a.to, a.node, **c.at),
            lambda r: render.rehearsal(r.rehearsal, r.page), honours=LOCAL,
            failure=lambda r: None if r.ok else r.rehearsal.problems[0], args=(
                TO, arg("--node", metavar="NODE", help="whose state to copy (default: the first node that changes)"),
            )),
    Command("check-config", "check config against the target release and every release before it",
            lambda a, c: api.check_config(a.to, a.configs, a.from_release, **c.at),
            lambda r: render.config_findings(r.target, r.findings), honours=LOCAL, failure=_config_failure, args=(
                TO,
                arg("--from", dest="from_release", metavar="R",
                    help="the release the config was written for (default: what the site's nodes run)"),
                arg("configs", nargs="*", metavar="CONFIG", help="config files, matched by name to the release's "
                    "config files (default: each node's, from its state partition)"),
            )),
]
