"""The image store: a directory of published releases, changed only atomically.

Layout::

    STORE/
      .lock                  flock(2) held while publishing or deleting
      .staging/NAME/         builds in progress; never read as releases
        owner                pid and start time of the building process
      R1/                    one directory per published release
        root.tar.zst         the root filesystem (reproducible tar, zstd)
        files.jsonl          one line per path: type, mode, owner, sha256, package
        manifest.json        what is inside (see imageupdate.images.manifest)
        SHA256SUMS           sha256sum-format checksums of the three above
        manifest.json.sig    the builder's signature of the manifest (see imageupdate.images.signing)

A release directory appears by one ``rename(2)`` of a staged, verified
directory; ``--force`` swaps it with ``renameat2(RENAME_EXCHANGE)``, so a
reader sees the old release or the new one, never a mix or nothing. Staged
directories whose owner died (SIGKILL, power loss) are swept on the next
build.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base import locks, procs
from imageupdate.base.errors import (
    IntegrityError,
    InvalidReleaseId,
    ReleaseExists,
    ReleaseNotFound,
    StoreError,
    StoreNotWritable,
    UntrustedRelease,
)
from imageupdate.base.files import exchange_paths, fsync_dir
from imageupdate.images import signing
from imageupdate.images.diff import ReleaseDiff, diff_releases
from imageupdate.images.fileindex import FileEntry, read_index
from imageupdate.images.manifest import (
    CHECKSUMS,
    FILE_INDEX,
    MANIFEST,
    Manifest,
    read_checksums,
    read_raw,
    sha256_file,
)

DEFAULT_STORE = Path("/var/lib/imageupdate/images")
STAGING = ".staging"
_RELEASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def validate_release_id(release: str) -> str:
    """Return ``release`` if it is safe as a single path component."""
    if not _RELEASE_ID.fullmatch(release) or ".." in release:
        raise InvalidReleaseId(
            f"release id {release!r} is not allowed: use 1-64 characters from "
            "A-Z a-z 0-9 . _ + -, starting with a letter or digit, without '..'",
            release=release,
        )
    return release


def default_store() -> Path:
    return Path(os.environ.get("IMAGEUPDATE_STORE") or DEFAULT_STORE)


def verify_directory(path: Path, manifest: Manifest) -> tuple[dict[str, str], list[str]]:
    """Recompute checksums in a release directory; return (checked, problems)."""
    problems: list[str] = []
    checked: dict[str, str] = {}
    try:
        sums = read_checksums(path)
    except OSError:
        sums = {}
        problems.append(f"{CHECKSUMS} is missing")
    for name, artifact in manifest.artifacts.items():
        sums.setdefault(name, artifact.sha256)
    if MANIFEST not in sums and not problems:
        problems.append(f"{CHECKSUMS} does not cover {MANIFEST}")
    for name, want in sorted(sums.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
            continue
        got = sha256_file(f)
        checked[name] = got
        if got != want:
            problems.append(f"{name}: sha256 {got[:12]}... does not match {want[:12]}...")
        art = manifest.artifacts.get(name)
        if art is not None:
            if art.sha256 != want:
                problems.append(f"{name}: manifest and {CHECKSUMS} disagree")
            if f.stat().st_size != art.size:
                problems.append(f"{name}: size {f.stat().st_size} is not {art.size}")
    return checked, problems


@dataclass
class VerifyResult:
    release: str
    checked: dict[str, str]
    problems: list[str]
    signer: str | None = None
    signature_problem: str | None = None

    @property
    def signature_only(self) -> bool:
        """The one problem is the signature (rebuilding is not the fix: signing or trusting is)."""
        return self.problems == [self.signature_problem]

    @property
    def ok(self) -> bool:
        return not self.problems


class ImageStore:
    """Published releases under one directory. Construction touches nothing."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_store()

    # Reading ---------------------------------------------------------------

    def path(self, release: str) -> Path:
        return self.root / validate_release_id(release)

    def exists(self, release: str) -> bool:
        return (self.path(release) / MANIFEST).is_file()

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _RELEASE_ID.fullmatch(p.name) and (p / MANIFEST).is_file()
        )

    def releases(self) -> list[str]:
        """Published release ids whose manifest reads, oldest build first (see ``damaged``)."""
        good = []
        for r in self._names():
            try:
                good.append((self.manifest(r).built_at, r))
            except StoreError:
                continue
        return [r for _, r in sorted(good)]

    def damaged(self) -> dict[str, str]:
        """Releases whose manifest does not read, with why: listed apart, never breaking the others."""
        out = {}
        for r in self._names():
            try:
                self.manifest(r)
            except StoreError as e:
                out[r] = e.message
        return out

    def manifest(self, release: str) -> Manifest:
        return self._load(release)[1]

    def _load(self, release: str) -> tuple[bytes, Manifest]:
        """The manifest's bytes as read once, and the manifest parsed from exactly those bytes."""
        path = self.path(release)
        if not (path / MANIFEST).is_file():
            known = ", ".join(self._names()) or "none"
            raise ReleaseNotFound(
                f"release {release!r} is not in the store {self.root} (have: {known}); "
                f"build it with 'imageupdate build {release}'",
                release=release,
            )
        try:
            raw = read_raw(path)
            m = Manifest.parse(raw)
        except (OSError, ValueError) as exc:
            said = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreError(
                f"manifest of release {release!r} is unreadable ({said}); "
                f"run 'imageupdate images verify {release}' or rebuild it with --force",
                release=release,
            ) from None
        if m.release != release:
            raise StoreError(f"manifest of release {release!r} says it is release {m.release!r}: a manifest "
                             f"copied or edited by hand; rebuild it with 'imageupdate build {release} --force'",
                             release=release)
        return raw, m

    def signer(self, release: str, fleet_dir: Path | None) -> str:
        """Who signed ``release``: the name of the key ``fleet_dir`` trusts for it, or with no fleet
        ``this-host`` when this host's own release key did. ``UntrustedRelease`` otherwise."""
        raw, _ = self._load(release)
        sig = signing.read_signature(self.path(release), release)
        if fleet_dir is not None:
            return signing.check(raw, sig, fleet_dir, release)
        own = signing.own_key()
        if not own:
            signing.signed_by(raw, sig, release)
            raise UntrustedRelease(f"release {release!r} has a valid signature, but there is no trust list to check "
                                   f"it against: name the fleet (--site DIR or --cloud NAME), or make this host's "
                                   f"key ({signing.default_key()})", release=release, step="signature")
        return signing.check_signers(raw, sig, own, f"this host's key {signing.default_key()}", release)

    def require_trusted(self, release: str, fleet_dir: Path) -> Manifest:
        """The manifest of ``release`` when a key ``fleet_dir`` trusts signed it (the artifacts are not
        hashed here: see ``require_verified``)."""
        raw, m = self._load(release)
        signing.check(raw, signing.read_signature(self.path(release), release), fleet_dir, release)
        return m

    def file_index(self, release: str) -> dict[str, FileEntry]:
        self.manifest(release)
        try:
            return read_index(self.path(release) / FILE_INDEX)
        except (OSError, ValueError) as e:
            raise StoreError(f"{FILE_INDEX} of release {release!r} is unreadable ({e}); run 'imageupdate images "
                             f"verify {release}' or rebuild it with --force", release=release) from None

    def diff(self, old: str, new: str) -> ReleaseDiff:
        return diff_releases(
            self.manifest(old), self.manifest(new), self.file_index(old), self.file_index(new)
        )

    def verify(self, release: str, fleet_dir: Path | None = None) -> VerifyResult:
        """Recompute every checksum and compare with SHA256SUMS and the manifest; check the signature (against
        the keys ``fleet_dir`` trusts, or with no fleet against this host's own release key)."""
        manifest = self.manifest(release)
        checked, problems = verify_directory(self.path(release), manifest)
        signer = sig_problem = None
        try:
            signer = self.signer(release, fleet_dir)
        except UntrustedRelease as e:
            problems.append(e.message)
            sig_problem = e.message
        try:
            read_index(self.path(release) / FILE_INDEX)
        except OSError as e:
            problems.append(f"{FILE_INDEX} cannot be read: {e.strerror}")
        except ValueError as e:
            problems.append(f"{FILE_INDEX}: {e}")
        return VerifyResult(release=release, checked=checked, problems=problems, signer=signer,
                            signature_problem=sig_problem)

    def require_verified(self, release: str, fleet_dir: Path) -> Manifest:
        """The manifest of a release ``fleet_dir`` may use: read once, its signature by a key the fleet trusts
        checked on those bytes (before hashing the artifacts), every checksum right against that same parsed
        manifest. Whoever uses an artifact next copies it with ``private_copy`` and hashes the copy again:
        a store writer cannot swap it after this check."""
        raw, manifest = self._load(release)
        signing.check(raw, signing.read_signature(self.path(release), release), fleet_dir, release)
        _checked, problems = verify_directory(self.path(release), manifest)
        try:
            read_index(self.path(release) / FILE_INDEX)
        except (OSError, ValueError) as e:
            problems.append(f"{FILE_INDEX}: {getattr(e, 'strerror', None) or e}")
        if problems:
            raise IntegrityError(
                f"release {release!r} failed verification: {'; '.join(problems)}; "
                f"rebuild it with 'imageupdate build {release} --force'",
                release=release,
                step="verify",
            )
        return manifest

    def private_copy(self, release: str, manifest: Manifest, name: str, directory: Path) -> Path:
        """Artifact ``name`` copied (0600, not through a link) into ``directory`` and hashed as it is copied;
        ``IntegrityError`` unless the copy is what ``manifest`` (checked by the caller) records. What is then
        unpacked or uploaded is this copy: nothing a store writer does afterwards reaches it."""
        want = manifest.artifacts[name]
        dest = directory / f".{release}.{name}.{os.getpid()}.{secrets.token_hex(4)}"
        h = hashlib.sha256()
        try:
            src = os.open(self.path(release) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(src, "rb") as f, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                                                 "wb") as out:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except OSError as e:
            dest.unlink(missing_ok=True)
            raise IntegrityError(f"{name} of release {release!r} cannot be read ({e.strerror})", release=release,
                                 step="verify") from None
        if h.hexdigest() != want.sha256:
            dest.unlink(missing_ok=True)
            raise IntegrityError(f"{name} of release {release!r} changed after it was verified (sha256 "
                                 f"{h.hexdigest()[:12]}... is not the signed {want.sha256[:12]}...): the store is "
                                 "being written under imageupdate; nothing was used", release=release,
                                 step="verify")
        return dest

    # Writing -----------------------------------------------------------------

    def ensure_writable(self) -> None:
        try:
            (self.root / STAGING).mkdir(parents=True, exist_ok=True)
            probe = self.root / STAGING / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreNotWritable(
                f"image store {self.root} is not writable ({exc.strerror}); "
                "choose another with --store or IMAGEUPDATE_STORE, or fix its permissions"
            ) from exc

    @contextmanager
    def lock(self) -> Iterator[None]:
        hold = ExitStack()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            hold.enter_context(locks.held(self.root / ".lock"))
        except OSError as exc:
            raise StoreNotWritable(f"image store {self.root} is not writable ({exc.strerror}); choose another "
                                   "with --store or IMAGEUPDATE_STORE, or fix its permissions") from None
        with hold:
            yield

    @contextmanager
    def staging(self, release: str) -> Iterator[Path]:
        """A private directory for one build; removed unless published."""
        validate_release_id(release)
        self.ensure_writable()
        self.sweep_stale()
        stage = self.root / STAGING / f"{release}.{os.getpid()}.{secrets.token_hex(4)}"
        stage.mkdir()
        start = procs.start_time(os.getpid()) or "0"
        (stage / "owner").write_text(f"{os.getpid()} {start}\n")
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def sweep_stale(self) -> list[str]:
        """Remove staged builds whose owning process is gone."""
        removed: list[str] = []
        base = self.root / STAGING
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

    def publish(self, staged: Path, release: str, *, force: bool = False) -> Path:
        """Move a verified staged release directory into place, atomically."""
        target = self.path(release)
        with self.lock():
            fsync_dir(staged)
            if target.exists():
                if not force:
                    raise ReleaseExists(
                        f"release {release!r} already exists in {self.root}; "
                        "pass --force to replace it or choose a new release id",
                        release=release,
                    )
                exchange_paths(staged, target)
                fsync_dir(self.root)
                shutil.rmtree(staged, ignore_errors=True)  # now the old release
            else:
                try:
                    os.rename(staged, target)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        raise ReleaseExists(
                            f"release {release!r} appeared in {self.root} while building; "
                            "pass --force to replace it",
                            release=release,
                        ) from exc
                    raise
                fsync_dir(self.root)
        return target

    def sign(self, release: str, key: Path, fleet_dir: Path, *, adopt: bool = False) -> str:
        """Sign a published release with ``key`` (a key rotation): only a release ``fleet_dir`` already trusts,
        every checksum right, and exactly the manifest bytes that were checked. ``adopt``: a release with no
        signature at all (built before imageupdate signed), its checksums checked. Returns the fingerprint."""
        raw, manifest = self._load(release)
        path = self.path(release)
        if adopt:
            if (path / signing.SIGNATURE).exists() or (path / signing.SIGNATURE).is_symlink():
                raise UntrustedRelease(f"release {release!r} is already signed: --adopt is only for releases "
                                       "built before imageupdate signed them", release=release, step="signature")
        else:
            try:
                signing.check(raw, signing.read_signature(path, release), fleet_dir, release)
            except UntrustedRelease as e:
                hint = " (built before releases were signed? --adopt signs it after checking its checksums)" \
                    if not (path / signing.SIGNATURE).exists() else ""
                raise UntrustedRelease(f"{e.message}; a release is signed again only if {fleet_dir} trusts "
                                       f"it already{hint}", release=release, step="signature") from None
        _checked, problems = verify_directory(path, manifest)
        if problems:
            raise IntegrityError(f"release {release!r} failed verification: {'; '.join(problems)}; not signed",
                                 release=release, step="verify")
        signature = signing.sign_bytes(raw, key)
        self.ensure_writable()
        with self.lock():
            signing.write_signature(path, signature)
            fsync_dir(path)
        return signing.signed_by(raw, signature, release)

    def delete(self, release: str) -> None:
        target = self.path(release)
        self.manifest(release)  # raises ReleaseNotFound
        self.ensure_writable()
        with self.lock():
            trash = self.root / STAGING / f"deleted-{release}.{secrets.token_hex(4)}"
            (self.root / STAGING).mkdir(parents=True, exist_ok=True)
            os.rename(target, trash)
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
