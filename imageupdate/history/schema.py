"""The history's file: its tables, the migrations that bring any older file up to date, and its transactions.

Schema version: ``PRAGMA user_version`` is the number of ``MIGRATIONS`` applied (``VERSION``, now 2). A
``HistoryFile`` brings its file up to date on first use, each migration in its own ``BEGIN IMMEDIATE``
transaction together with its version bump (so two processes opening an old file at once apply each step
once). Version 1 is the schema as first shipped, with ``CREATE TABLE IF NOT EXISTS``: files from before
versioning have ``user_version`` 0 and those tables already, and the step is a no-op there. To change the
schema, append a migration (SQL statements) to ``MIGRATIONS``; never edit one that has shipped, since files
in the field already ran it. A file newer than this code raises ``HistoryTooNew``; a file that is not a
SQLite database raises ``HistoryUnreadable``.

Each use is its own short transaction (WAL, busy timeout), so a crash loses nothing already said. What the
tables hold and the values of their status columns: :mod:`imageupdate.history.db`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imageupdate.base.errors import InputError

# Version 1, the tables as first shipped. Keep this text byte-for-byte: it is the v1 migration.
SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,              -- adopt | rollout | rollback
    target TEXT,                     -- release, or NULL for a rollback to each node's last good release
    parent INTEGER,                  -- the rollout a rollback undoes
    options TEXT NOT NULL,           -- json: batch_size, canary, limit, pause, gate_timeout, rollback
    plan TEXT NOT NULL,              -- json: batches, before {node: release}, after {node: release}
    status TEXT NOT NULL,            -- running | paused | succeeded | failed | rolled-back | cancelled
    reason TEXT,
    started REAL NOT NULL,
    finished REAL,
    pid INTEGER,
    heat TEXT,                       -- the Heat process the last update went to (pid@start)
    sent REAL,                       -- when the last update was sent
    template TEXT,                   -- the last template and environment sent
    environment TEXT,
    cancel_requested REAL
);
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout INTEGER NOT NULL REFERENCES rollouts(id),
    node TEXT NOT NULL,
    batch INTEGER,
    step TEXT NOT NULL,              -- rebuild | gate
    from_release TEXT,
    to_release TEXT,
    status TEXT NOT NULL,            -- running | succeeded | failed | timed-out
    started REAL,
    finished REAL,
    reason TEXT,
    data TEXT,
    UNIQUE (rollout, node, step)
);
CREATE TABLE IF NOT EXISTS checks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout INTEGER NOT NULL REFERENCES rollouts(id),
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    ok INTEGER NOT NULL,
    seconds REAL NOT NULL,
    output TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    release TEXT NOT NULL,
    rollout INTEGER REFERENCES rollouts(id),
    good INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS hooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout INTEGER NOT NULL REFERENCES rollouts(id),
    script TEXT NOT NULL,
    phase TEXT NOT NULL,             -- create | verify_noapi | verify | destroy
    node TEXT,
    ok INTEGER NOT NULL,
    started REAL NOT NULL,
    seconds REAL NOT NULL,
    output TEXT
);
CREATE TABLE IF NOT EXISTS probes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout INTEGER NOT NULL REFERENCES rollouts(id),
    node TEXT NOT NULL,
    target TEXT NOT NULL,            -- what was asked, e.g. http://10.231.0.11:8080/health
    requests INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    downtime REAL NOT NULL,          -- seconds the node's service did not answer
    outages TEXT NOT NULL,           -- json: [[start, end], ...]
    started REAL NOT NULL,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout INTEGER NOT NULL REFERENCES rollouts(id),
    node TEXT NOT NULL,
    phase TEXT NOT NULL,             -- rehearsal | snapshot | migration | restore
    release TEXT NOT NULL DEFAULT '',
    migration TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT '',   -- expand | contract
    state_version INTEGER,
    ok INTEGER,
    started REAL NOT NULL,
    seconds REAL,
    output TEXT,
    UNIQUE (rollout, node, phase, release, migration, started)
);
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout INTEGER REFERENCES rollouts(id),
    node TEXT,
    at REAL NOT NULL,
    message TEXT NOT NULL
);
"""

MIGRATIONS: tuple[str, ...] = (
    SCHEMA,  # 1: the tables as first shipped (files from before versioning already have them)
    """
ALTER TABLE rollouts ADD COLUMN stage TEXT;
ALTER TABLE rollouts ADD COLUMN options_version INTEGER NOT NULL DEFAULT 1;
""",  # 2: what an open operation is doing now, and the format of its options
)
VERSION = len(MIGRATIONS)


class HistoryTooNew(InputError):
    """A history file written by a newer imageupdate, with a schema this one does not know."""


class HistoryUnreadable(InputError):
    """A history file that is not a SQLite database."""


class HistoryFile:
    """``path``, opened for one transaction at a time; created, or migrated to ``VERSION``, on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._current = False  # the file's schema is VERSION (checked or migrated by this instance)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside ``BEGIN IMMEDIATE``: committed at the end, rolled back on any exception."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            with self._readable():
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA busy_timeout = 30000")
                if not self._current:
                    self.migrate(conn)
            conn.row_factory = sqlite3.Row
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def _readable(self) -> Iterator[None]:
        """Turn SQLite's "not a database" (garbage bytes, a damaged header) into a one-line error."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", None) not in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                raise
            raise HistoryUnreadable(f"history {self.path} is not a readable SQLite database ({e}); "
                                    "move it aside to start a new history") from e

    def migrate(self, conn: sqlite3.Connection) -> None:
        """Apply the migrations the file lacks, each with its version bump in one transaction."""
        while (version := self.version(conn)) != VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = self.version(conn)  # another process may have migrated while we waited
                if version < VERSION:
                    for statement in _statements(MIGRATIONS[version]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version + 1}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        self._current = True

    def version(self, conn: sqlite3.Connection) -> int:
        """The file's schema version; HistoryTooNew if it is newer than this code knows."""
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > VERSION:
            raise HistoryTooNew(f"history {self.path} has schema version {version} but this imageupdate knows "
                                f"only up to {VERSION}: upgrade imageupdate")
        return version


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of ``script``, one by one (``executescript`` would commit the open transaction)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""
