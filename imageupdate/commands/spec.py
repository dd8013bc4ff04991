"""How a command is declared, once for both front doors (``imageupdate``, ``openstack imageupdate``).

A :class:`Command` is a name, a help line, its arguments (:class:`Arg`, argparse's own vocabulary, defaults
taken from the library's constants), the fleet options it honours (``--store``, ``--site``, ``--cloud``:
only those), a function that calls :mod:`imageupdate.api` and returns a result with ``to_dict()``, and a
human renderer of that result. ``--json`` prints ``to_dict()``; without it the renderer's view is printed.
Both front doors build their parsers with :func:`add_arguments` and run a command with
:func:`imageupdate.commands.run.execute`, so their arguments, output and exit codes are the same.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from rich.console import RenderableType

from imageupdate.commands.output import Output

STORE, SITE, CLOUD = "store", "site", "cloud"  # the fleet options a command may honour
LOCAL = frozenset({STORE, SITE})  # the local site (and its store)
FLEET = frozenset({STORE, SITE, CLOUD})  # the local site, or a fleet on a cloud


class Result(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Arg:
    """One argument, as ``argparse.ArgumentParser.add_argument`` takes it."""

    flags: tuple[str, ...]
    options: dict[str, Any]

    @property
    def dest(self) -> str:
        if "dest" in self.options:
            return str(self.options["dest"])
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return long.lstrip("-").replace("-", "_")


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Context:
    """What a command's function gets besides its arguments: where to say progress (``out``), the api's
    ``site``/``store``/``cloud`` keywords for the options the command honours (``at``), and the cloud the
    front door chose when ``--cloud`` is not given ($OS_CLOUD for ``imageupdate``, ``--os-cloud`` for
    ``openstack``)."""

    out: Output
    default_cloud: str | None = None
    at: dict[str, Any] = field(default_factory=dict)

    def cloud(self, args: argparse.Namespace) -> str | None:
        return getattr(args, "cloud", None) or self.default_cloud or None

    def for_command(self, args: argparse.Namespace, honours: frozenset[str]) -> Context:
        at: dict[str, Any] = {}
        if STORE in honours:
            at["store"] = getattr(args, "store", None)
        if SITE in honours:
            at["site"] = getattr(args, "site", None)
        if CLOUD in honours:
            at["cloud"] = self.cloud(args)
        return replace(self, at=at)


def _no_failure(_result: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Command:
    name: str  # "rollout", "images list"
    help: str
    run: Callable[[argparse.Namespace, Context], Result]
    human: Callable[[Any], RenderableType | str]
    args: tuple[Arg, ...] = ()
    honours: frozenset[str] = frozenset({STORE})
    failure: Callable[[Any], str | None] = _no_failure  # why the result is a failure (exit 1), or None


# argument types ------------------------------------------------------------------------------------------


def seconds(text: str) -> float:
    """A number of seconds as an option: finite and not negative (argparse takes 'nan' and 'inf' as floats);
    each option's own upper bound is checked where it is used."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite, non-negative number of seconds")
    return value


def node_list(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


# the parser of one command -------------------------------------------------------------------------------

STORE_HELP = ("image store (default: $IMAGEUPDATE_STORE, else for a site the store it was created with, else "
              "/var/lib/imageupdate/images)")
SITE_HELP = "site directory (default: $IMAGEUPDATE_SITE or /var/lib/imageupdate/site)"
FLEET_SITE_HELP = ("site directory (default: $IMAGEUPDATE_SITE or /var/lib/imageupdate/site; with --cloud, where "
                   "the fleet's history is kept: /var/lib/imageupdate/clouds/NAME)")
CLOUD_HELP = ("drive the fleet on this cloud of clouds.yaml instead of the local site (default: {default})")


def add_common(parser: argparse.ArgumentParser, honours: frozenset[str] = frozenset({STORE})) -> None:
    """``--json`` and ``--store`` (if honoured); SUPPRESS lets them stand before or after a subcommand."""
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one machine-readable JSON document")
    if STORE in honours:
        parser.add_argument("--store", type=Path, default=argparse.SUPPRESS, metavar="DIR", help=STORE_HELP)


def add_arguments(parser: argparse.ArgumentParser, command: Command, cloud_default: str = "$OS_CLOUD when set",
                  taken: Callable[[str], bool] = lambda _flag: False) -> None:
    """Everything ``command`` takes, onto ``parser``: its fleet options, then its own arguments. A flag
    ``taken`` by the front door itself is left out (an argument keeps its other flags)."""
    add_common(parser, command.honours)
    if SITE in command.honours:
        parser.add_argument("--site", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                            help=FLEET_SITE_HELP if CLOUD in command.honours else SITE_HELP)
    if CLOUD in command.honours:
        parser.add_argument("--cloud", default=argparse.SUPPRESS, metavar="NAME",
                            help=CLOUD_HELP.format(default=cloud_default))
    for a in command.args:
        flags = [f for f in a.flags if not taken(f)]
        parser.add_argument(*flags, **a.options)

