"""Unpack a release from the store into the site, once, after checking it.

Before anything is written: the artifact's sha256 must match the manifest,
and every member is checked as GNU tar itself lists it (the program that
extracts is the one whose reading is checked: no second parser that could
read the archive differently), after normalising its path (``etc/./x`` and
``etc//x`` are ``etc/x``): no absolute path, no ``..`` component, no member
below a symlink (it would be written through the link onto the host), no
relative link that climbs out of the tree, no hard link to something outside
the archive, no device node or other special file but fifos. Only then GNU
tar extracts it into a temporary directory that is renamed into
place, so a release directory in the site is always complete; what was
written is walked once more for device nodes.
"""

from __future__ import annotations

import codecs
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base import locks
from imageupdate.base.errors import InputError, IntegrityError
from imageupdate.images.manifest import MACHINE_ARTIFACTS, ROOT_IMAGE, ROOT_QCOW2, Manifest
from imageupdate.images.store import ImageStore


def _zstd_stream(image: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["zstd", "-dc", "-q", str(image)], stdout=subprocess.PIPE)


# GNU tar -tv in the C locale: TYPE+MODE UID/GID SIZE-or-MAJOR,MINOR DATE TIME "NAME"[ -> "LINK" | link to "LINK"]
LISTING = re.compile(rb'^(?P<kind>.)(?P<mode>\S{9}) \d+/\d+ +(?:\d+|\d+, *\d+) \S+ \S+ '
                     rb'"(?P<name>(?:[^"\\]|\\.)*)"(?: (?P<how>->|link to) "(?P<link>(?:[^"\\]|\\.)*)")?$')
TAR_ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # no LANGUAGE: "link to" is translated
KINDS = {b"-": "file", b"h": "hard link", b"l": "symlink", b"d": "directory", b"p": "fifo"}


@dataclass(frozen=True)
class Member:
    """One member as GNU tar, the extractor, lists it (``tar -tv --quoting-style=c``)."""

    kind: str  # file | hard link | symlink | directory | fifo | anything else: GNU tar's type letter
    mode: str  # e.g. rwsr-xr-x
    name: str
    link: str = ""


def _unquote(raw: bytes) -> str:
    return os.fsdecode(codecs.escape_decode(raw)[0])


def parse_listing(line: bytes) -> Member:
    m = LISTING.match(line)
    if m is None:
        raise ValueError(f"unreadable listing line {line[:200]!r}")
    kind = KINDS.get(m["kind"], m["kind"].decode(errors="replace"))
    if (m["how"] == b"->") != (kind == "symlink") or (m["how"] == b"link to") != (kind == "hard link"):
        raise ValueError(f"unreadable listing line {line[:200]!r} (its link does not match its type)")
    return Member(kind, m["mode"].decode(errors="replace"), _unquote(m["name"]),
                  _unquote(m["link"]) if m["link"] is not None else "")


def normal(name: str) -> tuple[str, ...]:
    """The path components GNU tar writes: empty and ``.`` components dropped."""
    return tuple(p for p in name.split("/") if p not in ("", "."))


def unsafe_member(m: Member, symlinks: set[tuple[str, ...]], seen: set[tuple[str, ...]]) -> str | None:
    """Why ``m`` may not be unpacked, or None. Names are compared after normalisation: ``etc/./x`` and
    ``etc//x`` are ``etc/x``."""
    if m.name.startswith("/"):
        return f"absolute path {m.name!r}"
    parts = normal(m.name)
    if ".." in parts:
        return f"'..' in {m.name!r}"
    for i in range(1, len(parts)):
        if parts[:i] in symlinks:
            return f"{m.name!r} lies below the symlink {'/'.join(parts[:i])!r}"
    if m.kind not in KINDS.values():
        return f"device node {m.name!r}" if m.kind in ("c", "b") else f"member {m.name!r} of type {m.kind!r}"
    if not parts and m.kind != "directory":
        return f"{m.name!r} names the tree itself"
    if m.kind == "symlink" and not m.link.startswith("/"):
        target = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), m.link))
        if target == ".." or target.startswith("../"):
            return f"symlink {m.name!r} -> {m.link!r} leaves the tree"
    if m.kind == "hard link" and (m.link.startswith("/") or normal(m.link) not in seen):
        return f"hard link {m.name!r} -> {m.link!r} points outside the archive"
    if m.kind == "hard link" and normal(m.link) in symlinks:
        return f"hard link {m.name!r} -> {m.link!r} links a symlink (it would point elsewhere from there)"
    return None


def members(image: Path) -> Iterator[Member]:
    """Every member of the archive as GNU tar reads it: the listing of the program that extracts."""
    zstd = _zstd_stream(image)
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally; tar may warn once per member
    tar = subprocess.Popen(["tar", "-t", "-v", "--numeric-owner", "--quoting-style=c", "-f", "-"],
                           stdin=zstd.stdout, stdout=subprocess.PIPE, stderr=errors, env=TAR_ENV)
    assert zstd.stdout is not None and tar.stdout is not None
    zstd.stdout.close()  # tar holds it now
    try:
        for line in tar.stdout:
            yield parse_listing(line.rstrip(b"\n"))
        tar.stdout.close()
        failed = tar.wait() != 0 or zstd.wait() != 0
        errors.seek(0)
        err = errors.read(1 << 16).decode(errors="replace").strip()
        if failed:
            raise IntegrityError(f"refusing to unpack {image}: GNU tar could not read it: "
                                 f"{(err.splitlines() or ['zstd failed'])[-1]}", step="unpack")
    except ValueError as e:
        raise IntegrityError(f"refusing to unpack {image}: {e}", step="unpack") from None
    finally:
        errors.close()
        for p in (tar, zstd):
            if p.poll() is None:
                p.kill()
                p.wait()


