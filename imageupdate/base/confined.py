"""Host-side access to a tree a node or an image controls (a state partition, an unpacked release),
resolved inside that tree.

Root in a node can replace anything on its state partition with a symlink, a ``..``-laden link or a
directory link; a host that opened ``STATE/imageupdate/state.json`` by path would then read or write a
host file. Here every component below the tree's root is opened relative to its parent's descriptor
with ``O_NOFOLLOW``: a symlink anywhere on the way is refused (``Escape``), never followed; ``..`` and
absolute paths are refused before anything is opened. The root itself is the host's own directory.

Reads are bounded (a node can make a file of any size); writes go to a fresh temporary name created
with ``O_EXCL`` in the same directory and renamed over the target, so a planted link at either name is
replaced, not written through.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import suppress
from pathlib import Path

from imageupdate.base.errors import OperationError

MAX_READ = 16 * 1024 * 1024  # bytes read from a node-controlled file at most
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Escape(OperationError):
    """A path in a node-controlled tree that would lead out of it (a symlink, ``..``, an absolute path)."""


def parts(rel: str) -> list[str]:
    """The components of ``rel``, refusing what could climb out before any lookup."""
    if rel.startswith("/"):
        raise Escape(f"{rel!r} is absolute: a path inside a node's tree is relative to it", step="confined")
    out = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in out:
        raise Escape(f"{rel!r} climbs out with '..'", step="confined")
    return out


def _open_dir(root: Path, comps: list[str], create: bool) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, comp in enumerate(comps):
            try:
                try:
                    nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with suppress(FileExistsError):  # made meanwhile (or a link planted meanwhile: see below)
                        os.mkdir(comp, 0o700, dir_fd=fd)
                    nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _escape(root, comps[: i + 1], e) from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _escape(root: Path, comps: list[str], e: OSError) -> Escape:
    # O_DIRECTORY|O_NOFOLLOW on a link gives ENOTDIR, not ELOOP: look (for the message only)
    what = "a symlink" if e.errno == errno.ELOOP or os.path.islink(root.joinpath(*comps)) else "not a directory"
    return Escape(f"{root / '/'.join(comps)} is {what}: a node may have planted it; the host does not follow "
                  "it out of the node's tree", step="confined")


def read_bytes(root: Path, rel: str, limit: int = MAX_READ) -> bytes:
    """The regular file ``rel`` under ``root``; FileNotFoundError if absent, ``Escape`` if a link is on
    the way or it is not a regular file, ``OperationError`` if larger than ``limit``."""
    comps = parts(rel)
    if not comps:
        raise Escape(f"{rel!r} names the tree itself, not a file", step="confined")
    dfd = _open_dir(root, comps[:-1], create=False)
    try:
        try:
            fd = os.open(comps[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _escape(root, comps, e) from None
            raise
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Escape(f"{root / rel} is not a regular file", step="confined")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OperationError(f"{root / rel} is larger than {limit} bytes: not read", step="confined")
    return data


def read_text(root: Path, rel: str, limit: int = MAX_READ) -> str:
    return read_bytes(root, rel, limit).decode(errors="replace")


def listdir(root: Path, rel: str) -> list[str]:
    """The names in directory ``rel`` under ``root`` (reached without a link), sorted."""
    fd = _open_dir(root, parts(rel), create=False)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def chmod_dir(root: Path, rel: str, mode: int) -> None:
    """chmod the directory ``rel`` under ``root``, reached without a link."""
    fd = _open_dir(root, parts(rel), create=False)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def is_file(root: Path, rel: str) -> bool:
    """Whether ``rel`` is a regular file reached without a link (a planted link reads as absent)."""
    try:
        comps = parts(rel)
        dfd = _open_dir(root, comps[:-1], create=False) if comps else None
    except (OSError, Escape):
        return False
    if dfd is None:
        return False
    try:
        return stat.S_ISREG(os.stat(comps[-1], dir_fd=dfd, follow_symlinks=False).st_mode)
    except OSError:
        return False
    finally:
        os.close(dfd)


def write_bytes(root: Path, rel: str, data: bytes, mode: int = 0o600, fsync: bool = True) -> None:
    """Replace ``rel`` under ``root`` with ``data`` (its directories made, mode 0700, when missing)."""
    comps = parts(rel)
    if not comps:
        raise Escape(f"{rel!r} names the tree itself, not a file", step="confined")
    dfd = _open_dir(root, comps[:-1], create=True)
    tmp = f".{comps[-1]}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, comps[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
