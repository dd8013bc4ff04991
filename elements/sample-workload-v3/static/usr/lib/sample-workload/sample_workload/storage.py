"""Storage, data format 3: SQLite data.db, table kv (key, value, created).

Migration ``0003-add-created`` (expand) adds the ``created`` column; release 2's code keeps working on
it. Config as release 2 (``sync``; ``fsync`` deprecated).
"""
import configparser
import os
import sqlite3
import sys
import threading
import time

FORMAT = 3


class StateNotMigrated(Exception):
    pass


def sync_writes(config: configparser.ConfigParser) -> bool:
    if config.has_option("storage", "sync"):
        return config.getboolean("storage", "sync")
    if config.has_option("storage", "fsync"):
        print("warning: [storage] fsync is deprecated, use [storage] sync", file=sys.stderr)
        return config.getboolean("storage", "fsync")
    return True


class Store:
    def __init__(self, data_dir: str, config: configparser.ConfigParser) -> None:
        path = os.path.join(data_dir, "data.db")
        if not os.path.exists(path) and os.path.exists(os.path.join(data_dir, "data.json")):
            raise StateNotMigrated(f"{data_dir} holds data format 1: migrations 0002, 0003 have not run")
        self.db = sqlite3.connect(path, check_same_thread=False)
        columns = [r[1] for r in self.db.execute("PRAGMA table_info(kv)")]
        if columns and "created" not in columns:
            raise StateNotMigrated(f"{data_dir} holds data format 2: migration 0003-add-created has not run")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, created REAL)")
        self.db.execute(f"PRAGMA synchronous = {'FULL' if sync_writes(config) else 'OFF'}")
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO kv (key, value, created) VALUES (?, ?, ?)",
                            (key, value, time.time()))

    def delete(self, key: str) -> None:
        with self.lock, self.db:
            self.db.execute("DELETE FROM kv WHERE key = ?", (key,))
