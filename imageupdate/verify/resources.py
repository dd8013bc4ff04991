"""Resource survival hooks: the operator's own fleet-level checks, in grenade's ``resources.sh`` phases.

A hooks directory holds executables (any language; names starting with ``.`` or ending in ``~`` are
ignored), run in name order, each called as ``SCRIPT PHASE``:

- ``create``: before the rollout touches anything; make the resources that must survive it;
- ``verify_noapi``: while a node is being rebuilt; check that what the rest of the fleet serves still works;
- ``verify``: after each node's rebuild, as part of its gate; check the resources are intact on it;
- ``destroy``: at the end (unless ``--keep-resources``); remove what ``create`` made.

Each run gets the site's facts in its environment (``IMAGEUPDATE_PHASE``, ``IMAGEUPDATE_NODE``,
``IMAGEUPDATE_NODE_ADDRESS``, ``IMAGEUPDATE_RELEASE``, ``IMAGEUPDATE_NODES`` as ``name=address ...``,
``IMAGEUPDATE_ROLLOUT``, ``IMAGEUPDATE_SSH_KEY``) and ``IMAGEUPDATE_KV``: the script's own directory in a
small key-value store, one file per key (``echo "$id" > "$IMAGEUPDATE_KV/id"`` in ``create``,
``cat "$IMAGEUPDATE_KV/id"`` later), which lasts from ``create`` to a successful ``destroy``. Exit status
0 passes; a run longer than the timeout is killed (its whole process group) and fails. Every run is a row
in the history.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base.errors import InputError
from imageupdate.verify.checks import CheckResult

PHASES = ("create", "verify_noapi", "verify", "destroy")
DEFAULT_TIMEOUT = 60.0
OUTPUT_LIMIT = 4000


class BadHooksDir(InputError):
    """The hooks directory is missing or holds something that cannot run."""


@dataclass(frozen=True)
class HookRun:
    script: str
    phase: str
    node: str | None
    ok: bool
    started: float
    seconds: float
    output: str

    def as_check(self) -> CheckResult:
        return CheckResult(f"resources:{self.script}:{self.phase}", self.ok, round(self.seconds, 3), self.output)


def scripts(directory: Path) -> list[Path]:
    """The hook scripts of ``directory``, in name order; a bad directory is bad input."""
    if not directory.is_dir():
        raise BadHooksDir(f"resource hooks directory {directory} does not exist: create it or drop --resources")
    found = [p for p in sorted(directory.iterdir()) if not p.name.startswith(".") and not p.name.endswith("~")]
    for p in found:
        if not p.is_file():
            raise BadHooksDir(f"resource hook {p} is not a regular file: remove it from {directory}")
        if not os.access(p, os.X_OK):
            raise BadHooksDir(f"resource hook {p} is not executable: chmod +x {p}")
    if not found:
        raise BadHooksDir(f"resource hooks directory {directory} holds no scripts")
    return found


class ResourceHooks:
    def __init__(self, directory: Path, kv_root: Path, timeout: float = DEFAULT_TIMEOUT,
                 env: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.scripts = scripts(self.directory)
        self.kv_root = Path(kv_root)
        self.timeout = timeout
        self.env = env or {}

    def kv(self, script: str) -> Path:
        return self.kv_root / script

    def run(self, phase: str, node: str | None = None, env: dict[str, str] | None = None) -> list[HookRun]:
        """Every script in ``phase``; all run even after a failure (the evidence is the point)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase}")
        return [self._run_one(script, phase, node, env or {}) for script in self.scripts]

    def forget(self) -> None:
        """Drop the key-value store (after a destroy that passed)."""
        shutil.rmtree(self.kv_root, ignore_errors=True)

    def _run_one(self, script: Path, phase: str, node: str | None, extra: dict[str, str]) -> HookRun:
        kv = self.kv(script.name)
        kv.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, **extra, "IMAGEUPDATE_PHASE": phase, "IMAGEUPDATE_KV": str(kv)}
        if node is not None:
            env["IMAGEUPDATE_NODE"] = node
        started, t0 = time.time(), time.monotonic()
        proc = subprocess.Popen([str(script), phase], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=str(self.directory), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=self.timeout)
            ok = proc.returncode == 0
            said = out.decode(errors="replace").strip()
            if not ok:
                said = f"{said} (exit status {proc.returncode})" if said else f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # something left the group and holds the pipe
                proc.kill()
                out = b""
            said = out.decode(errors="replace").strip()
            ok = False
            said = (said + "\n" if said else "") + f"timed out after {self.timeout:g} s (killed)"
        run = HookRun(script.name, phase, node, ok, started, time.monotonic() - t0, said[-OUTPUT_LIMIT:])
        return run


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
