"""Bring a stopped node's state to what a release needs: migrate forward, or restore on the way back.

Forward (the target needs a newer state version): under the site's migration lock (one migrator per
site), snapshot the state and read the snapshot back, then run every step of the upgrade path from its
own release's image (``sandbox``), recording each step in the state's journal before and after it runs.
A failed step stops the path, names the step, and the node's state is brought back to the release it
came from. A killed run leaves the step marked started: the next run (``imageupdate resume``) skips the
finished steps and runs that one again (steps are idempotent).

Backward (a rollback to a release on an older state version): if only expand steps ran since, the state
stays as it is (the old code works on it); if a contract step ran (or began), the newest snapshot at or
below the target's state version is restored, and the journal says so. Never old code on new state.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageupdate.base import locks
from imageupdate.base.crashpoints import crashpoint
from imageupdate.base.errors import OperationError
from imageupdate.images import upgrade_meta
from imageupdate.images.store import ImageStore
from imageupdate.images.unpack import ensure_release
from imageupdate.images.upgrade_meta import Migration, ReleaseMeta
from imageupdate.upgrade import sandbox, snapshot, state
from imageupdate.upgrade.catalog import catalog
from imageupdate.upgrade.plan import plan as plan_path

STEP_TIMEOUT = 600.0
LOCK_WAIT = 900.0


class MigrationFailed(OperationError):
    """A migration step failed; the state is at the last completed version (or restored)."""


class StateIncompatible(OperationError):
    """A release cannot run on a node's state and there is no way back (no snapshot)."""


@dataclass
class StateChange:
    """What preparing the state did, for the rebuild's report."""

    from_version: int | None = None
    to_version: int | None = None
    snapshot: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    restored: dict[str, Any] | None = None
    kept: str | None = None  # why the state was kept on the way back

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [])}


