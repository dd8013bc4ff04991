"""One operation per site: ``SITE/rollout.lock``, an flock(2) that records its owner.

The kernel drops the flock when its owner dies, however it dies; the owner record (pid, operation,
command, start) stays in the file so the next caller can say who held it.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base.errors import InputError


class RolloutInProgress(InputError):
    """Another imageupdate process is operating on the site's fleet."""


@dataclass(frozen=True)
class Owner:
    pid: int
    rollout: int | None
    command: str
    since: float


class RolloutLock:
    def __init__(self, site: Path) -> None:
        self.path = Path(site) / "rollout.lock"
        self._fd: int | None = None

    def owner(self) -> Owner | None:
        try:
            d = json.loads(self.path.read_text())
            return Owner(int(d["pid"]), d.get("rollout"), str(d.get("command", "")), float(d.get("since", 0)))
        except (OSError, ValueError, KeyError):
            return None

    def held_by_other(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def acquire(self, rollout: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            o = self.owner()
            who = f"process {o.pid} ('{o.command}', since {time.strftime('%H:%M:%S', time.localtime(o.since))})" \
                if o else "another process"
            raise RolloutInProgress(f"{who} is operating this site's fleet; wait for it, or stop it with "
                                    "'imageupdate cancel'") from None
        self._fd = fd
        self.record(rollout)

    def record(self, rollout: int | None) -> None:
        if self._fd is None:
            return
        data = json.dumps({"pid": os.getpid(), "rollout": rollout, "since": time.time(),
                           "command": " ".join(["imageupdate", *sys.argv[1:]])[:300]})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (data + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RolloutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
