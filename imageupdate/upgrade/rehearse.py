"""A rehearsal: the whole migration path on a copy of a node's state, timed; nothing on the fleet changes.

The copy is taken with the node's processes frozen (SIGSTOP), so it is crash-consistent (SQLite
recovers a copy taken mid-transaction from its journal, as after a power cut) and the node only pauses
for the copy. Every step runs from its release's image (``sandbox``) on the copy, then runs again: a step
that changes the state a second time is not idempotent, and a resumed migration would corrupt data.

What "changes the state" means is the step's release's to say, because only it knows its state::

    run step -> digest A -> run step again -> digest B -> A == B ?

* The release ships ``/usr/share/imageupdate/state-digest`` (``images.upgrade_meta.STATE_DIGEST``): it runs in the
  release's sandbox on the copy, bounded (``STATE_DIGEST_TIMEOUT``), and its stdout is the digest (say,
  a database's schema and row checksums); the first differing lines are what changed. A digest that
  fails, times out or prints nothing fails the rehearsal naming it: a check that cannot be taken is not
  a pass. Whether a release ships one is read from its unpacked tree (the rehearsal unpacks every
  release of the path anyway, and what is looked at is what runs), so the manifest needs no new field
  and releases built before it are judged as they always were.
* Otherwise every file of the copy (``digest``: type, mode, owner, content), without the release's
  ``volatile`` paths and what is beneath them. A database rewrites its control file, WAL and statistics
  whenever it starts, so a database's migration needs a state digest; a migration that adds a row on
  every run is caught either way (by the rows, or by the bytes).

The seams (``RunStep``, ``DigestStep``) keep this module free of root and namespaces: unit tests pass
plain functions, ``LocalFleet.rehearse`` passes ``sandbox.run`` on the unpacked release.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageupdate.base import locks
from imageupdate.base.errors import OperationError
from imageupdate.images.upgrade_meta import STATE_DIGEST, Migration, under
from imageupdate.upgrade import sandbox
from imageupdate.upgrade.plan import UpgradePlan

RunStep = Callable[[Migration, Path], sandbox.RunResult]
# (release, state_dir) -> the release's state digest run on state_dir (stdout apart), or None: it ships none
DigestStep = Callable[[str, Path], "sandbox.RunResult | None"]
STATE_DIGEST_TIMEOUT = 120.0
MAX_CHANGED = 10  # differing lines of a state digest kept in a report
MAX_LINE = 200


class RehearsalFailed(OperationError):
    """A migration failed, or is not idempotent, on the rehearsal copy."""


@dataclass
class StepRehearsal:
    release: str
    migration: str
    kind: str
    state_version: int
    ok: bool  # it ran, and the state's digest could be taken after it
    seconds: float
    rerun_seconds: float | None = None  # the second run and the two digests of the state
    idempotent: bool | None = None
    changed: list[str] = field(default_factory=list)  # what the second run changed: paths, or digest lines
    output: str = ""
    digest: str = "files"  # what was compared: "files" (the file digest) or "state-digest" (the release's)
    digest_error: str | None = None  # why the release's state digest could not be taken


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
            if s.digest_error is not None:
                out.append(f"state digest {STATE_DIGEST} of {s.release} failed on the copy of {self.node}'s "
                           f"state: {s.digest_error}")
            elif not s.ok:
                out.append(f"migration {s.migration} of {s.release} failed on the copy of {self.node}'s state: "
                           f"{_last(s.output)}")
            elif s.idempotent is False and s.digest == "state-digest" and s.changed[:1] != [_SECOND_FAILED]:
                out.append(f"migration {s.migration} of {s.release} is not idempotent: running it twice on the "
                           f"copy of {self.node}'s state changed its state digest ({STATE_DIGEST}): "
                           f"{'; '.join(s.changed[:4])}")
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


_SECOND_FAILED = "(the second run failed)"


def digest(root: Path, leave_out: Sequence[str] = ()) -> dict[str, str]:
    """Every path under ``root`` with its type, mode, owner and content hash; ``leave_out`` are node paths
    (``/var/lib/x``, i.e. ``root/var/lib/x``) left out with everything beneath them."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if leave_out:
            dirnames[:] = [d for d in dirnames
                           if not under("/" + str((Path(dirpath) / d).relative_to(root)), leave_out)]
        for name in [*dirnames, *sorted(filenames)]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if leave_out and under("/" + rel, leave_out):
                continue
            st = p.lstat()
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


def changed_lines(before: str, after: str) -> list[str]:
    """The first lines that differ between two state digests, ``-`` before and ``+`` after (bounded)."""
    diff = [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), n=0, lineterm="")
            if not line.startswith(("---", "+++", "@@"))]
    out = [line if len(line) <= MAX_LINE else line[:MAX_LINE] + "..." for line in diff[:MAX_CHANGED]]
    if len(diff) > MAX_CHANGED:
        out.append(f"(and {len(diff) - MAX_CHANGED} more lines)")
    return out


