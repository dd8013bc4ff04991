"""Made ``history-v1.sqlite`` once: a history file as the release before schema versioning wrote it.

The v1 SQL (``SCHEMA``, kept byte-for-byte as the first migration), WAL, ``user_version`` 0, and a few rows
with fixed values: an adopt and a failed rollout, two steps, a check, a release reached and a log line. Kept
for the record; the committed file is the fixture, do not regenerate it with a newer schema.

    python tests/unit/data/make_history_v1.py tests/unit/data/history-v1.sqlite
"""

from __future__ import annotations

import json
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from imageupdate.history.schema import SCHEMA

OPTIONS = {"batch_size": 1, "canary": True, "limit": None, "pause": False, "gate_timeout": 60, "rollback": True}
PLAN = {"batches": [["node0"], ["node1"]], "before": {"node0": "R1", "node1": "R1"},
        "after": {"node0": "R2", "node1": "R2"}}


def make(path: Path) -> None:
    if path.exists():
        raise SystemExit(f"{path} exists")
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(SCHEMA)
        db.execute("BEGIN")
        db.execute("INSERT INTO rollouts (kind, target, options, plan, status, started, finished) "
                   "VALUES ('adopt', NULL, '{}', ?, 'succeeded', 1000.0, 1001.0)",
                   (json.dumps({"batches": [], "before": {}, "after": {"node0": "R1", "node1": "R1"}}),))
        db.execute("INSERT INTO rollouts (kind, target, options, plan, status, reason, started, finished, pid, "
                   "heat, sent, template, environment) VALUES ('rollout', 'R2', ?, ?, 'failed', "
                   "'gate of node0 failed', 2000.0, 2100.5, NULL, '123@456.7', 2010.0, ?, ?)",
                   (json.dumps(OPTIONS), json.dumps(PLAN), json.dumps({"resources": {}}),
                    json.dumps({"environment": {}, "files": {}})))
        db.execute("INSERT INTO steps (rollout, node, batch, step, from_release, to_release, status, started, "
                   "finished) VALUES (2, 'node0', 0, 'rebuild', 'R1', 'R2', 'succeeded', 2010.0, 2050.0)")
        db.execute("INSERT INTO steps (rollout, node, batch, step, from_release, to_release, status, started, "
                   "finished, reason, data) VALUES (2, 'node0', 0, 'gate', 'R1', 'R2', 'failed', 2050.0, 2100.0, "
                   "'test:http failed', '{\"checks\": 2}')")
        db.execute("INSERT INTO checks (rollout, node, name, ok, seconds, output, at) "
                   "VALUES (2, 'node0', 'test:http', 0, 1.5, 'connection refused', 2099.0)")
        db.execute("INSERT INTO releases (node, release, rollout, good, at) VALUES ('node0', 'R1', 1, 1, 1001.0)")
        db.execute("INSERT INTO log (rollout, node, at, message) VALUES (2, 'node0', 2050.0, 'rebuilt node0 to R2')")
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


if __name__ == "__main__":
    make(Path(sys.argv[1]))