def check_archive(image: Path) -> int:
    """Raise IntegrityError at the first unsafe member; return the member count."""
    symlinks: set[tuple[str, ...]] = set()
    seen: set[tuple[str, ...]] = set()
    for m in members(image):
        why = unsafe_member(m, symlinks, seen)
        if why:
            raise IntegrityError(f"refusing to unpack {image}: {why}", step="unpack")
        seen.add(normal(m.name))
        if m.kind == "symlink":
            symlinks.add(normal(m.name))
    return len(seen)


def ensure_release(store: ImageStore, release: str, releases_dir: Path, fleet_dir: Path) -> Path:
    """The unpacked tree of ``release`` in ``releases_dir``, unpacking it if needed; refused unless a key
    ``fleet_dir`` trusts signed it (checked on every use: a key revoked since the unpack counts)."""
    store.require_trusted(release, fleet_dir)
    target = releases_dir / release
    if (target / "etc/imageupdate/release.json").is_file():
        return target
    releases_dir.mkdir(parents=True, exist_ok=True)
    with locks.held(releases_dir / ".unpack.lock"):  # nodes of one batch rebuilt at once: one unpacks
        if (target / "etc/imageupdate/release.json").is_file():
            return target
        return _unpack(store, release, releases_dir, target, fleet_dir)


def artifact_record(releases_dir: Path, release: str) -> Path:
    """Beside each unpacked tree: the sha256 of the artifact it came from (what the gate's release check
    holds against the store, so a release rebuilt under the same id is not taken for the one unpacked)."""
    return releases_dir / f"{release}.artifact"


def unpacked_from(releases_dir: Path, release: str) -> str | None:
    try:
        return artifact_record(releases_dir, release).read_text().strip() or None
    except OSError:
        return None


def _unpack(store: ImageStore, release: str, releases_dir: Path, target: Path, fleet_dir: Path) -> Path:
    manifest = store.require_verified(release, fleet_dir)  # signed, and the artifact's sha256 as signed
    image = store.private_copy(release, manifest, ROOT_IMAGE, releases_dir)  # checked and unpacked: this copy
    try:
        return _unpack_copy(image, manifest, release, releases_dir, target)
    finally:
        image.unlink(missing_ok=True)


def _unpack_copy(image: Path, manifest: Manifest, release: str, releases_dir: Path, target: Path) -> Path:
    check_archive(image)
    tmp = releases_dir / f".{release}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        proc = _zstd_stream(image)
        done = subprocess.run(["tar", "-x", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(tmp)],
                              stdin=proc.stdout, check=False, capture_output=True, env=TAR_ENV)
        assert proc.stdout is not None
        proc.stdout.close()  # tar is done with it: zstd gets SIGPIPE rather than block if tar stopped early
        if proc.wait() != 0:
            raise IntegrityError(f"zstd could not decompress {image}", release=release, step="unpack")
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            raise IntegrityError(f"GNU tar could not unpack {image}: {said[-1]}", release=release, step="unpack")
        found = _devices(tmp)
        if found:
            raise IntegrityError(f"refusing {image}: it wrote the device node {found}", release=release,
                                 step="unpack")
        record = artifact_record(releases_dir, release)
        staged = releases_dir / f".{release}.artifact.tmp"
        staged.write_text(manifest.artifacts[ROOT_IMAGE].sha256 + "\n")
        os.replace(staged, record)  # before the tree: a tree never lacks its record
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _devices(tree: Path) -> str | None:
    """The first device node under ``tree`` (relative), or None."""
    for top, dirs, files in os.walk(tree):
        for name in dirs + files:
            mode = os.lstat(os.path.join(top, name)).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                return os.path.relpath(os.path.join(top, name), tree)
    return None


def machine_dir(releases_dir: Path, release: str) -> Path:
    return releases_dir / f"{release}.machine"


def ensure_machine(store: ImageStore, release: str, releases_dir: Path, fleet_dir: Path) -> Path:
    """The directory holding ``release``'s root.qcow2, vmlinuz and initrd for the site's VMs: private copies
    (each hashed as it is copied, against the manifest a key ``fleet_dir`` trusts signed), made once. A
    release built without a kernel is refused before anything stops (``InputError``)."""
    manifest = store.require_trusted(release, fleet_dir)
    if manifest.boot is None or not set(MACHINE_ARTIFACTS) <= set(manifest.artifacts):
        raise InputError(f"release {release} has no kernel to boot (built as a tree only): a VM site needs a "
                         f"machine image, 'imageupdate build {release} --os imageupdate-debian-machine ...'",
                         release=release, step="boot")
    target = machine_dir(releases_dir, release)
    sha = manifest.artifacts[ROOT_QCOW2].sha256
    if _machine_record(target) == sha:
        return target
    releases_dir.mkdir(parents=True, exist_ok=True)
    with locks.held(releases_dir / ".unpack.lock"):
        if _machine_record(target) == sha:
            return target
        manifest = store.require_verified(release, fleet_dir)
        tmp = releases_dir / f".{release}.machine.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for name in MACHINE_ARTIFACTS:
                os.replace(store.private_copy(release, manifest, name, tmp), tmp / name)
            (tmp / "artifact").write_text(manifest.artifacts[ROOT_QCOW2].sha256 + "\n")
            old = releases_dir / f".{release}.machine.old.{os.getpid()}"
            if target.exists():
                os.rename(target, old)  # a release rebuilt under the same id: the new one replaces it
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def _machine_record(target: Path) -> str | None:
    try:
        return (target / "artifact").read_text().strip() or None
    except OSError:
        return None
