"""The ``imageupdate`` command: parse arguments, call the library, print.

Exit codes: 0 success, 1 the operation failed, 2 bad input (nothing done).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from imageupdate import version
from imageupdate.base import locks
from imageupdate.base.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, ImageUpdateError, InputError, OperationError
from imageupdate.build.builder import Builder, BuildEvent, BuildRequest
from imageupdate.build.elements import DEFAULT_OS_ELEMENT
from imageupdate.cli import render
from imageupdate.cli.output import Output
from imageupdate.cloud.fleet import DEFAULT_ROOT as DEFAULT_CLOUD_ROOT
from imageupdate.cloud.fleet import CloudConfig, CloudFleet
from imageupdate.heat.service import HeatProcess
from imageupdate.images import signing
from imageupdate.images.store import ImageStore
from imageupdate.report.data import collect
from imageupdate.report.html import render_page, write_page
from imageupdate.rollout.check import check_nodes
from imageupdate.rollout.engine import Orchestrator, Outcome, RolloutOptions
from imageupdate.rollout.fleet import Fleet
from imageupdate.rollout.path import check_fleet_config, configs_between, plan_fleet, rehearse_fleet
from imageupdate.rollout.status import fleet_status
from imageupdate.site.fleet import LocalFleet
from imageupdate.site.guard import open_operation
from imageupdate.site.site import LocalSite, SiteStatus
from imageupdate.upgrade.catalog import catalog


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every bad input."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_BAD_INPUT, f"imageupdate: error: {message}; see '{self.prog} --help'\n")


def _seconds(text: str) -> float:
    """A number of seconds as an option: finite and not negative (argparse takes 'nan' and 'inf' as floats);
    each option's own upper bound is checked where it is used."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite, non-negative number of seconds")
    return value


