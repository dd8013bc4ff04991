"""An operation is open from its first step to its last: while it is open nothing else changes the site.

An operation is a row of ``SITE/history.sqlite`` (table ``rollouts``) whose status is ``running`` or
``paused``; ``running`` with a dead owner is an interrupted one, still open until ``imageupdate resume``
finishes it or ``imageupdate cancel`` stops it. A process that holds ``SITE/rollout.lock`` is operating
the fleet even before (or after) its row says so. While either is the case, commands that would change the
fleet, the site or its Heat under the operation (``site destroy``, ``site down``, ``site rebuild``, ``heat
stop``) refuse unless the operator passes ``--force``; a rebuild that Heat runs for the operation itself
is the operation's own step and is not asked.

Reading never creates anything: a site without a history has no operation.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from imageupdate.base import locks, procs
from imageupdate.base.errors import InputError
from imageupdate.history.db import History, RolloutRow

HISTORY = "history.sqlite"
ROLLOUT_LOCK = "rollout.lock"


class OperationOpen(InputError):
    """A command that would change the site while a rollout (or rollback) is running, paused or interrupted."""


def _what(row: RolloutRow) -> str:
    if row.target:
        return f"{row.kind} {row.id} to {row.target}"
    if row.kind == "rollback":
        return f"{row.kind} {row.id} to each node's last good release"
    return f"{row.kind} {row.id}"


def _state(row: RolloutRow) -> str:
    if row.status == "paused":
        return "is paused"
    if procs.alive(row.pid):
        return f"is running (process {row.pid})"
    if row.pid:
        return f"was interrupted (process {row.pid} is gone)"
    return "was interrupted (its process is gone)"


def _lock_holder(site_path: Path) -> str | None:
    """Who holds ``SITE/rollout.lock``, if another process does (an operation starting or finishing)."""
    path = site_path / ROLLOUT_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if locks.try_flock(fd, fcntl.LOCK_SH):
            return None
    finally:
        os.close(fd)
    try:
        owner = json.loads(path.read_text())
        return f"process {int(owner['pid'])} ('{str(owner.get('command', '')).strip() or 'imageupdate'}')"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def open_operation(site_path: Path) -> str | None:
    """The operation open on the site at ``site_path``, described in words, or None.

    E.g. ``rollout 3 to R2 is running (process 1234)``, ``rollback 4 to R1 is paused``,
    ``rollout 3 to R2 was interrupted (process 1234 is gone)``."""
    site_path = Path(site_path)
    history = site_path / HISTORY
    if history.is_file():
        row = History(history).active()
        if row is not None:
            return f"{_what(row)} {_state(row)}"
    holder = _lock_holder(site_path)
    if holder is not None:
        return f"an operation of {holder} is under way"
    return None


def _fix(description: str) -> str:
    if " is running " in description or description.startswith("an operation of "):
        return "wait for it to finish or stop it ('imageupdate cancel') first, or pass --force"
    return "finish it ('imageupdate resume') or stop it ('imageupdate cancel') first, or pass --force"


def refuse_while_open(site_path: Path, command: str, breaks: str, force: bool) -> str | None:
    """Raise :class:`OperationOpen` if an operation is open on the site, unless ``force``.

    ``command`` is what the operator asked (``site destroy``), ``breaks`` what it would do to the open
    operation (``would delete every node's state, snapshots and the history``). With ``force`` the
    description of the open operation is returned (None when nothing is open) so the caller can warn."""
    description = open_operation(site_path)
    if description is None or force:
        return description
    raise OperationOpen(f"{description} on site {site_path}: '{command}' {breaks}; {_fix(description)}")
