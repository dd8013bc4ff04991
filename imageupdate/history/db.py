"""History in ``SITE/history.sqlite``: what happened where, with timings. Nothing is kept only in memory.

Tables:
- ``rollouts``: one row per operation (``adopt``, ``rollout``, ``rollback``): target, options, the plan
  (batches, releases before and after), status, reason, owner pid, the Heat process it talked to, and the
  template and environment it sent (a resume after a Heat crash re-sends exactly these);
- ``steps``: per node and operation, the ``rebuild`` and ``gate`` steps with start, end and outcome;
- ``checks``: each check a gate ran on a node, with result, duration and output;
- ``releases``: per node, each release it reached and whether it passed its gate (the last good release);
- ``hooks``: each run of an operator's resource hook (script, phase, node, result, output);
- ``probes``: per node, what the workload probe saw during the operation (requests, failures, outages);
- ``migrations``: per node, each state migration step run for the operation (and its rehearsal on a copy),
  each snapshot taken and each snapshot restored;
- ``log``: the operation's timeline in words.

The values of the status columns are the tuples below, and a write of any other value is refused (the
comments in the v1 SQL, ``schema.SCHEMA``, are kept as shipped and are not complete). ``rollouts.status``:
``ROLLOUT_STATUSES`` (``rolled-back``: a rollout whose rollback succeeded, and the rollout a later
``rollback`` undid). ``steps.status``: ``STEP_STATUSES`` (``pending`` from when the operation opens until
Heat starts the node's rebuild). ``rollouts.stage`` (schema version 2): ``STAGES``, what an open operation is
doing now, then ``ended`` once its watch saw it end (one closed before any node was touched keeps the stage
it stopped at, a paused one stays ``watching``); NULL for an ``adopt`` and for rows older than the column.
``rollouts.options_version`` is the format of its ``options``. The file, its schema version and its
migrations: :mod:`imageupdate.history.schema`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageupdate.history.schema import HistoryFile

ROLLOUT_STATUSES = ("running", "paused", "succeeded", "failed", "cancelled", "rolled-back")
ACTIVE = ("running", "paused")  # an operation with one of these is open
STEP_STATUSES = ("pending", "running", "succeeded", "failed", "timed-out", "cancelled")
STAGES = ("planned", "rehearsing", "creating-resources", "sending", "watching", "ended")


@dataclass
class RolloutRow:
    id: int
    kind: str
    target: str | None
    parent: int | None
    options: dict[str, Any]
    plan: dict[str, Any]
    status: str
    reason: str | None
    started: float
    finished: float | None
    pid: int | None
    heat: str | None
    cancel_requested: float | None
    sent: float | None = None
    stage: str | None = None
    options_version: int = 1

    @property
    def tag(self) -> str:
        """Names this operation's gates in the stack."""
        return f"r{self.id}"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"tag": self.tag}


@dataclass
class StepRow:
    rollout: int
    node: str
    batch: int | None
    step: str
    from_release: str | None
    to_release: str | None
    status: str
    started: float | None
    finished: float | None
    reason: str | None
    data: dict[str, Any] | None

    @property
    def seconds(self) -> float | None:
        return None if self.started is None or self.finished is None else self.finished - self.started

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"seconds": self.seconds}