def _common() -> _Parser:
    # SUPPRESS lets --json/--store stand before or after the subcommand.
    p = _Parser(add_help=False)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print one machine-readable JSON document")
    p.add_argument("--store", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                   help="image store (default: $IMAGEUPDATE_STORE, else for a site the store it was created "
                        "with, else /var/lib/imageupdate/images)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    site_opt = _Parser(add_help=False)
    site_opt.add_argument("--site", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                          help="site directory (default: $IMAGEUPDATE_SITE or /var/lib/imageupdate/site; with "
                               "--cloud, where the fleet's history is kept: /var/lib/imageupdate/clouds/NAME)")
    site_opt.add_argument("--cloud", default=argparse.SUPPRESS, metavar="NAME",
                          help="drive the fleet on this cloud of clouds.yaml instead of the local site "
                               "(default: $OS_CLOUD when set)")
    parser = _Parser(prog="imageupdate", parents=[common],
                     description="Image-based, immutable fleet updates through OpenStack Heat.")
    parser.add_argument("--version", action="version", version=f"imageupdate {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", parents=[common], help="build a release image with diskimage-builder")
    b.add_argument("release", help="release id, e.g. R1 or 2026.11.1")
    b.add_argument("--element", "-e", action="append", default=[], metavar="E",
                   help="element to include (repeatable)")
    b.add_argument("--elements-path", action="append", default=[], type=Path, metavar="DIR",
                   help="extra elements directory, searched after imageupdate's own (repeatable)")
    b.add_argument("--os", dest="os_element", default=DEFAULT_OS_ELEMENT, metavar="ELEMENT",
                   help=f"operating-system element (default: {DEFAULT_OS_ELEMENT})")
    b.add_argument("--force", action="store_true", help="replace an existing release")
    b.add_argument("--key", type=Path, metavar="FILE",
                   help="sign the release with this OpenSSH private key (default: $IMAGEUPDATE_SIGNING_KEY or "
                        f"{signing.DEFAULT_KEY}, made on first use)")
    b.set_defaults(func=cmd_build)

    images = sub.add_parser("images", parents=[common], help="inspect the image store")
    isub = images.add_subparsers(dest="images_command", required=True, parser_class=_Parser)
    isub.add_parser("list", parents=[common], help="list releases").set_defaults(func=cmd_list)
    for name, func, text in (
        ("show", cmd_show, "show a release's manifest"),
        ("delete", cmd_delete, "delete a release"),
    ):
        p = isub.add_parser(name, parents=[common], help=text)
        p.add_argument("release")
        p.set_defaults(func=func)
    v = isub.add_parser("verify", parents=[common, site_opt],
                        help="recompute a release's checksums and check its signature (against the keys the "
                             "site, or --cloud fleet, trusts)")
    v.add_argument("release")
    v.set_defaults(func=cmd_verify)
    sg = isub.add_parser("sign", parents=[common, site_opt],
                         help="sign again a release the site (or --cloud fleet) trusts, with another key (rotation)")
    sg.add_argument("release")
    sg.add_argument("--key", type=Path, metavar="FILE",
                    help=f"OpenSSH private key (default: $IMAGEUPDATE_SIGNING_KEY or {signing.DEFAULT_KEY})")
    sg.add_argument("--adopt", action="store_true",
                    help="sign a release that has no signature at all (built before imageupdate signed releases); "
                         "its checksums are checked, its origin is yours to vouch for")
    sg.set_defaults(func=cmd_sign)
    _add_key_commands(sub, common, site_opt)
    site = sub.add_parser("site", parents=[common], help="the local site: a fleet of namespace nodes")
    ssub = site.add_subparsers(dest="site_command", required=True, parser_class=_Parser)
    up = ssub.add_parser("up", parents=[common, site_opt], help="create the site, or bring it back up")
    up.add_argument("--nodes", type=int, metavar="N", help="number of nodes (new site)")
    up.add_argument("--release", metavar="R", help="release the nodes start on (new site)")
    up.add_argument("--kind", choices=["namespace", "vm"], default=None,
                    help="new site: namespace nodes (default, fast) or vm nodes (QEMU booting each release's "
                         "kernel; releases built with --os imageupdate-debian-machine)")
    up.set_defaults(func=cmd_site_up)
    for name, func, text in (
        ("status", cmd_site_status, "which node runs what"),
        ("recover", cmd_site_recover, "after a crash: finish or undo interrupted rebuilds"),
    ):
        ssub.add_parser(name, parents=[common, site_opt], help=text).set_defaults(func=func)
    down = ssub.add_parser("down", parents=[common, site_opt],
                           help="stop every node and remove the network; state stays")
    down.add_argument("--force", action="store_true",
                      help="even while a rollout is running, paused or interrupted: its nodes and Heat stop "
                           "under it (bring the site up, then 'imageupdate resume' or 'cancel')")
    down.set_defaults(func=cmd_site_down)
    destroy = ssub.add_parser("destroy", parents=[common, site_opt], help="site down, then delete the site directory")
    destroy.add_argument("--force", action="store_true",
                         help="even while a rollout is running, paused or interrupted: every node's state, "
                              "snapshots and the history are deleted, and it can never be resumed or cancelled")
    destroy.set_defaults(func=cmd_site_destroy)
    rb = ssub.add_parser("rebuild", parents=[common, site_opt], help="rebuild one node from a release")
    rb.add_argument("node")
    rb.add_argument("release")
    rb.add_argument("--wait-lock", type=_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for another operation on the node or site to finish (default: fail at once)")
    rb.add_argument("--force", action="store_true",
                    help="even while a rollout is running, paused or interrupted: the node changes under it, "
                         "and the rollout then takes the node's release and state migration as its own")
    rb.add_argument("--by-heat", action="store_true", help=argparse.SUPPRESS)  # the site's Heat, for the operation
    rb.set_defaults(func=cmd_site_rebuild)

    _add_rollout_commands(sub, common, site_opt)
    cloud = sub.add_parser("cloud", parents=[common], help="a fleet of Nova servers on a cloud of clouds.yaml")
    csub = cloud.add_subparsers(dest="cloud_command", required=True, parser_class=_Parser)
    cu = csub.add_parser("up", parents=[common, site_opt],
                         help="create the fleet's Heat stack: N servers on a release (uploaded to Glance)")
    cu.add_argument("--nodes", type=int, required=True, metavar="N")
    cu.add_argument("--release", required=True, metavar="R")
    cu.add_argument("--flavor", required=True, help="Nova flavor, with an ephemeral disk for the state")
    cu.add_argument("--ssh-key", required=True, metavar="FILE", help="private key the servers accept (as root)")
    cu.add_argument("--key-name", help="Nova key pair to inject")
    cu.add_argument("--network", help="Neutron network name or id, or 'none' (default: the cloud's default)")
    cu.add_argument("--ssh-user", default="root")
    cu.add_argument("--stack", help="stack name (default imageupdate-CLOUD)")
    cu.add_argument("--prefix", default="node", help="server names: PREFIX0, PREFIX1, ... (default node)")
    cu.set_defaults(func=cmd_cloud_up)
    fk = csub.add_parser("forget-host-key", parents=[common, site_opt],
                         help="drop a server's pinned SSH host key (a server replaced on purpose); the next "
                              "connection learns it again from the server's console")
    fk.add_argument("node")
    fk.set_defaults(func=cmd_cloud_forget_host_key)

    d = isub.add_parser("diff", parents=[common], help="compare two releases")
    d.add_argument("old")
    d.add_argument("new")
    d.set_defaults(func=cmd_diff)
    return parser


def _add_key_commands(sub: Any, common: _Parser, site_opt: _Parser) -> None:
    keys = sub.add_parser("keys", parents=[common], help="release signing keys: yours, and those a fleet trusts")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    kc = ksub.add_parser("create", parents=[common], help="make a signing key (ed25519, OpenSSH format)")
    kc.add_argument("--key", type=Path, metavar="FILE",
                    help=f"where (default: $IMAGEUPDATE_SIGNING_KEY or {signing.DEFAULT_KEY}); FILE.pub beside it")
    kc.set_defaults(func=cmd_keys_create)
    ksub.add_parser("list", parents=[common, site_opt],
                    help="the keys whose releases the site (or --cloud fleet) accepts").set_defaults(func=cmd_keys_list)
    kt = ksub.add_parser("trust", parents=[common, site_opt], help="accept releases signed by this key")
    kt.add_argument("public_key", type=Path, metavar="KEY.pub")
    kt.add_argument("--name", default=None, help="a name for it (default: the file's name without .pub)")
    kt.set_defaults(func=cmd_keys_trust)
    kr = ksub.add_parser("revoke", parents=[common, site_opt], help="stop accepting releases signed by a key")
    kr.add_argument("key", metavar="NAME|FINGERPRINT")
    kr.set_defaults(func=cmd_keys_revoke)


def _node_list(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _add_rollout_commands(sub: Any, common: _Parser, site_opt: _Parser) -> None:
    gates = _Parser(add_help=False)
    gates.add_argument("--batch-size", type=int, default=1, metavar="N", help="nodes rebuilt at once (default 1)")
    gates.add_argument("--limit", type=_node_list, metavar="NODE,...", help="only these nodes")
    gates.add_argument("--gate-timeout", type=int, default=600, metavar="SECONDS",
                       help="how long a node's gate waits for its checks (default 600)")
    r = sub.add_parser("rollout", parents=[common, site_opt, gates],
                       help="roll a release onto the fleet node by node, gated by each node's checks")
    r.add_argument("release")
    r.add_argument("--canary", action="store_true", help="a first batch of one node before the others")
    r.add_argument("--pause-between-batches", action="store_true",
                   help="stop after each batch; continue with 'imageupdate resume'")
    r.add_argument("--no-rollback", action="store_true",
                   help="on failure leave the fleet as it is for inspection")
    r.add_argument("--resources", metavar="DIR", default=os.environ.get("IMAGEUPDATE_RESOURCES"),
                   help="resource survival hooks: scripts run as SCRIPT create|verify_noapi|verify|destroy "
                        "(default: $IMAGEUPDATE_RESOURCES)")
    r.add_argument("--keep-resources", action="store_true", help="do not run the hooks' destroy phase at the end")
    r.add_argument("--hook-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                   help="bound on each hook run (default 60)")
    r.add_argument("--no-probe", action="store_true", help="do not probe the workload for downtime")
    r.add_argument("--probe-interval", type=_seconds, default=0.05, metavar="SECONDS",
                   help="seconds between probes of each node's workload (default 0.05)")
    r.set_defaults(func=cmd_rollout)
    rb = sub.add_parser("rollback", parents=[common, site_opt, gates],
                        help="return each node to its last good release (or every node to --to R)")
    rb.add_argument("--to", metavar="R", help="roll every (--limit) node to this release")
    rb.set_defaults(func=cmd_rollback)
    st = sub.add_parser("status", parents=[common, site_opt], help="which node runs what, and what is going on")
    st.add_argument("--rollout", type=int, metavar="ID", help="show this rollout's steps (default: the newest)")
    st.set_defaults(func=cmd_status)
    ck = sub.add_parser("check", parents=[common, site_opt],
                        help="run the gate's checks on nodes now, against the release each runs")
    ck.add_argument("nodes", nargs="*", metavar="NODE", help="nodes to check (default: all)")
    ck.set_defaults(func=cmd_check)
    r.add_argument("--no-rehearse", action="store_true",
                   help="skip the rehearsal of the state migrations on a copy of the first node's state")
    pl = sub.add_parser("plan", parents=[common, site_opt],
                        help="the upgrade path to a release: the migrations each node's state goes through, in order")
    pl.add_argument("--to", required=True, metavar="R", help="target release")
    pl.set_defaults(func=cmd_plan)
    rh = sub.add_parser("rehearse", parents=[common, site_opt],
                        help="run the migration path to a release on a copy of a node's state, timed; "
                             "nothing on the fleet changes")
    rh.add_argument("--to", required=True, metavar="R", help="target release")
    rh.add_argument("--node", metavar="NODE", help="whose state to copy (default: the first node that changes)")
    rh.set_defaults(func=cmd_rehearse)
    cc = sub.add_parser("check-config", parents=[common, site_opt],
                        help="check config against the target release and every release before it")
    cc.add_argument("--to", required=True, metavar="R", help="target release")
    cc.add_argument("--from", dest="from_release", metavar="R",
                    help="the release the config was written for (default: what the site's nodes run)")
    cc.add_argument("configs", nargs="*", metavar="CONFIG",
                    help="config files, matched by name to the release's config files "
                         "(default: each node's, from its state partition)")
    cc.set_defaults(func=cmd_check_config)
    rep = sub.add_parser("report", parents=[common, site_opt],
                         help="write an HTML page of a rollout: per node timeline, checks, downtime, rollback")
    rep.add_argument("rollout", nargs="?", type=int, metavar="ROLLOUT", help="rollout id (default: the newest)")
    rep.add_argument("--output", "-o", metavar="FILE", help="where to write the page (default: SITE/reports/)")
    rep.set_defaults(func=cmd_report)
    heat = sub.add_parser("heat", parents=[common], help="the site's ephemeral Heat")
    hsub = heat.add_subparsers(dest="heat_command", required=True, parser_class=_Parser)
    hstop = hsub.add_parser("stop", parents=[common, site_opt], help="stop it; stacks stay in SITE/heat/heat.sqlite")
    hstop.add_argument("--force", action="store_true",
                       help="even while a rollout is running, paused or interrupted: its stack update stops half "
                            "way ('imageupdate resume' restarts Heat and finishes it)")
    hstop.set_defaults(func=cmd_heat_stop)
    for name, func, text in (
        ("start", cmd_heat_start, "start it (or find it running)"),
        ("status", cmd_heat_status, "is it running, where"),
        ("env", cmd_heat_env, "shell exports for the openstack client, the site's Heat secret among them: "
                          "eval \"$(imageupdate heat env)\""),
    ):
        hsub.add_parser(name, parents=[common, site_opt], help=text).set_defaults(func=func)
    sub.add_parser("resume", parents=[common, site_opt],
                   help="finish a paused or interrupted rollout").set_defaults(func=cmd_resume)
    sub.add_parser("cancel", parents=[common, site_opt],
                   help="stop the current rollout and roll back what it touched").set_defaults(func=cmd_cancel)


def _store(args: argparse.Namespace) -> ImageStore:
    return ImageStore(getattr(args, "store", None))


def cmd_build(args: argparse.Namespace, out: Output) -> int:
    request = BuildRequest(
        release=args.release,
        elements=args.element,
        elements_paths=args.elements_path,
        os_element=args.os_element,
        force=args.force,
        signing_key=args.key,
    )
    with out.progress(f"building {args.release}") as progress:

        def on_event(e: BuildEvent) -> None:
            heading = f"{e.stage} {e.phase}".strip()
            progress.update(heading, e.detail)

        result = Builder(_store(args)).build(request, on_event)
    out.result(
        {
            "release": result.release,
            "path": str(result.path),
            "seconds": round(result.seconds, 2),
            "dib_seconds": round(result.dib_seconds, 2),
            "pack_seconds": round(result.pack_seconds, 2),
            "log": str(result.log),
            "manifest": result.manifest.to_dict(),
        },
        render.build_result(result),
    )
    return EXIT_OK


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    store = _store(args)
    manifests = [store.manifest(r) for r in store.releases()]
    damaged = store.damaged()
    out.result(
        {"store": str(store.root), "releases": [
            {"release": m.release, "built_at": m.built_at, "elements": m.elements,
             "packages": len(m.packages), "kernel": m.kernel,
             "artifacts": {k: asdict(v) for k, v in m.artifacts.items()}}
            for m in manifests
        ], "damaged": [{"release": r, "reason": why} for r, why in damaged.items()]},
        render.release_list(manifests, damaged),
    )
    return EXIT_OK


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    m = _store(args).manifest(args.release)
    out.result(m.to_dict(), render.manifest(m))
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    d = _store(args).diff(args.old, args.new)
    out.result(d.to_dict(), render.diff(d))
    return EXIT_OK


def _fleet_dir(args: argparse.Namespace) -> Path:
    """The directory of the fleet --site/--cloud name (its history, its trusted keys)."""
    cloud = _cloud_name(args)
    if cloud is None:
        return _site(args).path
    return Path(getattr(args, "site", None) or DEFAULT_CLOUD_ROOT / cloud)


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    named = getattr(args, "site", None) is not None or _cloud_name(args) is not None
    fleet = _fleet_dir(args) if named else None  # else: against this host's own release key
    r = _store(args).verify(args.release, fleet)
    out.result({"release": r.release, "ok": r.ok, "checked": r.checked, "problems": r.problems,
                "signer": r.signer, "trusted_by": str(fleet) if fleet else None}, render.verify(r))
    if not r.ok:
        out.fail(f"release {r.release!r} failed verification: {'; '.join(r.problems)}"
                 + ("" if r.signature_only else f"; rebuild it with 'imageupdate build {r.release} --force'"))
        return EXIT_FAILED
    return EXIT_OK


def cmd_sign(args: argparse.Namespace, out: Output) -> int:
    key = signing.require_private_key(args.key or signing.default_key(), create=False)
    fingerprint = _store(args).sign(args.release, key, _fleet_dir(args), adopt=args.adopt)
    out.result({"release": args.release, "key": str(key), "fingerprint": fingerprint},
               f"signed {args.release} with {key} ({fingerprint})")
    return EXIT_OK


def cmd_keys_create(args: argparse.Namespace, out: Output) -> int:
    path = args.key or signing.default_key()
    key = signing.create_key(path)
    out.result({"key": str(path), "public_key": f"{path}.pub", "fingerprint": key.fingerprint},
               f"made {path} ({key.fingerprint}); keep it secret and back it up; "
               f"sites trust it with 'imageupdate keys trust {path}.pub'")
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace, out: Output) -> int:
    fleet = _fleet_dir(args)
    keys = [{"name": k.name, "type": k.key_type, "fingerprint": signing.fingerprint_of(k)}
            for k in signing.read_trusted(signing.trust_file(fleet))]
    text = "\n".join(f"{k['name']} {k['type']} {k['fingerprint']}" for k in keys) or f"{fleet} trusts no key"
    out.result({"fleet": str(fleet), "trusted": keys}, text)
    return EXIT_OK


def cmd_keys_trust(args: argparse.Namespace, out: Output) -> int:
    fleet = _fleet_dir(args)
    name = args.name or args.public_key.name.removesuffix(".pub")
    key = signing.public_key(args.public_key, name)
    added = signing.trust(fleet, key)
    out.result({"fleet": str(fleet), "name": key.name, "fingerprint": key.fingerprint, "added": added},
               f"{fleet} {'now trusts' if added else 'already trusted'} {key.name} ({key.fingerprint})")
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace, out: Output) -> int:
    fleet = _fleet_dir(args)
    key = signing.revoke(fleet, args.key)
    out.result({"fleet": str(fleet), "name": key.name, "revoked": True},
               f"{fleet} no longer trusts {key.name}; releases signed only by it are refused from now on")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace, out: Output) -> int:
    _store(args).delete(args.release)
    out.result({"release": args.release, "deleted": True}, f"deleted {args.release}")
    return EXIT_OK


def _site(args: argparse.Namespace) -> LocalSite:
    return LocalSite.open(getattr(args, "site", None), getattr(args, "store", None))


def _site_result(out: Output, status: SiteStatus) -> None:
    out.result(asdict(status), render.site_status(status))


def cmd_site_up(args: argparse.Namespace, out: Output) -> int:
    site = _site(args)
    with out.progress(f"bringing the site up in {site.path}"):
        status = site.up(args.nodes, args.release, args.kind)
    _site_result(out, status)
    return EXIT_OK


def cmd_site_status(args: argparse.Namespace, out: Output) -> int:
    _site_result(out, _site(args).status())
    return EXIT_OK


def _warn_forced(out: Output, site: LocalSite, command: str, force: bool) -> None:
    """With --force, one warning line naming the open operation the command goes ahead against."""
    if force and (what := open_operation(site.path)) is not None:
        out.err.print(f"imageupdate: warning: {what} on site {site.path}; '{command}' goes ahead (--force)",
                      markup=False, highlight=False, soft_wrap=True)


def cmd_site_down(args: argparse.Namespace, out: Output) -> int:
    site = _site(args)
    _warn_forced(out, site, "site down", args.force)
    _site_result(out, site.down(force=args.force))
    return EXIT_OK


def cmd_site_destroy(args: argparse.Namespace, out: Output) -> int:
    site = _site(args)
    _warn_forced(out, site, "site destroy", args.force)
    site.destroy(force=args.force)
    out.result({"site": str(site.path), "destroyed": True}, f"destroyed {site.path}")
    return EXIT_OK


def cmd_site_recover(args: argparse.Namespace, out: Output) -> int:
    said = _site(args).recover()
    out.result({"recovered": said}, "\n".join(said) or "nothing to recover")
    return EXIT_OK


def cmd_site_rebuild(args: argparse.Namespace, out: Output) -> int:
    site = _site(args)
    if not args.by_heat:
        _warn_forced(out, site, f"site rebuild {args.node} {args.release}", args.force)
    status = site.rebuild(args.node, args.release, wait=args.wait_lock, force=args.force, by_heat=args.by_heat)
    out.result(asdict(status), render.node_line(status))
    return EXIT_OK


def _cloud_name(args: argparse.Namespace) -> str | None:
    return getattr(args, "cloud", None) or os.environ.get("OS_CLOUD") or None


def _fleet(args: argparse.Namespace) -> Fleet:
    """The local site's fleet, or with --cloud (or $OS_CLOUD) the fleet on that cloud."""
    cloud = _cloud_name(args)
    if cloud is None:
        return LocalFleet(_site(args))
    path = getattr(args, "site", None) or DEFAULT_CLOUD_ROOT / cloud
    return CloudFleet(Path(path), _store(args), cloud)


def _orchestrator(args: argparse.Namespace, out: Output) -> Orchestrator:
    return Orchestrator(_fleet(args), on_event=out.event)


MAX_CLOUD_NODES = 1000  # servers one fleet's stack holds


def cmd_cloud_up(args: argparse.Namespace, out: Output) -> int:
    cloud = _cloud_name(args)
    if cloud is None:
        raise InputError("cloud up needs --cloud NAME (a cloud of clouds.yaml) or $OS_CLOUD")
    if not 1 <= args.nodes <= MAX_CLOUD_NODES:
        raise InputError(f"--nodes must be between 1 and {MAX_CLOUD_NODES}, not {args.nodes}")
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,40}", args.prefix):
        raise InputError(f"--prefix {args.prefix!r} is not allowed: a lower-case letter, then up to 40 of a-z 0-9 -"
                         " (server names, host key aliases)")
    if not Path(args.ssh_key).is_file():
        raise InputError(f"--ssh-key {args.ssh_key} is not a file: the private key the servers accept")
    networks = None if args.network is None else (
        [{"allocate_network": "none"}] if args.network == "none" else [{"network": args.network}])
    fleet = CloudFleet(Path(getattr(args, "site", None) or DEFAULT_CLOUD_ROOT / cloud), _store(args), cloud)
    cfg = CloudConfig(cloud=cloud, stack=args.stack or f"imageupdate-{cloud}", flavor=args.flavor,
                      ssh_key=str(Path(args.ssh_key).resolve()), networks=networks, key_name=args.key_name,
                      ssh_user=args.ssh_user, nodes=[f"{args.prefix}{i}" for i in range(args.nodes)])
    said = fleet.up(cfg, args.release)
    out.result({"cloud": cloud, "stack": cfg.stack, "nodes": cfg.nodes, "release": args.release,
                "directory": str(fleet.path)}, said)
    return EXIT_OK


