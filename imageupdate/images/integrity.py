"""A release directory checked against what it says it holds, and artifacts copied out of it checked as they go.

``verify_directory`` recomputes every checksum of a release directory and compares it with ``SHA256SUMS``
and the manifest (the builder runs it on a staged release before publishing, the store on a published one).
``private_copy`` is how an artifact leaves the store: copied into a private file and hashed in the same
pass, so what is unpacked or uploaded is exactly what the checked manifest records, whatever a store writer
does to the store afterwards. Signatures are checked by the store (``ImageStore.require_verified``) before
either runs.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base.errors import IntegrityError
from imageupdate.images.manifest import CHECKSUMS, MANIFEST, Manifest, read_checksums, sha256_file


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


def private_copy(path: Path, release: str, manifest: Manifest, name: str, directory: Path) -> Path:
    """Artifact ``name`` of the release directory ``path`` copied (0600, not through a link) into ``directory``
    and hashed as it is copied; ``IntegrityError`` unless the copy is what ``manifest`` (checked by the caller)
    records. What is then unpacked or uploaded is this copy: nothing a store writer does afterwards reaches it."""
    want = manifest.artifacts[name]
    dest = directory / f".{release}.{name}.{os.getpid()}.{secrets.token_hex(4)}"
    h = hashlib.sha256()
    try:
        src = os.open(path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
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
