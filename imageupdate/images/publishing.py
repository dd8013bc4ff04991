"""Writing the image store: builds staged in private, published by one rename, deleted the same way, one lock.

A build writes into ``STORE/.staging/RELEASE.PID.RANDOM/`` (with an ``owner`` file: its pid and start
time), never read as a release. Once verified, the staged directory becomes ``STORE/RELEASE/`` by one
``rename(2)``; ``--force`` swaps it with the old one by ``renameat2(RENAME_EXCHANGE)``, so a reader sees the
old release or the new one, never a mix or nothing. A deletion renames the release into the staging area
first. Staged directories whose owner died (SIGKILL, power loss) are swept on the next build. Every change
of the published names holds ``STORE/.lock``.

The functions take paths the store has already checked (``ImageStore.path`` refuses a hostile release id).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from imageupdate.base import locks, procs
from imageupdate.base.errors import ReleaseExists, StoreNotWritable
from imageupdate.base.files import exchange_paths, fsync_dir

STAGING = ".staging"


def ensure_writable(root: Path) -> None:
    try:
        (root / STAGING).mkdir(parents=True, exist_ok=True)
        probe = root / STAGING / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreNotWritable(
            f"image store {root} is not writable ({exc.strerror}); "
            "choose another with --store or IMAGEUPDATE_STORE, or fix its permissions"
        ) from exc


@contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """``STORE/.lock``, held while the published names change."""
    hold = ExitStack()
    try:
        root.mkdir(parents=True, exist_ok=True)
        hold.enter_context(locks.held(root / ".lock"))
    except OSError as exc:
        raise StoreNotWritable(f"image store {root} is not writable ({exc.strerror}); choose another "
                               "with --store or IMAGEUPDATE_STORE, or fix its permissions") from None
    with hold:
        yield


@contextmanager
def staging(root: Path, release: str) -> Iterator[Path]:
    """A private directory for one build of ``release`` (a checked id); removed unless published."""
    ensure_writable(root)
    sweep_stale(root)
    stage = root / STAGING / f"{release}.{os.getpid()}.{secrets.token_hex(4)}"
    stage.mkdir()
    start = procs.start_time(os.getpid()) or "0"
    (stage / "owner").write_text(f"{os.getpid()} {start}\n")
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def sweep_stale(root: Path) -> list[str]:
    """Remove staged builds whose owning process is gone."""
    removed: list[str] = []
    base = root / STAGING
    if not base.is_dir():
        return removed
    for stage in base.iterdir():
        if not stage.is_dir():
            continue
        # NAME is RELEASE.PID.RANDOM; the owner file adds the start time
        # so that a reused pid does not keep a dead build alive.
        try:
            pid = int(stage.name.rsplit(".", 2)[1])
        except (IndexError, ValueError):
            pid = 0
        started = procs.start_time(pid) if pid > 0 else None
        recorded: str | None
        try:
            recorded = (stage / "owner").read_text().split()[1]
        except (OSError, IndexError):
            recorded = started
        alive = started is not None and started == recorded
        if not alive:
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage.name)
    return removed


def publish(root: Path, staged: Path, target: Path, release: str, *, force: bool = False) -> Path:
    """Move a verified staged release directory to ``target`` (``root``/``release``), atomically."""
    with store_lock(root):
        fsync_dir(staged)
        if target.exists():
            if not force:
                raise ReleaseExists(
                    f"release {release!r} already exists in {root}; "
                    "pass --force to replace it or choose a new release id",
                    release=release,
                )
            exchange_paths(staged, target)
            fsync_dir(root)
            shutil.rmtree(staged, ignore_errors=True)  # now the old release
        else:
            try:
                os.rename(staged, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise ReleaseExists(
                        f"release {release!r} appeared in {root} while building; "
                        "pass --force to replace it",
                        release=release,
                    ) from exc
                raise
            fsync_dir(root)
    return target


def delete(root: Path, target: Path, release: str) -> None:
    """Remove the published release at ``target``: renamed out of sight first, then removed."""
    ensure_writable(root)
    with store_lock(root):
        trash = root / STAGING / f"deleted-{release}.{secrets.token_hex(4)}"
        (root / STAGING).mkdir(parents=True, exist_ok=True)
        os.rename(target, trash)
        fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