def cmd_cloud_forget_host_key(args: argparse.Namespace, out: Output) -> int:
    fleet = _fleet(args)
    if not isinstance(fleet, CloudFleet):
        raise InputError("forget-host-key is for a cloud fleet: give --cloud NAME (a local site pins nothing)")
    forgotten = fleet.forget_host_key(args.node)
    out.result({"node": args.node, "forgotten": forgotten},
               f"{args.node}: {'pin dropped' if forgotten else 'no pin'}; the next connection reads its host key "
               "from its console again")
    return EXIT_OK


def _outcome(out: Output, outcome: Outcome | None) -> int:
    if outcome is None:
        out.result({"cancel": "requested"}, "cancel requested; the running rollout stops at its next gate")
        return EXIT_OK
    out.result(outcome.to_dict(), render.outcome(outcome))
    if not outcome.ok:
        out.fail(render.outcome_line(outcome))
        return EXIT_FAILED
    return EXIT_OK


def cmd_rollout(args: argparse.Namespace, out: Output) -> int:
    opts = RolloutOptions(batch_size=args.batch_size, canary=args.canary, limit=args.limit,
                          pause_between_batches=args.pause_between_batches, gate_timeout=args.gate_timeout,
                          rollback=not args.no_rollback,
                          resources=str(Path(args.resources).resolve()) if args.resources else None,
                          keep_resources=args.keep_resources, hook_timeout=args.hook_timeout,
                          probe=not args.no_probe, probe_interval=args.probe_interval,
                          rehearse=not args.no_rehearse)
    return _outcome(out, _orchestrator(args, out).rollout(args.release, opts))


