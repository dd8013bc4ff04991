"""The ``imageupdate`` command: parse ``sys.argv`` into one command of :mod:`imageupdate.commands`, run it,
exit with its code (0 ok, 1 failed, 2 bad input, 130 interrupted: see imageupdate/base/errors.py).

What only a front door does is here: the parser of the whole command line, $OS_CLOUD as the default cloud,
SIGTERM handled as Ctrl-C, and naming this process in the locks it takes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from imageupdate import version
from imageupdate.base import locks
from imageupdate.base.errors import EXIT_BAD_INPUT
from imageupdate.commands import COMMANDS, GROUPS
from imageupdate.commands.output import Output
from imageupdate.commands.run import execute, interrupt_on_sigterm
from imageupdate.commands.spec import STORE, Command, Context, add_arguments, add_common


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every bad input."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_BAD_INPUT, f"imageupdate: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imageupdate", description="Image-based, immutable fleet updates through OpenStack Heat.")
    add_common(parser)
    parser.add_argument("--version", action="version", version=f"imageupdate {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        *group, name = command.name.split()
        where = sub
        if group:
            if group[0] not in groups:
                g = sub.add_parser(group[0], help=GROUPS[group[0]])
                add_common(g)
                groups[group[0]] = g.add_subparsers(dest=f"{group[0]}_command", required=True, parser_class=_Parser)
            where = groups[group[0]]
        p = where.add_parser(name, help=command.help, description=command.help)
        add_arguments(p, command)
        p.set_defaults(run=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(words)
    command: Command = args.run
    if STORE not in command.honours and getattr(args, "store", None) is not None:
        parser.error(f"'{command.name}' takes no --store")
    locks.describe_process(" ".join(["imageupdate", *words]))
    ctx = Context(Output(getattr(args, "json", False)), default_cloud=os.environ.get("OS_CLOUD") or None)
    with interrupt_on_sigterm():
        return execute(command, args, ctx)


if __name__ == "__main__":
    sys.exit(main())
