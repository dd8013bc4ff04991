"""cloud: a fleet of Nova servers on a cloud of clouds.yaml (``cloud up`` makes it; the fleet commands drive it
with --cloud)."""

from __future__ import annotations

import argparse

from imageupdate import api
from imageupdate.base.errors import InputError
from imageupdate.cloud.setup import DEFAULT_PREFIX, DEFAULT_SSH_USER, MAX_NODES, default_stack
from imageupdate.commands.spec import FLEET, Command, Context, arg


def _cloud(ctx: Context, missing: str) -> str:
    cloud = ctx.at.get("cloud")
    if cloud is None:
        raise InputError(missing)
    return str(cloud)


def cloud_up(args: argparse.Namespace, ctx: Context) -> api.CloudFleetMade:
    cloud = _cloud(ctx, "cloud up needs --cloud NAME (a cloud of clouds.yaml) or $OS_CLOUD")
    return api.cloud_up(cloud, args.nodes, args.release, args.flavor, args.ssh_key, network=args.network,
                        key_name=args.key_name, ssh_user=args.ssh_user, stack=args.stack, prefix=args.prefix,
                        site=ctx.at["site"], store=ctx.at["store"])


def forget_host_key(args: argparse.Namespace, ctx: Context) -> api.HostKeyForgotten:
    cloud = _cloud(ctx, "forget-host-key is for a cloud fleet: give --cloud NAME (a local site pins nothing)")
    return api.forget_host_key(args.node, cloud=cloud, site=ctx.at["site"], store=ctx.at["store"])


COMMANDS = [
    Command("cloud up", "create the fleet's Heat stack: N servers on a release (uploaded to Glance)", cloud_up,
            lambda m: m.said, honours=FLEET, args=(
                arg("--nodes", type=int, required=True, metavar="N", help=f"servers, 1 to {MAX_NODES}"),
                arg("--release", required=True, metavar="R"),
                arg("--flavor", required=True, help="Nova flavor, with an ephemeral disk for the state"),
                arg("--ssh-key", required=True, metavar="FILE", help="private key the servers accept (as root)"),
                arg("--key-name", help="Nova key pair to inject"),
                arg("--network", help="Neutron network name or id, or 'none' (default: the cloud's default)"),
                arg("--ssh-user", default=DEFAULT_SSH_USER, help=f"(default {DEFAULT_SSH_USER})"),
                arg("--stack", help=f"stack name (default {default_stack('CLOUD')})"),
                arg("--prefix", default=DEFAULT_PREFIX,
                    help=f"server names: PREFIX0, PREFIX1, ... (default {DEFAULT_PREFIX})"),
            )),
    Command("cloud forget-host-key", "drop a server's pinned SSH host key (a server replaced on purpose); the next "
            "connection learns it again from the server's console", forget_host_key,
            lambda f: (f"{f.node}: {'pin dropped' if f.forgotten else 'no pin'}; the next connection reads its "
                       "host key from its console again"), honours=FLEET, args=(arg("node"),)),
]
