"""Unpack a release from the store into the site, once, after checking it.

Before anything is written: the artifact's sha256 must match the manifest,
and every member is checked: no absolute path, no ``..`` component, no
member below a symlink (it would be written through the link onto the
host), no relative link that climbs out of the tree, no hard link to
something outside the archive, no device node. Only then GNU tar extracts
it into a temporary directory that is renamed into place, so a release
directory in the site is always complete.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import shutil
import subprocess
import tarfile
from pathlib import Path

from imageupdate.errors import IntegrityError
from imageupdate.images.manifest import ROOT_IMAGE
from imageupdate.images.store import ImageStore


def _zstd_stream(image: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["zstd", "-dc", "-q", str(image)], stdout=subprocess.PIPE)


def unsafe_member(m: tarfile.TarInfo, symlinks: set[str], seen: set[str]) -> str | None:
    """Why ``m`` may not be unpacked, or None."""
    name = m.name
    if name.startswith("/"):
        return f"absolute path {name!r}"
    parts = name.split("/")
    if ".." in parts:
        return f"'..' in {name!r}"
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in symlinks:
            return f"{name!r} lies below the symlink {'/'.join(parts[:i])!r}"
    if m.ischr() or m.isblk():
        return f"device node {name!r}"
    if m.issym() and not m.linkname.startswith("/"):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
        if target == ".." or target.startswith("../"):
            return f"symlink {name!r} -> {m.linkname!r} leaves the tree"
    if m.islnk() and (m.linkname.startswith("/") or m.linkname not in seen):
        return f"hard link {name!r} -> {m.linkname!r} points outside the archive"
    return None


def check_archive(image: Path) -> int:
    """Raise IntegrityError at the first unsafe member; return the member count."""
    symlinks: set[str] = set()
    seen: set[str] = set()
    proc = _zstd_stream(image)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for m in tf:
                why = unsafe_member(m, symlinks, seen)
                if why:
                    raise IntegrityError(f"refusing to unpack {image}: {why}", step="unpack")
                seen.add(m.name)
                if m.issym():
                    symlinks.add(m.name)
    finally:
        proc.stdout.close()
        proc.wait()
    return len(seen)


def ensure_release(store: ImageStore, release: str, releases_dir: Path) -> Path:
    """The unpacked tree of ``release`` in ``releases_dir``, unpacking it if needed."""
    target = releases_dir / release
    if (target / "etc/imageupdate/release.json").is_file():
        return target
    releases_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(releases_dir / ".unpack.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # nodes of one batch rebuilt at once: one unpacks, the others wait
        if (target / "etc/imageupdate/release.json").is_file():
            return target
        return _unpack(store, release, releases_dir, target)
    finally:
        os.close(fd)


def artifact_record(releases_dir: Path, release: str) -> Path:
    """Beside each unpacked tree: the sha256 of the artifact it came from (what the gate's release check
    holds against the store, so a release rebuilt under the same id is not taken for the one unpacked)."""
    return releases_dir / f"{release}.artifact"


def unpacked_from(releases_dir: Path, release: str) -> str | None:
    try:
        return artifact_record(releases_dir, release).read_text().strip() or None
    except OSError:
        return None


def _unpack(store: ImageStore, release: str, releases_dir: Path, target: Path) -> Path:
    manifest = store.require_verified(release)  # sha256 of the artifact against the manifest
    image = store.path(release) / ROOT_IMAGE
    check_archive(image)
    tmp = releases_dir / f".{release}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        proc = _zstd_stream(image)
        subprocess.run(["tar", "-x", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(tmp)],
                       stdin=proc.stdout, check=True, capture_output=True)
        if proc.wait() != 0:
            raise IntegrityError(f"zstd could not decompress {image}", release=release, step="unpack")
        record = artifact_record(releases_dir, release)
        staged = releases_dir / f".{release}.artifact.tmp"
        staged.write_text(manifest.artifacts[ROOT_IMAGE].sha256 + "\n")
        os.replace(staged, record)  # before the tree: a tree never lacks its record
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
