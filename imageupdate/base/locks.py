"""flock(2) locks: wait for one with a bound, or try once."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable

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
