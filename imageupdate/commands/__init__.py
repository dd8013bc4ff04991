"""The command layer: every command defined once (its arguments, a call into :mod:`imageupdate.api`, a result
with ``to_dict()``, a human view) for both front doors, ``imageupdate`` (:mod:`imageupdate.cli`) and
``openstack imageupdate`` (:mod:`imageupdate.osc`). See :mod:`imageupdate.commands.spec`."""

from __future__ import annotations

from imageupdate.commands import cloud, fleet, images, keys, site, upgrade
from imageupdate.commands.spec import Command

# The groups of two-word commands, in the order --help lists them.
GROUPS = {
    "images": "inspect the image store",
    "keys": "release signing keys: yours, and those a fleet trusts",
    "site": "the local site: a fleet of namespace nodes",
    "heat": "the site's ephemeral Heat",
    "cloud": "a fleet of Nova servers on a cloud of clouds.yaml",
}

# Every command, in the order of the work: build, look at releases, set up a fleet, plan, roll out, look back.
COMMANDS: list[Command] = [*images.COMMANDS, *keys.COMMANDS, *site.COMMANDS, *cloud.COMMANDS, *upgrade.COMMANDS,
                           *fleet.COMMANDS]


def by_name(name: str) -> Command:
    return next(c for c in COMMANDS if c.name == name)
