"""The build cache (DIB_IMAGE_CACHE) and a guard for DIB's debootstrap tarball.

DIB writes ``debootstrap-*.tar.gz`` in place, not through a temporary name:
a build killed while it writes leaves a truncated tarball that the next build
would unpack. imageupdate therefore records each tarball it saw complete
(size and mtime, in ``NAME.ok``) after a successful build, and removes any
tarball without a matching record before the next one starts.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/imageupdate/dib")


def default_cache() -> Path:
    return Path(os.environ.get("DIB_IMAGE_CACHE") or DEFAULT_CACHE)


def _stamp(tarball: Path) -> str:
    st = tarball.stat()
    return f"{st.st_size} {st.st_mtime_ns}\n"


def _tarballs(cache: Path) -> list[Path]:
    return sorted(cache.glob("debootstrap-*.tar.gz")) if cache.is_dir() else []


def drop_unconfirmed(cache: Path) -> list[Path]:
    """Remove debootstrap tarballs not confirmed by a completed build."""
    dropped: list[Path] = []
    for tarball in _tarballs(cache):
        ok = tarball.with_name(tarball.name + ".ok")
        try:
            confirmed = ok.read_text() == _stamp(tarball)
        except OSError:
            confirmed = False
        if not confirmed:
            tarball.unlink(missing_ok=True)
            ok.unlink(missing_ok=True)
            dropped.append(tarball)
    return dropped


def confirm(cache: Path) -> None:
    """After a successful build: every tarball present is complete."""
    for tarball in _tarballs(cache):
        ok = tarball.with_name(tarball.name + ".ok")
        tmp = ok.with_name(ok.name + ".tmp")
        tmp.write_text(_stamp(tarball))
        os.replace(tmp, ok)
