"""Storage, data format 2: SQLite data.db (migrated from format 1 on start)."""
import os
import sqlite3
import subprocess
import threading

FORMAT = 2
MIGRATION = "/usr/share/imageupdate/migrations/0002-json-to-sqlite"


class Store:
    def __init__(self, data_dir: str) -> None:
        path = os.path.join(data_dir, "data.db")
        if not os.path.exists(path):
            subprocess.run([MIGRATION, data_dir], check=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self.lock:
            row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))

    def delete(self, key: str) -> None:
        with self.lock, self.db:
            self.db.execute("DELETE FROM kv WHERE key = ?", (key,))
