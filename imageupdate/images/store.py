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

``ImageStore`` reads releases (each manifest parsed from the bytes its signature is checked on) and decides
whether a fleet may trust one. How the store is written (staging, publishing by one rename, the sweep of
builds whose owner died): :mod:`imageupdate.images.publishing`. How a release directory and the artifacts
copied out of it are checked against their checksums: :mod:`imageupdate.images.integrity`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imageupdate.base.errors import IntegrityError, InvalidReleaseId, ReleaseNotFound, StoreError, UntrustedRelease
from imageupdate.base.files import fsync_dir
from imageupdate.images import integrity, publishing, signing
from imageupdate.images.diff import ReleaseDiff, diff_releases
from imageupdate.images.fileindex import FileEntry, read_index
from imageupdate.images.integrity import VerifyResult, verify_directory
from imageupdate.images.manifest import FILE_INDEX, MANIFEST, Manifest, read_raw

# VerifyResult and verify_directory (images.integrity) are imported from here by the builder and the CLI
__all__ = ["DEFAULT_STORE", "ImageStore", "VerifyResult", "default_store", "validate_release_id",
           "verify_directory"]

DEFAULT_STORE = Path("/var/lib/imageupdate/images")
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
        """Artifact ``name`` copied into ``directory``, hashed as it is copied, checked against ``manifest``
        (which the caller checked, e.g. with ``require_verified``): see ``integrity.private_copy``."""
        return integrity.private_copy(self.path(release), release, manifest, name, directory)

    # Writing (images.publishing) -----------------------------------------------

    def ensure_writable(self) -> None:
        publishing.ensure_writable(self.root)

    @contextmanager
    def lock(self) -> Iterator[None]:
        with publishing.store_lock(self.root):
            yield

    @contextmanager
    def staging(self, release: str) -> Iterator[Path]:
        """A private directory for one build; removed unless published."""
        with publishing.staging(self.root, validate_release_id(release)) as stage:
            yield stage

    def sweep_stale(self) -> list[str]:
        """Remove staged builds whose owning process is gone."""
        return publishing.sweep_stale(self.root)

    def publish(self, staged: Path, release: str, *, force: bool = False) -> Path:
        """Move a verified staged release directory into place, atomically."""
        return publishing.publish(self.root, staged, self.path(release), release, force=force)

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
        publishing.delete(self.root, target, release)
