"""Processes seen from the host: liveness that ignores zombies, bounded stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from imageupdate.base.crashpoints import crashpoint
from imageupdate.base.errors import OperationError

FREEZE_BOUND = 300.0  # seconds a frozen tree stays stopped at most, whatever happens to the one that froze it


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces, parentheses and bytes
    that are not UTF-8: everything up to the last ')'), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[-1].decode("ascii", errors="replace").split()
    return fields if len(fields) >= 2 else None


def start_time(pid: int) -> str | None:
    """When a live, non-zombie process started (field 22 of /proc/PID/stat, in clock ticks since boot): with
    the pid, it names one process across pid reuse. None if there is no such process or it is a zombie."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == "Z" or len(fields) < 20:
        return None
    return fields[19]


def state(pid: int) -> str | None:
    """The process state letter, or None if there is no such process."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def alive(pid: int | None) -> bool:
    """True for a live process; PID 1 here reaps late, so a zombie counts as dead."""
    return bool(pid) and state(pid) not in (None, "Z")  # type: ignore[arg-type]


def stopped(pid: int) -> bool:
    """True for a process stopped by a signal (state ``T``: SIGSTOP; not ``t``, a debugger's stop)."""
    return state(pid) == "T"


def parent(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """The process's children; none once it has gone (it may exit while it is read: not an error)."""
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except (OSError, ValueError):
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


def kill_all(pids: list[int], wait: float = 5.0, sleep: Callable[[float], None] = time.sleep) -> int:
    """SIGKILL each of ``pids`` and wait up to ``wait`` seconds for them to go; how many were signalled."""
    hit = []
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            hit.append(pid)
    if hit:
        wait_until(lambda: not any(alive(p) for p in hit), wait, sleep=sleep)
    return len(hit)


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def _all_stopped(pids: list[int]) -> bool:
    return all(state(p) in (None, "T", "t", "Z", "X") for p in pids)


class FreezeExpired(OperationError):
    """The watchdog continued a frozen tree before the block ended (the block outlasted its bound, or the
    watchdog was killed): what the block read is not crash-consistent."""


# The watchdog of ``frozen``: continues every pid it was given (that is still stopped) when its stdin
# reaches EOF (the one that froze the tree is done, or died: the kernel closes the pipe's end) or its
# deadline (argv[1] seconds) passes, whichever comes first. It runs with -I -S: no site, no environment.
_WATCHDOG = r"""
import os, select, signal, sys, time

class Stop(Exception):
    pass

def stop(signum, frame):
    raise Stop()

def stopped(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] == b"T"
    except (OSError, IndexError):
        return False

deadline = time.monotonic() + float(sys.argv[1])
pids, buf = [], b""

def take(chunk):
    global buf
    *lines, buf = (buf + chunk).split(b"\n")
    pids.extend(int(x) for x in lines if x.strip().isdigit())

try:
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([0], [], [], left)[0]:
            break
        chunk = os.read(0, 65536)
        if not chunk:
            break
        take(chunk)
except Stop:
    pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
try:
    os.set_blocking(0, False)
    while chunk := os.read(0, 65536):
        take(chunk)
except OSError:
    pass
take(b"\n")
for pid in pids:
    if stopped(pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
"""


def _watchdog(bound: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, repr(float(bound))],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True, cwd="/", env={})


@contextmanager
def frozen(pid: int | None, bound: float = FREEZE_BOUND) -> Iterator[None]:
    """Stop ``pid``'s whole process tree (SIGSTOP, which nothing can catch) and continue it afterwards:
    what it writes to disk is crash-consistent while frozen. Rescans until no new process appears.

    Whoever dies, the tree is continued: a watchdog process (its own session, started before anything is
    stopped) is told each pid before it is stopped, and continues those still stopped when we are done or
    dead (its pipe from us reaches EOF) or after ``bound`` seconds (a hung caller must not freeze a node
    forever). A block that outlasts ``bound`` raises ``FreezeExpired`` as it ends: the tree ran under it."""
    if pid is None or not alive(pid):
        yield
        return
    watchdog = _watchdog(bound)
    assert watchdog.stdin is not None
    pipe = watchdog.stdin
    t0 = time.monotonic()
    held: list[int] = []
    ended = False
    try:
        while True:
            new = [p for p in tree(pid) if p not in held]
            if not new:
                break
            for p in new:
                pipe.write(f"{p}\n".encode())  # told first: dying between the two leaves nothing stopped
                pipe.flush()
                try:
                    os.kill(p, signal.SIGSTOP)
                    held.append(p)
                except ProcessLookupError:
                    pass
            # SIGSTOP lands asynchronously (a process running on another CPU, or in a disk wait, runs on a
            # little): wait, bounded, until each has stopped, so the rescan sees every child it forked
            wait_until(partial(_all_stopped, new), 2.0, interval=0.002)
        crashpoint("in-freeze")
        yield
        ended = True
    finally:
        for p in held:
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        expired = time.monotonic() - t0 >= bound or watchdog.poll() is not None
        with suppress(OSError):
            pipe.close()
        try:
            watchdog.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()
    if ended and expired:
        raise FreezeExpired(f"process {pid}'s tree was continued by its watchdog before the frozen block ended "
                            f"(bound {bound:g} s): what the block read is not crash-consistent", step="freeze")