class Migrator:
    def __init__(self, site: Path, store: ImageStore, node: str, state_dir: Path, snapshots: Path,
                 preferred: set[str] | None = None, step_timeout: float = STEP_TIMEOUT,
                 lock_wait: float = LOCK_WAIT, sleep: Callable[[float], None] = time.sleep) -> None:
        self.site = site
        self.store = store
        self.node = node
        self.state_dir = state_dir
        self.snapshots = snapshots
        self.preferred = preferred or set()
        self.step_timeout = step_timeout
        self.lock_wait = lock_wait
        self.sleep = sleep
        self.releases_dir = site / "releases"
        self.log = state_dir.parent / "migrations.log"

    def meta(self, release: str) -> ReleaseMeta | None:
        return catalog_meta(self.store, release)

    def prepare(self, current: str, target: str) -> StateChange:
        """Make the state fit ``target`` (the node is stopped and runs ``current``)."""
        tgt = self.meta(target)
        rec = state.read(self.state_dir)
        cur = self.meta(current)
        version = rec.version if rec.version is not None else (cur.state_version if cur else None)
        change = StateChange(version, version)
        if tgt is None or version is None:
            return change
        if version < tgt.state_version or (rec.interrupted() and self._forward_of(rec, tgt)):
            self._forward(current, target, version, change)
        elif version > tgt.state_version or rec.interrupted():
            self._backward(current, target, tgt, change)
        return change

    def prefetch(self, current: str, target: str) -> list[str]:
        """Unpack every release whose migrations the path to ``target`` runs, before the node stops (an unpack
        is seconds; the node should not be down for it). Returns those releases."""
        tgt = self.meta(target)
        version = state.read(self.state_dir).version
        if tgt is None or version is None or version >= tgt.state_version:
            return []
        path = plan_path(catalog(self.store), current, version, target, self.preferred, str(self.store.root))
        for release in path.releases:
            ensure_release(self.store, release, self.releases_dir, self.site)
        return path.releases

    @staticmethod
    def _forward_of(rec: state.StateRecord, tgt: ReleaseMeta) -> bool:
        return all(s.state_version <= tgt.state_version for s in rec.interrupted())

    # forward -----------------------------------------------------------------------------------------

    def _forward(self, current: str, target: str, version: int, change: StateChange) -> None:
        path = plan_path(catalog(self.store), current, version, target, self.preferred, str(self.store.root))
        with self._locked():
            rec = state.read(self.state_dir)
            if not rec.interrupted():
                snap = snapshot.take(self.state_dir, self.snapshots, version, current, self.node)
                change.snapshot = snap.to_dict()
                state.event(self.state_dir, "snapshot", version=version, path=snap.path, seconds=snap.seconds,
                            verify_seconds=snap.verify_seconds)
                self._log(f"snapshot of the state at version {version}: {snap.path} ({snap.bytes} bytes, "
                          f"{snap.seconds:.2f} s, read back in {snap.verify_seconds:.2f} s)")
            for step in path.steps:
                rec = state.read(self.state_dir)
                if rec.done(step.release, step.name) and (rec.version or 0) >= step.state_version:
                    continue
                result = self._run(step)
                change.steps.append({"release": step.release, "migration": step.name, "kind": step.kind,
                                     "state_version": step.state_version, "ok": result.ok,
                                     "seconds": round(result.seconds, 3)})
                if not result.ok:
                    said = [x for x in result.output.splitlines() if x.strip()]
                    why = said[-1] if said else f"exit status {result.returncode}"
                    at = state.read(self.state_dir).version
                    error = MigrationFailed(
                        f"migration {step.name} of {step.release} ({step.kind}) failed on {self.node}: {why}; "
                        f"the state stays at version {at} (last completed step)",
                        node=self.node, release=step.release, step=f"migration {step.name}")
                    self._log(error.message)
                    raise error
                change.to_version = step.state_version

    def _run(self, step: Migration) -> sandbox.RunResult:
        rec = state.read(self.state_dir)
        # an interrupted run of this step (or of another release's step to the same version) is superseded
        rec.steps = [s for s in rec.steps if not (s.finished is None and s.state_version == step.state_version)]
        record = state.StepRecord(step.release, step.name, step.state_version, step.kind, time.time())
        rec.steps.append(record)
        state.write(self.state_dir, rec)
        tree = ensure_release(self.store, step.release, self.releases_dir, self.site)
        self._log(f"running {step.name} ({step.kind}, state version {step.state_version}) from {step.release}")
        result = sandbox.run(tree, self.state_dir, [step.path], self.site / "upgrade" / "sandbox",
                             self.step_timeout, on_start=lambda: crashpoint(f"migration:{step.name}"))
        self._log(result.output.rstrip() or "(no output)")
        rec = state.read(self.state_dir)
        for s in rec.steps:
            if s.finished is None and s.migration == step.name and s.release == step.release:
                s.finished, s.ok, s.output = time.time(), result.ok, result.output[-4000:]
        if result.ok:
            rec.version = step.state_version
        state.write(self.state_dir, rec)
        return result

    # backward ----------------------------------------------------------------------------------------

    def _backward(self, current: str, target: str, tgt: ReleaseMeta, change: StateChange) -> None:
        rec = state.read(self.state_dir)
        contract = state.contract_after(rec, tgt.state_version)
        if contract is None and not rec.interrupted():
            change.kept = (f"only expand steps ran since state version {tgt.state_version}: {target}'s code "
                           f"works on state version {rec.version}; the state is kept")
            self._log(change.kept)
            return
        snap = snapshot.find(self.snapshots, tgt.state_version)
        why = (f"contract migration {contract.migration} of {contract.release}" if contract is not None
               else f"interrupted migration {rec.interrupted()[0].migration}")
        if snap is None:
            raise StateIncompatible(
                f"{target} cannot run on {self.node}'s state (version {rec.version}, {why}) and there is no "
                f"snapshot at state version {tgt.state_version} or below in {self.snapshots}; roll forward "
                f"or restore the state by hand", node=self.node, release=target, step="restore")
        with self._locked():
            seconds = snapshot.restore(snap, self.state_dir, self.node)
        lost = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.taken))
        change.restored = {"snapshot": snap.path, "state_version": snap.state_version, "taken": snap.taken,
                           "seconds": seconds, "because": why}
        state.event(self.state_dir, "restored", path=snap.path, version=snap.state_version, because=why,
                    from_version=rec.version, seconds=seconds)
        self._log(f"restored the snapshot {snap.path} (state version {snap.state_version}, taken {lost}) "
                  f"because {why} ran: changes to {self.node}'s state since {lost} are gone")
        change.to_version = snap.state_version
        if snap.state_version < tgt.state_version:  # an older snapshot: migrate up to the target again
            self._forward(current, target, snap.state_version, change)

    # plumbing ----------------------------------------------------------------------------------------

    def _locked(self) -> _MigrateLock:
        return _MigrateLock(self.site / "upgrade" / "migrate.lock", self.node, self.lock_wait, self.sleep)

    def _log(self, message: str) -> None:
        with open(self.log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}\n")


def catalog_meta(store: ImageStore, release: str) -> ReleaseMeta | None:
    return upgrade_meta.from_manifest(store.manifest(release).upgrade)


class _MigrateLock:
    """One migrator per site: ``SITE/upgrade/migrate.lock`` (flock), holding the node it migrates."""

    def __init__(self, path: Path, node: str, wait: float, sleep: Callable[[float], None]) -> None:
        self.path, self.node, self.wait, self.sleep = path, node, wait, sleep
        self.fd = -1

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not locks.flock_wait(self.fd, fcntl.LOCK_EX, self.wait, self.sleep):
            owner = os.pread(self.fd, 128, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise OperationError(f"another migration holds {self.path} ({owner}) for more than {self.wait:.0f} s",
                                 node=self.node, step="migrate")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {self.node}\n".encode(), 0)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