class History:
    """The site's history: every write is recorded at once, every read sees what was recorded."""

    def __init__(self, path: Path) -> None:
        self.file = HistoryFile(path)
        self._db = self.file.transaction

    @property
    def path(self) -> Path:
        return self.file.path

    # rollouts ------------------------------------------------------------------

    def start(self, kind: str, target: str | None, options: dict[str, Any], plan: dict[str, Any],
              parent: int | None = None, pid: int | None = None, status: str = "running",
              options_version: int = 1, stage: str | None = None) -> RolloutRow:
        _require(status, ROLLOUT_STATUSES, "rollouts.status")
        _require(stage, (None, *STAGES), "rollouts.stage")
        with self._db() as db:
            cur = db.execute(
                "INSERT INTO rollouts (kind, target, parent, options, plan, status, started, pid, stage, "
                "options_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, target, parent, json.dumps(options), json.dumps(plan), status, time.time(), pid, stage,
                 options_version))
            rid = int(cur.lastrowid or 0)
        return self.rollout(rid)  # type: ignore[return-value]

    def rollout(self, rid: int) -> RolloutRow | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM rollouts WHERE id = ?", (rid,)).fetchone()
        return _rollout(row) if row else None

    def rollouts(self, limit: int = 50) -> list[RolloutRow]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM rollouts ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_rollout(r) for r in rows]

    def undoable(self) -> RolloutRow | None:
        """The newest rollout that changed nodes and has not been rolled back."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM rollouts WHERE kind = 'rollout' AND status IN "
                              "('succeeded', 'failed', 'cancelled') ORDER BY id DESC").fetchall()
        for row in rows:
            found = _rollout(row)
            if any(found.plan.get("batches", [])):  # a rollout with nothing to do changed nothing
                return found
        return None

    def active(self) -> RolloutRow | None:
        """The operation that is running or paused, if any (there is at most one)."""
        with self._db() as db:
            row = db.execute("SELECT * FROM rollouts WHERE status IN (?, ?) ORDER BY id DESC LIMIT 1",
                             ACTIVE).fetchone()
        return _rollout(row) if row else None

    def update(self, rid: int, **fields: Any) -> None:
        allowed = {"status", "reason", "finished", "pid", "heat", "sent", "template", "environment", "plan",
                   "cancel_requested", "stage", "options_version"}
        if not set(fields) <= allowed:
            raise ValueError(f"unknown rollout fields {set(fields) - allowed}")
        if "status" in fields:
            _require(fields["status"], ROLLOUT_STATUSES, "rollouts.status")
        if "stage" in fields:
            _require(fields["stage"], (None, *STAGES), "rollouts.stage")
        if not fields:
            return
        values = [json.dumps(v) if k in ("template", "environment", "plan") else v for k, v in fields.items()]
        with self._db() as db:
            db.execute(f"UPDATE rollouts SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                       (*values, rid))

    def finish(self, rid: int, status: str, reason: str | None = None) -> None:
        self.update(rid, status=status, reason=reason, finished=time.time())

    def sent(self, rid: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        with self._db() as db:
            row = db.execute("SELECT template, environment FROM rollouts WHERE id = ?", (rid,)).fetchone()
        if not row or not row["template"]:
            return None
        return json.loads(row["template"]), json.loads(row["environment"])

    # steps ---------------------------------------------------------------------

    def step(self, rid: int, node: str, step: str, status: str, batch: int | None = None,
             from_release: str | None = None, to_release: str | None = None, started: float | None = None,
             finished: float | None = None, reason: str | None = None, data: dict[str, Any] | None = None) -> None:
        """Insert or update the (rollout, node, step) row; only the fields given change."""
        _require(status, STEP_STATUSES, "steps.status")
        with self._db() as db:
            db.execute("INSERT OR IGNORE INTO steps (rollout, node, step, status) VALUES (?, ?, ?, ?)",
                       (rid, node, step, status))
            sets = {"status": status, "batch": batch, "from_release": from_release, "to_release": to_release,
                    "started": started, "finished": finished, "reason": reason,
                    "data": json.dumps(data) if data is not None else None}
            sets = {k: v for k, v in sets.items() if v is not None}
            db.execute(f"UPDATE steps SET {', '.join(f'{k} = ?' for k in sets)} "
                       "WHERE rollout = ? AND node = ? AND step = ?", (*sets.values(), rid, node, step))

    def step_status(self, rid: int, node: str, step: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT status FROM steps WHERE rollout = ? AND node = ? AND step = ?",
                             (rid, node, step)).fetchone()
        return str(row["status"]) if row else None

    def steps(self, rid: int) -> list[StepRow]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM steps WHERE rollout = ? ORDER BY COALESCE(started, finished), id",
                              (rid,)).fetchall()
        return [StepRow(r["rollout"], r["node"], r["batch"], r["step"], r["from_release"], r["to_release"],
                        r["status"], r["started"], r["finished"], r["reason"],
                        json.loads(r["data"]) if r["data"] else None) for r in rows]

    def check(self, rid: int, node: str, name: str, ok: bool, seconds: float, output: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO checks (rollout, node, name, ok, seconds, output, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (rid, node, name, int(ok), seconds, output[-4000:], time.time()))

    def checks(self, rid: int, node: str | None = None) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM checks WHERE rollout = ? AND (? IS NULL OR node = ?) ORDER BY id",
                              (rid, node, node)).fetchall()
        return [dict(r) for r in rows]

    # resource hooks and probes --------------------------------------------------

    def hook(self, rid: int, script: str, phase: str, node: str | None, ok: bool, started: float, seconds: float,
             output: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO hooks (rollout, script, phase, node, ok, started, seconds, output) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (rid, script, phase, node, int(ok), started, seconds, output[-4000:]))

    def hooks(self, rid: int) -> list[dict[str, Any]]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM hooks WHERE rollout = ? ORDER BY id", (rid,))]

    def probe(self, rid: int, result: dict[str, Any], started: float, finished: float) -> None:
        with self._db() as db:
            db.execute("INSERT INTO probes (rollout, node, target, requests, failures, downtime, outages, started, "
                       "finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (rid, result["node"], result["target"], result["requests"], result["failures"],
                        result["downtime"], json.dumps(result["outages"]), started, finished))

    def probes(self, rid: int) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM probes WHERE rollout = ? ORDER BY id", (rid,))]
        for r in rows:
            r["outages"] = json.loads(r["outages"])
        return rows

    def migration(self, rid: int, node: str, phase: str, started: float, *, release: str = "",
                  migration: str = "", kind: str = "", state_version: int | None = None, ok: bool | None = None,
                  seconds: float | None = None, output: str = "") -> bool:
        """Record one step; False if it was recorded already (a resumed watch reads the journal again)."""
        with self._db() as db:
            cur = db.execute("INSERT OR IGNORE INTO migrations (rollout, node, phase, release, migration, kind, "
                             "state_version, ok, started, seconds, output) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (rid, node, phase, release, migration, kind, state_version,
                              None if ok is None else int(ok), started, seconds, output[-4000:]))
            return cur.rowcount > 0

    def migrations(self, rid: int) -> list[dict[str, Any]]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM migrations WHERE rollout = ? ORDER BY started, id",
                                                (rid,))]

    # releases ------------------------------------------------------------------

    def reached(self, node: str, release: str, rid: int | None, good: bool) -> None:
        with self._db() as db:
            db.execute("INSERT INTO releases (node, release, rollout, good, at) VALUES (?, ?, ?, ?, ?)",
                       (node, release, rid, int(good), time.time()))

    def last_good(self, node: str, before: int | None = None) -> str | None:
        """The newest release that passed on ``node`` (only from operations older than ``before``)."""
        with self._db() as db:
            row = db.execute("SELECT release FROM releases WHERE node = ? AND good = 1 "
                             "AND (? IS NULL OR rollout < ?) ORDER BY id DESC LIMIT 1",
                             (node, before, before)).fetchone()
        return str(row["release"]) if row else None

    def last_verdicts(self) -> dict[str, tuple[str, bool]]:
        """Per node, the release of its newest gate verdict and whether it passed (one query for the fleet)."""
        with self._db() as db:
            rows = db.execute("SELECT node, release, good FROM releases WHERE id IN "
                              "(SELECT MAX(id) FROM releases GROUP BY node)").fetchall()
        return {str(r["node"]): (str(r["release"]), bool(r["good"])) for r in rows}

    def last_verdict(self, node: str) -> tuple[str, bool] | None:
        return self.last_verdicts().get(node)

    def was_good(self, node: str, release: str, before_rollout: int | None = None) -> bool:
        """Whether ``release`` ever passed a gate on ``node`` (in operations older than ``before_rollout``)."""
        with self._db() as db:
            row = db.execute("SELECT 1 FROM releases WHERE node = ? AND release = ? AND good = 1 "
                             "AND (? IS NULL OR rollout < ?) LIMIT 1",
                             (node, release, before_rollout, before_rollout)).fetchone()
        return row is not None

    def good_releases(self) -> set[str]:
        """Every release that passed a gate on some node of this site."""
        if not self.path.exists():
            return set()
        with self._db() as db:
            return {str(r["release"]) for r in db.execute("SELECT DISTINCT release FROM releases WHERE good = 1")}

    # log -----------------------------------------------------------------------

    def say(self, rid: int | None, message: str, node: str | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO log (rollout, node, at, message) VALUES (?, ?, ?, ?)",
                       (rid, node, time.time(), message))

    def log(self, rid: int) -> list[dict[str, Any]]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM log WHERE rollout = ? ORDER BY id", (rid,))]


def _rollout(r: sqlite3.Row) -> RolloutRow:
    return RolloutRow(r["id"], r["kind"], r["target"], r["parent"], json.loads(r["options"]), json.loads(r["plan"]),
                      r["status"], r["reason"], r["started"], r["finished"], r["pid"], r["heat"],
                      r["cancel_requested"], r["sent"], r["stage"], r["options_version"])


def _require(value: str | None, values: tuple[str | None, ...], column: str) -> None:
    """A value the docstring above does not list is a bug in the caller: refuse it before it is written."""
    if value not in values:
        raise ValueError(f"{column} cannot be {value!r} (one of: {', '.join(str(v) for v in values)})")