def cmd_rollback(args: argparse.Namespace, out: Output) -> int:
    opts = RolloutOptions(batch_size=args.batch_size, limit=args.limit, gate_timeout=args.gate_timeout,
                          rollback=False)
    return _outcome(out, _orchestrator(args, out).rollback(args.to, opts))


def cmd_resume(args: argparse.Namespace, out: Output) -> int:
    return _outcome(out, _orchestrator(args, out).resume())


def cmd_cancel(args: argparse.Namespace, out: Output) -> int:
    return _outcome(out, _orchestrator(args, out).cancel())


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    verdicts = check_nodes(_fleet(args), args.nodes or None)
    out.result({"nodes": [v.to_dict() for v in verdicts], "ok": all(v.ok for v in verdicts)},
               render.verdicts(verdicts))
    failed = [v for v in verdicts if not v.ok]
    if failed:
        out.fail(f"{len(failed)} of {len(verdicts)} nodes failed their checks: {failed[0].reason}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_plan(args: argparse.Namespace, out: Output) -> int:
    fleet = _fleet(args)
    fp = plan_fleet(fleet, args.to)
    findings = check_fleet_config(fleet, fp)
    out.result(fp.to_dict() | {"config": [f.to_dict() for f in findings]}, render.fleet_plan(fp, findings))
    return EXIT_OK


def cmd_rehearse(args: argparse.Namespace, out: Output) -> int:
    report, path = rehearse_fleet(LocalFleet(_site(args)), args.to, args.node)
    out.result(report.to_dict() | {"report": str(path)}, render.rehearsal(report, path))
    if not report.ok:
        out.fail(report.problems[0])
        return EXIT_FAILED
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace, out: Output) -> int:
    given = [Path(c) for c in args.configs]
    if args.from_release:
        if not given:
            raise InputError("check-config --from R checks the CONFIG files given: name at least one")
        findings = configs_between(catalog(_store(args)), args.from_release, args.to, given)
    else:
        fleet = LocalFleet(_site(args))
        findings = check_fleet_config(fleet, plan_fleet(fleet, args.to), given or None)
    errors = [f for f in findings if f.level == "error"]
    out.result({"target": args.to, "ok": not errors, "findings": [f.to_dict() for f in findings]},
               render.config_findings(args.to, findings))
    if errors:
        out.fail(f"{errors[0].source}: {errors[0].message}"
                 + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        return EXIT_FAILED
    return EXIT_OK


def cmd_report(args: argparse.Namespace, out: Output) -> int:
    fleet = _fleet(args)
    data = collect(fleet.history, args.rollout, site=str(fleet.path))
    path = Path(args.output) if args.output else fleet.path / "reports" / f"rollout-{data['rollout']['id']}.html"
    write_page(path, render_page(data))
    out.result(data | {"page": str(path)}, f"report of {data['rollout']['kind']} {data['rollout']['id']}: {path}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    status = fleet_status(_fleet(args), args.rollout)
    out.result(status.to_dict(), render.fleet_status(status))
    return EXIT_OK


def _heat_info(fleet: LocalFleet, proc: HeatProcess | None) -> dict[str, Any]:
    info: dict[str, Any] = {"running": proc is not None, "log": str(fleet.heat.paths.log)}
    if proc is not None:
        info |= {"pid": proc.pid, "endpoint": proc.endpoint, "stack": fleet.stack_name}
    return info


def cmd_heat_start(args: argparse.Namespace, out: Output) -> int:
    fleet = LocalFleet(_site(args))
    fleet.site.config()  # SiteNotFound before a Heat starts for nothing
    proc = fleet.heat.ensure()
    out.result(_heat_info(fleet, proc), f"Heat {proc.endpoint} (pid {proc.pid})")
    return EXIT_OK


def cmd_heat_stop(args: argparse.Namespace, out: Output) -> int:
    site = _site(args)
    _warn_forced(out, site, "heat stop", args.force)
    how = site.stop_heat(force=args.force)
    out.result({"stopped": how}, f"Heat: {how}")
    return EXIT_OK


def cmd_heat_status(args: argparse.Namespace, out: Output) -> int:
    fleet = LocalFleet(_site(args))
    info = _heat_info(fleet, fleet.heat.running())
    out.result(info, f"Heat {info['endpoint']} (pid {info['pid']})" if info["running"] else "Heat not running")
    return EXIT_OK


def cmd_heat_env(args: argparse.Namespace, out: Output) -> int:
    fleet = LocalFleet(_site(args))
    proc = fleet.heat.running()
    if proc is None:
        raise InputError(f"the Heat of site {fleet.path} is not running; start it with 'imageupdate heat start'")
    exports = {"OS_AUTH_TYPE": "admin_token", "OS_TOKEN": fleet.heat.secret(), "OS_ENDPOINT": proc.endpoint,
               "IMAGEUPDATE_STACK": fleet.stack_name}
    out.result(exports, "\n".join(f"export {k}={v}" for k, v in exports.items()))
    return EXIT_OK


def _sigterm_as_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(getattr(args, "json", False))
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    locks.describe_process(" ".join(["imageupdate", *(sys.argv[1:] if argv is None else argv)]))
    func: Callable[[argparse.Namespace, Output], int] = args.func
    try:
        return func(args, out)
    except ImageUpdateError as exc:
        out.error(exc)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: a pipeline reading --json still gets a document
        out.error(OperationError("interrupted (SIGINT or SIGTERM); 'imageupdate status' says what is left and "
                                 "'imageupdate resume' or 'cancel' finishes an operation it left open"))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
