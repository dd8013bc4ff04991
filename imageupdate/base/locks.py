"""flock(2) locks: try once, wait with a bound, hold for a block, or hold with an owner record."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base.procs import wait_until


def flock_wait(fd: int, how: int, wait: float, sleep: Callable[[float], None] = time.sleep) -> bool:
    """flock(2) ``fd``, polling for up to ``wait`` seconds; False if it stays taken."""
    return wait_until(lambda: try_flock(fd, how), wait, interval=0.1, sleep=sleep) if wait > 0 \
        else try_flock(fd, how)


def try_flock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def held(path: Path, mode: int = 0o644, on_wait: Callable[[], None] | None = None,
         record_pid: bool = False) -> Iterator[int]:
    """An exclusive flock(2) on ``path`` (created if missing) for the block; ``on_wait`` is called once if
    another holder makes it wait. The kernel drops it when the holder dies, however it dies. With
    ``record_pid`` the holder writes its pid into the file, for :func:`recorded_pid` in those who wait."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        if not try_flock(fd, fcntl.LOCK_EX):
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        if record_pid:
            write_owner(fd)
        yield fd
    finally:
        os.close(fd)


def recorded_pid(path: Path) -> int | None:
    """The pid the holder of a :func:`held` lock with ``record_pid`` wrote, if it wrote one."""
    owner = read_owner(path)
    return owner.pid if owner else None


def describe_process(text: str) -> None:
    """What this process is, as owner records say it ("imageupdate rollout R2"): set by the front door that
    runs the operation; the library never reads sys.argv."""
    OwnerLock.process = text[:300]


@dataclass(frozen=True)
class Owner:
    pid: int
    rollout: int | None
    command: str
    since: float


def write_owner(fd: int, rollout: int | None = None) -> None:
    """Record this process as the holder of the lock open on ``fd``: one format for every lock that says
    who holds it (``read_owner``)."""
    data = json.dumps({"pid": os.getpid(), "rollout": rollout, "since": time.time(), "command": OwnerLock.process})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (data + "\n").encode(), 0)


def read_owner(path: Path) -> Owner | None:
    """Who ``write_owner`` said holds the lock at ``path``; None if nobody recorded a readable owner."""
    try:
        d = json.loads(path.read_text())
        return Owner(int(d["pid"]), d.get("rollout"), str(d.get("command", "")), float(d.get("since", 0)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class OwnerLock:
    """An exclusive, non-blocking flock(2) whose file records its owner (pid, operation, command, start).
    The flock dies with its owner; the record stays, so the next caller can say who held it."""

    process = "imageupdate (Python API)"  # see describe_process

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def owner(self) -> Owner | None:
        return read_owner(self.path)

    def held_by_other(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            return not try_flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def try_acquire(self, rollout: int | None = None) -> bool:
        """Take it and record this process as its owner; False if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not try_flock(fd, fcntl.LOCK_EX):
            os.close(fd)
            return False
        self._fd = fd
        self.record(rollout)
        return True

    def record(self, rollout: int | None) -> None:
        if self._fd is not None:
            write_owner(self._fd, rollout)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
