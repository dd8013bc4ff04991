"""Storage, data format 1: one JSON object in data.json, rewritten atomically.

Config: ``[storage] fsync`` (default true) fsyncs every write.
"""
import configparser
import json
import os
import threading

FORMAT = 1


class StateNotMigrated(Exception):
    pass


class Store:
    def __init__(self, data_dir: str, config: configparser.ConfigParser) -> None:
        self.path = os.path.join(data_dir, "data.json")
        self.fsync = config.getboolean("storage", "fsync", fallback=True)
        self.lock = threading.Lock()
        if not os.path.exists(self.path):
            self._write({})

    def _read(self) -> dict:
        with open(self.path) as f:
            return json.load(f)

    def _write(self, data: dict) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def get(self, key: str) -> bytes | None:
        with self.lock:
            value = self._read().get(key)
        return None if value is None else value.encode()

    def put(self, key: str, value: bytes) -> None:
        with self.lock:
            data = self._read()
            data[key] = value.decode()
            self._write(data)

    def delete(self, key: str) -> None:
        with self.lock:
            data = self._read()
            data.pop(key, None)
            self._write(data)
