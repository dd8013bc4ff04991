"""Storage, data format 2: SQLite data.db, table kv (key, value).

The state is migrated by imageupdate (``0002-json-to-sqlite``), never by the service: on format-1 data
the service refuses to start. Config: ``[storage] sync`` (default true); the deprecated ``fsync`` is
still read when ``sync`` is absent.
"""
import configparser
import os
import sqlite3
import sys
import threading

FORMAT = 2


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
            raise StateNotMigrated(f"{data_dir} holds data format 1: migration 0002-json-to-sqlite has not run")
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        self.db.execute(f"PRAGMA synchronous = {'FULL' if sync_writes(config) else 'OFF'}")
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def delete(self, key: str) -> None:
        with self.lock, self.db:
            self.db.execute("DELETE FROM kv WHERE key = ?", (key,))
