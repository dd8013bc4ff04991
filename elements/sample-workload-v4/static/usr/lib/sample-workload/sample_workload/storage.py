"""Storage, data format 4: SQLite data.db, table entries (key, value, created NOT NULL).

Migration ``0004-kv-to-entries`` (contract) replaces table kv: release 3's code no longer works on it.
Release 4 upgrades only from release 3 or later (``min_from``). Config: ``[storage] sync``; ``fsync``,
deprecated since release 2, is removed: it is ignored.
"""
import configparser
import os
import sqlite3
import sys
import threading
import time

FORMAT = 4


class StateNotMigrated(Exception):
    pass


def sync_writes(config: configparser.ConfigParser) -> bool:
    if config.has_option("storage", "fsync"):
        print("warning: [storage] fsync was removed in release 4 and is ignored; use [storage] sync",
              file=sys.stderr)
    return config.getboolean("storage", "sync", fallback=True)


class Store:
    def __init__(self, data_dir: str, config: configparser.ConfigParser) -> None:
        path = os.path.join(data_dir, "data.db")
        if not os.path.exists(path) and os.path.exists(os.path.join(data_dir, "data.json")):
            raise StateNotMigrated(f"{data_dir} holds data format 1: migrations 0002 to 0004 have not run")
        self.db = sqlite3.connect(path, check_same_thread=False)
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "kv" in tables:
            raise StateNotMigrated(f"{data_dir} still has table kv: migration 0004-kv-to-entries has not run")
        self.db.execute("CREATE TABLE IF NOT EXISTS entries "
                        "(key TEXT PRIMARY KEY, value BLOB NOT NULL, created REAL NOT NULL)")
        self.db.execute(f"PRAGMA synchronous = {'FULL' if sync_writes(config) else 'OFF'}")
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO entries (key, value, created) VALUES (?, ?, ?)",
                            (key, value, time.time()))

    def delete(self, key: str) -> None:
        with self.lock, self.db:
            self.db.execute("DELETE FROM entries WHERE key = ?", (key,))
