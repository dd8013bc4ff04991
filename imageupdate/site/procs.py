"""Processes seen from the host: liveness that ignores zombies, bounded stops."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed


def state(pid: int) -> str | None:
    """The process state letter, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int | None) -> bool:
    """True for a live process; PID 1 here reaps late, so a zombie counts as dead."""
    return bool(pid) and state(pid) not in (None, "Z")  # type: ignore[arg-type]


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05,
               sleep: Callable[[float], None] = time.sleep) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return the last answer."""
    retrying = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(interval), sleep=sleep,
                        retry=retry_if_result(lambda ok: not ok),
                        retry_error_callback=lambda _state: False)
    return bool(retrying(predicate))


def stop(pid: int, grace: float, sleep: Callable[[float], None] = time.sleep) -> str:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns how it ended."""
    if not alive(pid):
        return "not running"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    if wait_until(lambda: not alive(pid), grace, sleep=sleep):
        return "stopped"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "stopped"
    wait_until(lambda: not alive(pid), 5.0, sleep=sleep)
    return "killed"


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


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


@contextmanager
def frozen(pid: int | None) -> Iterator[None]:
    """Stop ``pid``'s whole process tree (SIGSTOP, which nothing can catch) and continue it afterwards:
    what it writes to disk is crash-consistent while frozen. Rescans until no new process appears."""
    stopped: list[int] = []
    try:
        if pid is not None and alive(pid):
            while True:
                new = [p for p in tree(pid) if p not in stopped]
                if not new:
                    break
                for p in new:
                    try:
                        os.kill(p, signal.SIGSTOP)
                        stopped.append(p)
                    except ProcessLookupError:
                        pass
        yield
    finally:
        for p in stopped:
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
