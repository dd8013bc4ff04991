"""Running one command, the same way from both front doors: call, render, map errors to exit codes."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from imageupdate.base.errors import (
    EXIT_FAILED,
    EXIT_OK,
    CloudAPIError,
    ImageUpdateError,
    InternalError,
    Interrupted,
)
from imageupdate.commands.spec import Command, Context

INTERRUPTED = ("interrupted (SIGINT or SIGTERM); 'imageupdate status' says what is left and 'imageupdate resume' "
               "or 'cancel' finishes an operation it left open")


def execute(command: Command, args: argparse.Namespace, ctx: Context) -> int:
    """Run ``command``: its result as ``--json`` or for people, its failure on one stderr line; the exit code
    (errors.py: 0 ok, 1 failed, 2 bad input, 130 interrupted). A pipeline reading ``--json`` always gets one
    document, an error's too."""
    out = ctx.out
    try:
        result = command.run(args, ctx.for_command(args, command.honours))
    except ImageUpdateError as exc:
        out.error(exc)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through interrupt_on_sigterm
        stopped = Interrupted(INTERRUPTED)
        out.error(stopped)
        return stopped.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if os.environ.get("IMAGEUPDATE_DEBUG"):
            raise
        unexpected = unexpected_error(exc)
        out.error(unexpected)
        return unexpected.exit_code
    out.result(result.to_dict(), command.human(result))
    failure = command.failure(result)
    if failure is not None:
        out.fail(failure)
        return EXIT_FAILED
    return EXIT_OK


CLOUD_LIBRARIES = ("openstack", "keystoneauth1", "requests", "urllib3")


def unexpected_error(exc: Exception) -> ImageUpdateError:
    """An exception no step turned into an error of ours, said in one line: a cloud library's (a cloud API
    that failed where it was not expected to) or, for anything else, an internal error to report."""
    said = " ".join(str(exc).split())[:300] or "no message"
    module = type(exc).__module__.split(".")[0]
    if module in CLOUD_LIBRARIES:
        return CloudAPIError(f"the cloud failed: {said} ({type(exc).__name__}); 'imageupdate status' says what "
                             "is left, then run the command again")
    return InternalError(f"internal error: {type(exc).__name__}: {said}; this is a bug in imageupdate: run again "
                         "with IMAGEUPDATE_DEBUG=1 for the traceback and report it")


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM as Ctrl-C for the block: a build removes its staging directory, a rollout closes or leaves
    its operation open for resume, and the command exits 130 with its error document. A front door's
    business (the library installs no handler)."""
    before = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