@dataclass
class _Taken:
    """One digest of the state: the release's (its stdout) or the files', or why it could not be taken."""

    kind: str
    text: str = ""
    files: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def _take(release: str, state_dir: Path, digest_step: DigestStep | None, leave_out: Sequence[str]) -> _Taken:
    result = digest_step(release, state_dir) if digest_step is not None else None
    if result is None:
        return _Taken("files", files=digest(state_dir, leave_out))
    if result.returncode == -9:  # killed at its bound: "killed after 120 s" is the last line
        return _Taken("state-digest", error=_last(f"{result.output}\n{result.errors}"))
    if not result.ok:
        return _Taken("state-digest", error=f"exit {result.returncode}: {_last(result.errors or result.output)}")
    if not result.output.strip():
        return _Taken("state-digest", error="it printed nothing on stdout"
                      + (f" ({_last(result.errors)})" if result.errors.strip() else ""))
    return _Taken("state-digest", text=result.output)


def copy_state(src: Path, dst: Path) -> None:
    proc = subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", str(dst)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise OperationError(f"copying {src} for the rehearsal failed: {_last(proc.stderr)}", step="rehearse")


def rehearse(node: str, upgrade: UpgradePlan, copy: Callable[[Path], None], workdir: Path,
             run_step: RunStep, prepare: Callable[[], object] | None = None,
             digest_step: DigestStep | None = None, volatile: Mapping[str, Sequence[str]] | None = None) -> Rehearsal:
    """``copy(dst)`` fills ``dst`` with the node's state; ``run_step(step, state_dir)`` runs one step;
    ``prepare()`` makes the releases' images ready (unpacks them), timed apart; ``digest_step(release,
    state_dir)`` runs the release's state digest (None: it ships none, or no digest_step: the file digest,
    without ``volatile[release]``).

    ``workdir`` (mode 0700: it holds a copy of the node's private state, SSH host keys and all) is removed
    when the rehearsal ends, pass or fail; nothing in the returned report points into it. A rehearsal that
    is killed leaves it behind for ``discard_leftovers``. While the rehearsal runs, it holds an flock on
    ``_lock_path(workdir)``: a second rehearsal in the same place is refused and ``discard_leftovers``
    leaves a running one alone."""
    lock = _lock(workdir)
    if not locks.try_flock(lock, fcntl.LOCK_EX):
        os.close(lock)
        raise OperationError(f"a rehearsal on {node} is already running (it holds {_lock_path(workdir)})",
                             node=node, step="rehearse")
    try:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(mode=0o700)
        os.chmod(workdir, 0o700)  # whatever the umask
        return _rehearse(node, upgrade, copy, workdir, run_step, prepare, digest_step, volatile)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        os.close(lock)


def _lock_path(workdir: Path) -> Path:
    """Beside the rehearsals' directory, not in it: a finished rehearsal leaves that directory empty."""
    return workdir.parent.parent / f".rehearsal-{workdir.name}.lock"


def _lock(workdir: Path) -> int:
    workdir.parent.mkdir(parents=True, exist_ok=True)
    return os.open(_lock_path(workdir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def discard_leftovers(root: Path) -> list[str]:
    """Remove what killed rehearsals left under ``root`` (``SITE/upgrade/rehearsal``: one work directory
    per node, holding a copy of its state) and return the paths removed. A rehearsal still running (its
    lock held) is left alone; the lock files (beside ``root``) stay, empty."""
    removed: list[str] = []
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".lock"):
            continue
        lock = _lock(entry)
        try:
            if not locks.try_flock(lock, fcntl.LOCK_EX):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            if not os.path.lexists(entry):
                removed.append(str(entry))
        finally:
            os.close(lock)
    return removed


def _rehearse(node: str, upgrade: UpgradePlan, copy: Callable[[Path], None], workdir: Path,
              run_step: RunStep, prepare: Callable[[], object] | None,
              digest_step: DigestStep | None, volatile: Mapping[str, Sequence[str]] | None) -> Rehearsal:
    state_dir = workdir / "state"
    state_dir.mkdir()
    t0 = time.monotonic()
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
        leave_out = (volatile or {}).get(step.release, ())
        before = _take(step.release, state_dir, digest_step, leave_out)
        result.digest, error = before.kind, before.error
        if error is None:
            again = run_step(step, state_dir)
            if again.ok:
                after = _take(step.release, state_dir, digest_step, leave_out)
                error = after.error
                result.changed = (changed(before.files, after.files) if before.kind == "files"
                                  else changed_lines(before.text, after.text))
            else:
                result.output += f"\n(second run failed: {_last(again.output)})"
                result.changed = [_SECOND_FAILED]
            result.idempotent = not result.changed
        result.rerun_seconds = round(time.monotonic() - t1, 3)
        if error is not None:
            result.ok, result.digest_error, result.idempotent, result.changed = False, error, None, []
            result.output += f"\n(state digest {STATE_DIGEST} failed: {error})"
        if not result.ok or not result.idempotent:
            break
    report.seconds = round(time.monotonic() - t0, 3)
    return report
