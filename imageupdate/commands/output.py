"""How both front doors show things: rich for people, JSON for pipelines.

With ``--json`` the result is one JSON document on stdout and errors are a
JSON document too; progress then goes to stderr as plain lines. Without it,
progress is a live rich status on a terminal and plain lines otherwise (CI
logs). Progress lines name what they are about (a build's release), and a
wait is said in a plain line on a terminal too: a live status line that
stands still looks the same as a hang.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imageupdate.base.errors import ImageUpdateError


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        for console in (self.out, self.err):
            if not console.is_terminal:  # CI logs: wide enough for tables
                console.width = max(console.width, 140)

    def result(self, data: Any, human: Any = None) -> None:
        """Print the command's result: ``data`` as JSON, or ``human`` for people."""
        if self.as_json:
            sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        elif human is not None:
            self.out.print(human)

    def error(self, exc: ImageUpdateError) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(exc.as_dict(), sort_keys=True) + "\n")
        self.fail(exc.message)

    def fail(self, message: str) -> None:
        """One line on stderr, never wrapped: pipelines grep it."""
        sys.stderr.write(f"imageupdate: error: {message}\n")
        sys.stderr.flush()

    def event(self, e: Any) -> None:
        """One line per rollout event on stderr: live progress per node, for people and CI logs alike."""
        stamp = time.strftime("%H:%M:%S", time.localtime(e.at))
        who = f"{e.node}: " if e.node else ""
        style = {"passed": "green", "failed": "red", "paused": "yellow", "finished": "bold"}.get(e.what, "")
        line = f"{stamp} [{e.rollout}] {who}{e.message}"
        if self.as_json or not self.err.is_terminal or not style:
            self.err.print(line, markup=False, highlight=False)
        else:
            self.err.print(f"[{style}]{escape(line)}[/{style}]")

    def warn(self, message: str) -> None:
        """One warning line on stderr, never wrapped."""
        self.err.print(f"imageupdate: warning: {message}", markup=False, highlight=False, soft_wrap=True)

    @contextmanager
    def progress(self, title: str, label: str = "") -> Iterator[Progress]:
        """Progress of one long step; ``label`` (a release id) starts every line it prints."""
        interactive = self.err.is_terminal and not self.as_json
        if interactive:
            with self.err.status(f"{label}: {title}" if label else title) as status:
                yield Progress(self.err, status, label)
        else:
            yield Progress(self.err, None, label)


class Progress:
    """Live status line on a terminal, one plain line per change otherwise."""

    def __init__(self, console: Console, status: Any, label: str = "") -> None:
        self.console = console
        self.status = status
        self.prefix = f"{label}: " if label else ""
        self.start = time.monotonic()
        self.last_heading = ""

    def update(self, heading: str, detail: str = "") -> None:
        elapsed = time.monotonic() - self.start
        if self.status is not None:
            if heading != self.last_heading and self.last_heading:
                self.console.print(f"[green]✓[/green] {escape(self.prefix + self.last_heading)}")
            self.status.update(f"[bold]{escape(self.prefix + heading)}[/bold] {escape(detail)} "
                               f"[dim]{elapsed:5.1f}s[/dim]")
        elif heading != self.last_heading:
            self.console.print(f"[{elapsed:6.1f}s] {self.prefix}{heading}", markup=False, highlight=False)
        self.last_heading = heading

    def say(self, line: str) -> None:
        """A plain line whether or not a live status is shown: a wait, or the end of one."""
        elapsed = time.monotonic() - self.start
        self.console.print(f"[{elapsed:6.1f}s] {self.prefix}{line}", markup=False, highlight=False)


def table(*columns: str) -> Table:
    """A plain table; the last column is cut with an ellipsis instead of wrapping."""
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for c in columns[:-1]:
        t.add_column(c)
    t.add_column(columns[-1], no_wrap=True, overflow="ellipsis", max_width=72)
    return t
