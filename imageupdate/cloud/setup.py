"""What a new cloud fleet is made of, checked before anything is created: the node count, the server names,
the SSH key, the network choice, the stack name. ``CloudFleet.up`` takes the :class:`CloudConfig` made here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from imageupdate.base.errors import InputError
from imageupdate.cloud.fleet import CloudConfig

MAX_NODES = 1000  # servers one fleet's stack holds
DEFAULT_PREFIX = "node"  # server names: node0, node1, ...
DEFAULT_SSH_USER = "root"
NO_NETWORK = "none"  # the network choice that gives the servers no network at all
PREFIX_RULE = re.compile(r"[a-z][a-z0-9-]{0,40}")


def default_stack(cloud: str) -> str:
    return f"imageupdate-{cloud}"


def networks_for(network: str | None) -> list[dict[str, Any]] | None:
    """Nova's ``networks`` for a network name or id, ``none``, or None (the cloud's default)."""
    if network is None:
        return None
    return [{"allocate_network": "none"}] if network == NO_NETWORK else [{"network": network}]


def fleet_config(cloud: str, nodes: int, flavor: str, ssh_key: Path, *, network: str | None = None,
                 key_name: str | None = None, ssh_user: str = DEFAULT_SSH_USER, stack: str | None = None,
                 prefix: str = DEFAULT_PREFIX) -> CloudConfig:
    """A new fleet's configuration; InputError (nothing created) for a count, prefix or key that cannot be.
    The errors name the options of ``cloud up``, as RolloutOptions' name those of ``rollout``."""
    if not 1 <= nodes <= MAX_NODES:
        raise InputError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
    if not PREFIX_RULE.fullmatch(prefix):
        raise InputError(f"--prefix {prefix!r} is not allowed: a lower-case letter, then up to 40 of a-z 0-9 - "
                         "(server names, host key aliases)")
    if not ssh_key.is_file():
        raise InputError(f"--ssh-key {ssh_key} is not a file: the private key the servers accept")
    return CloudConfig(cloud=cloud, stack=stack or default_stack(cloud), flavor=flavor,
                       ssh_key=str(ssh_key.resolve()), networks=networks_for(network), key_name=key_name,
                       ssh_user=ssh_user, nodes=[f"{prefix}{i}" for i in range(nodes)])
