"""A rehearsal: the whole migration path on a copy of a node's state, timed; nothing on the fleet changes.

The copy is taken with the node's processes frozen (SIGSTOP), so it is crash-consistent (SQLite
recovers a copy taken mid-transaction from its journal, as after a power cut) and the node only pauses
for the copy. Every step runs from its release's image (``sandbox``) on the copy, then runs again: a step
that changes the state a second time is not idempotent, and a resumed migration would corrupt data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageupdate.errors import OperationError
from imageupdate.upgrade import sandbox
from imageupdate.upgrade.meta import Migration
from imageupdate.upgrade.plan import UpgradePlan

RunStep = Callable[[Migration, Path], sandbox.RunResult]


class RehearsalFailed(OperationError):
    """A migration failed, or is not idempotent, on the rehearsal copy."""


@dataclass
class StepRehearsal:
    release: str
    migration: str
    kind: str
    state_version: int
    ok: bool
    seconds: float
    rerun_seconds: float | None = None  # the second run and the two comparisons of the state
    idempotent: bool | None = None
    changed: list[str] = field(default_factory=list)  # what the second run changed
    output: str = ""


@dataclass
class Rehearsal:
    node: str
    target: str
    from_state: int | None
    to_state: int | None
    state_bytes: int
    copy_seconds: float
    prepare_seconds: float = 0.0  # unpacking the releases' images, once per site
    steps: list[StepRehearsal] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        out = []
        for s in self.steps:
            if not s.ok:
                out.append(f"migration {s.migration} of {s.release} failed on the copy of {self.node}'s state: "
                           f"{_last(s.output)}")
            elif s.idempotent is False:
                out.append(f"migration {s.migration} of {s.release} is not idempotent: running it twice on the "
                           f"copy of {self.node}'s state changed {', '.join(s.changed[:3])} again")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "problems": self.problems}


def _last(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its type, mode, owner and content hash."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            what = f"{st.st_mode:o} {st.st_uid}:{st.st_gid}"
            if p.is_symlink():
                what += " -> " + os.readlink(p)
            elif p.is_file():
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                what += " " + h.hexdigest()
            out[rel] = what
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def copy_state(src: Path, dst: Path) -> None:
    proc = subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", str(dst)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise OperationError(f"copying {src} for the rehearsal failed: {_last(proc.stderr)}", step="rehearse")


def rehearse(node: str, upgrade: UpgradePlan, copy: Callable[[Path], None], workdir: Path,
             run_step: RunStep, prepare: Callable[[], object] | None = None) -> Rehearsal:
    """``copy(dst)`` fills ``dst`` with the node's state; ``run_step(step, state_dir)`` runs one step;
    ``prepare()`` makes the releases' images ready (unpacks them), timed apart."""
    shutil.rmtree(workdir, ignore_errors=True)
    state_dir = workdir / "state"
    state_dir.mkdir(parents=True)
    t0 = time.monotonic()
    try:
        copy(state_dir)
        size = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file() and not f.is_symlink())
        report = Rehearsal(node, upgrade.target, upgrade.from_state, upgrade.to_state, size,
                           round(time.monotonic() - t0, 3))
        if prepare is not None:
            t1 = time.monotonic()
            prepare()
            report.prepare_seconds = round(time.monotonic() - t1, 3)
        for step in upgrade.steps:
            first = run_step(step, state_dir)
            result = StepRehearsal(step.release, step.name, step.kind, step.state_version, first.ok,
                                   round(first.seconds, 3), output=first.output[-4000:])
            report.steps.append(result)
            if not first.ok:
                break
            t1 = time.monotonic()
            before = digest(state_dir)
            again = run_step(step, state_dir)
            result.changed = changed(before, digest(state_dir))
            result.rerun_seconds = round(time.monotonic() - t1, 3)
            result.idempotent = again.ok and not result.changed
            if not again.ok:
                result.output += f"\n(second run failed: {_last(again.output)})"
                result.changed = result.changed or ["(the second run failed)"]
            if not result.idempotent:
                break
        report.seconds = round(time.monotonic() - t0, 3)
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
