"""What an operation learns goes to the history as it happens: the rehearsal's steps, and what a node's
rebuild did to its state (snapshots, migration steps, restores, from the journal on its state partition)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from imageupdate.history.db import History, RolloutRow
from imageupdate.rollout.fleet import Fleet
from imageupdate.upgrade.rehearse import Rehearsal

Say = Callable[[RolloutRow, "str | None", str, str], None]


def rehearsal(history: History, row: RolloutRow, node: str, began: float, report: Rehearsal) -> None:
    summary = {k: getattr(report, k) for k in ("state_bytes", "copy_seconds", "prepare_seconds", "seconds")}
    history.migration(row.id, node, "rehearsal", began, ok=report.ok, seconds=report.seconds,
                      output=json.dumps(summary | {"problems": report.problems}))
    started = began + report.copy_seconds + report.prepare_seconds
    for s in report.steps:
        took = s.seconds + (s.rerun_seconds or 0.0)
        history.migration(row.id, node, "rehearsal", started, release=s.release, migration=s.migration,
                          kind=s.kind, state_version=s.state_version, ok=s.ok and s.idempotent is not False,
                          seconds=round(took, 3), output=s.output)
        started += took


def rehearsed(history: History, row: RolloutRow) -> bool:
    """Whether this operation's rehearsal ran to its end and passed (a resume does not run it twice)."""
    return any(m["phase"] == "rehearsal" and not m["migration"] and m["ok"] == 1 for m in history.migrations(row.id))


def node_state(history: History, fleet: Fleet, row: RolloutRow, node: str, say: Say) -> None:
    """Copy what the node's rebuild did to its state into the history, in time order."""
    try:
        record = fleet.state_record(node)
    except (OSError, ValueError):
        return
    happened: list[tuple[float, Any]] = [(s.started, s) for s in record.steps if s.started >= row.started]
    happened += [(e["at"], e) for e in record.events
                 if isinstance(e.get("at"), (int, float)) and e["at"] >= row.started
                 and e.get("event") in ("snapshot", "restored")]
    for at, x in sorted(happened, key=lambda h: h[0]):
        if isinstance(x, dict):
            phase = "snapshot" if x["event"] == "snapshot" else "restore"
            took = (x.get("seconds") or 0.0) + (x.get("verify_seconds") or 0.0)  # a snapshot counts its read-back
            if not history.migration(row.id, node, phase, at, state_version=x.get("version"), ok=True,
                                     seconds=round(took, 3), output=json.dumps(x)):
                continue
            if phase == "restore":
                say(row, node, "info", f"restored the state snapshot at version {x.get('version')} because "
                    f"{x.get('because')} had run: changes made since the snapshot are gone")
            else:
                say(row, node, "info", f"state snapshot at version {x.get('version')} taken and read back")
        elif history.migration(row.id, node, "migration", at, release=x.release, migration=x.migration,
                               kind=x.kind, state_version=x.state_version, ok=x.ok,
                               seconds=None if x.finished is None else round(x.finished - x.started, 3),
                               output=x.output):
            how = {True: "done", False: "FAILED"}.get(x.ok, "interrupted")
            say(row, node, "info", f"migration {x.migration} ({x.kind}, from {x.release}) {how}: "
                f"state version {x.state_version if x.ok else record.version}")
