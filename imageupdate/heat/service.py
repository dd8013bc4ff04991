"""Start, find and stop the ephemeral Heat of a local site.

``HeatService(SITE/heat)`` starts ``imageupdate.heat.server`` on a free loopback port when none answers,
reuses one that does (its pid and port are in ``heat.json``), and stops it with a bound: SIGTERM, then
SIGKILL. The stacks live in ``heat.sqlite`` beside it, so they outlive both imageupdate and Heat.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base import locks, procs
from imageupdate.base.errors import OperationError
from imageupdate.heat import config, secret
from imageupdate.heat.config import HeatPaths

START_TIMEOUT = 60.0  # measured 2 to 6 s from start to first answer; a cold import of Heat is the slow part
STOP_GRACE = 15.0  # an idle engine exits in about 5 s on SIGTERM; a stuck one is killed after this


class HeatUnavailable(OperationError):
    """The local Heat did not start or does not answer."""


@dataclass(frozen=True)
class HeatProcess:
    pid: int
    port: int
    started: float

    @property
    def endpoint(self) -> str:
        return config.endpoint(self.port)

    @property
    def instance(self) -> str:
        """Identifies this Heat process: a different one means Heat restarted since."""
        return f"{self.pid}@{self.started:.3f}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _guarded(port: int) -> bool:
    """Whether the Heat on ``port`` refuses a request without the site's secret. One started by an
    imageupdate older than the secret answers anyone: it is not reused but replaced (stacks stay in its
    database; an operation in flight survives a Heat restart)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/imageupdate/stacks", timeout=2):
            return False
    except urllib.error.HTTPError as e:
        return e.code == 401
    except (urllib.error.URLError, OSError):
        return True  # not answering now: running() decides on the healthcheck


class HeatService:
    def __init__(self, root: Path, sleep: Callable[[float], None] = time.sleep) -> None:
        self.paths = HeatPaths(Path(root))
        self.sleep = sleep

    def running(self) -> HeatProcess | None:
        """The Heat of this site if its process lives and its API answers."""
        try:
            data = json.loads(self.paths.state.read_text())
        except (OSError, ValueError):
            return None
        proc = HeatProcess(int(data["pid"]), int(data["port"]), float(data["started"]))
        if procs.alive(proc.pid) and "imageupdate.heat.server" in procs.cmdline(proc.pid) \
                and _answers(proc.port) and _guarded(proc.port):
            return proc
        return None

    def ensure(self) -> HeatProcess:
        """The running Heat, started first if needed (one starter at a time)."""
        if (proc := self.running()) is not None:
            return proc
        self.paths.root.mkdir(parents=True, exist_ok=True)
        with locks.held(self.paths.lock):
            if (proc := self.running()) is not None:
                return proc
            return self._start()

    def _start(self) -> HeatProcess:
        self._kill_leftover()
        port = _free_port()
        config.write(self.paths, port)
        with open(self.paths.root / "server.log", "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "imageupdate.heat.server", "--config-file", str(self.paths.conf),
                 "--port", str(port), "--state", str(self.paths.state)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        ok = procs.wait_until(lambda: self.running() is not None or child.poll() is not None, START_TIMEOUT,
                              interval=0.1, sleep=self.sleep)
        proc = self.running()
        if not ok or proc is None:
            if child.poll() is None:
                procs.stop(child.pid, 2.0)
            said = f"exited with status {child.returncode}" if child.poll() is not None \
                else f"did not answer within {START_TIMEOUT:.0f} s"
            raise HeatUnavailable(f"the local Heat {said} (see {self.paths.log} and {self.paths.root / 'server.log'})",
                                  step="heat")
        return proc

    def _kill_leftover(self) -> None:
        """A Heat whose API stopped answering but whose process lives: stop it before starting another."""
        try:
            pid = int(json.loads(self.paths.state.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return
        if procs.alive(pid) and "imageupdate.heat.server" in procs.cmdline(pid):
            procs.stop(pid, STOP_GRACE, sleep=self.sleep)
        self.paths.state.unlink(missing_ok=True)

    def secret(self) -> str:
        """What this Heat wants as X-Auth-Token (made with its config)."""
        return secret.ensure(self.paths.secret)

    def stop(self) -> str:
        try:
            pid = int(json.loads(self.paths.state.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return "not running"
        if not procs.alive(pid) or "imageupdate.heat.server" not in procs.cmdline(pid):
            self.paths.state.unlink(missing_ok=True)
            return "not running"
        how = procs.stop(pid, STOP_GRACE, sleep=self.sleep)
        self.paths.state.unlink(missing_ok=True)
        return how

