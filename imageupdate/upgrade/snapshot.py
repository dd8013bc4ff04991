"""Snapshots of a node's state, taken with the node stopped, verified by reading them back.

``NODE/snapshots/vN.tar.zst`` holds the state at version N with ``vN.json`` describing it. A snapshot is
written to a temporary name, read back with ``tar --compare`` against the state it was taken from (every
file's content, size, mode, owner and mtime), and only then renamed into place. A restore unpacks into a
sibling directory and swaps it with the state directory in one ``renameat2(RENAME_EXCHANGE)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from imageupdate.base.errors import OperationError
from imageupdate.base.files import exchange_paths

TAR = ["tar", "--zstd", "--numeric-owner", "--acls", "--xattrs", "--xattrs-include=*"]
JOURNAL_DIR = "imageupdate"  # the state journal's directory at the state's root (imageupdate.upgrade.state)
RESTORING = ".imageupdate-restoring"  # inside a mounted state: the snapshot's content, unpacked
REPLACED = ".imageupdate-replaced"  # inside a mounted state: what the snapshot replaces, until it is gone


@dataclass
class Snapshot:
    path: str
    state_version: int
    release: str
    taken: float
    bytes: int
    seconds: float
    verify_seconds: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _run(cmd: list[str], what: str, node: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise OperationError(f"{what} failed: {said[-1] if said else f'exit status {proc.returncode}'}",
                             node=node, step="snapshot")


def take(state_dir: Path, snapshots: Path, version: int, release: str, node: str) -> Snapshot:
    snapshots.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = snapshots / f"v{version}.tar.zst"
    tmp = snapshots / f".v{version}.tar.zst.tmp"
    t0 = time.monotonic()
    leftovers = [f"--exclude=./{name}" for name in (RESTORING, REPLACED)]  # of a restore killed half way
    _run([*TAR, "-cf", str(tmp), *leftovers, "-C", str(state_dir), "."], f"snapshot of {node}'s state", node)
    t1 = time.monotonic()
    _run([*TAR, "--compare", "-f", str(tmp), "-C", str(state_dir)],
         f"reading back the snapshot of {node}'s state", node)
    t2 = time.monotonic()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    snap = Snapshot(str(final), version, release, time.time(), final.stat().st_size, round(t1 - t0, 3),
                    round(t2 - t1, 3))
    (snapshots / f"v{version}.json").write_text(json.dumps(snap.to_dict(), indent=1) + "\n")
    return snap


def find(snapshots: Path, at_most: int) -> Snapshot | None:
    """The newest-version snapshot at or below state version ``at_most``."""
    best: Snapshot | None = None
    for meta in snapshots.glob("v*.json") if snapshots.is_dir() else []:
        snap = Snapshot(**json.loads(meta.read_text()))
        if snap.state_version <= at_most and Path(snap.path).is_file() and (
                best is None or snap.state_version > best.state_version):
            best = snap
    return best


def restore(snap: Snapshot, state_dir: Path, node: str) -> float:
    """Replace ``state_dir`` with the snapshot's content (the node must be stopped); return seconds taken."""
    t0 = time.monotonic()
    if os.path.ismount(state_dir):
        _restore_into_mount(snap, state_dir, node)
        return round(time.monotonic() - t0, 3)
    incoming = state_dir.with_name(state_dir.name + ".restoring")
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(mode=0o755)
    _run([*TAR, "-xpf", snap.path, "-C", str(incoming)], f"restoring {node}'s state from {snap.path}", node)
    os.chmod(incoming, state_dir.stat().st_mode & 0o7777)
    exchange_paths(incoming, state_dir)
    shutil.rmtree(incoming, ignore_errors=True)
    return round(time.monotonic() - t0, 3)


def _restore_into_mount(snap: Snapshot, state_dir: Path, node: str) -> None:
    """A VM node's state is a disk the host mounts at ``state_dir`` during a rebuild, and a mount point cannot
    be renamed (the exchange failed with EBUSY and left the rollback unfinished). The snapshot is unpacked
    inside the mount, what it replaces is moved aside, its entries moved up, and the state journal's
    directory exchanged last: until then the journal still names the contract step that made the restore
    needed, so a restore killed half way is done again from the start by the next run."""
    incoming, replaced = state_dir / RESTORING, state_dir / REPLACED
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)
    incoming.mkdir(mode=0o755)
    replaced.mkdir(mode=0o700)
    _run([*TAR, "-xpf", snap.path, "-C", str(incoming)], f"restoring {node}'s state from {snap.path}", node)
    aside = {RESTORING, REPLACED, JOURNAL_DIR}
    for entry in os.listdir(state_dir):
        if entry not in aside:
            os.rename(state_dir / entry, replaced / entry)
    for entry in os.listdir(incoming):
        if entry != JOURNAL_DIR:
            os.rename(incoming / entry, state_dir / entry)
    if (incoming / JOURNAL_DIR).exists() and (state_dir / JOURNAL_DIR).exists():
        exchange_paths(incoming / JOURNAL_DIR, state_dir / JOURNAL_DIR)
    elif (incoming / JOURNAL_DIR).exists():
        os.rename(incoming / JOURNAL_DIR, state_dir / JOURNAL_DIR)
    elif (state_dir / JOURNAL_DIR).exists():  # a snapshot without a journal: the state it restores had none
        os.rename(state_dir / JOURNAL_DIR, replaced / JOURNAL_DIR)
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)
