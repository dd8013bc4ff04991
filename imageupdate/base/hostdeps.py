"""Programs imageupdate needs on the host, and the Debian package for each.

Checked before any work starts, so a missing one is a one-line error that
names the package to install (exit 2), never a failure half way through.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from imageupdate.base.errors import MissingHostDependency

# program -> how to get it
BUILD_TOOLS: dict[str, str] = {
    "disk-image-create": "pip install diskimage-builder (it is a dependency of imageupdate)",
    "sudo": "apt-get install sudo (DIB calls sudo even as root)",
    "debootstrap": "apt-get install debootstrap",
    "chroot": "apt-get install coreutils",
    "unshare": "apt-get install util-linux",
    "setpriv": "apt-get install util-linux",
    "zstd": "apt-get install zstd",
    "tar": "apt-get install tar",
    "ssh-keygen": "apt-get install openssh-client (it signs releases)",
}


def search_path() -> str:
    """PATH with this interpreter's bin directory first (venv scripts)."""
    bindir = str(Path(sys.executable).parent)
    return os.pathsep.join([bindir, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])


def which(program: str) -> str | None:
    return shutil.which(program, path=search_path())


def require(programs: dict[str, str]) -> dict[str, str]:
    """Return program -> absolute path, or raise for the first one missing."""
    found: dict[str, str] = {}
    for program, fix in programs.items():
        path = which(program)
        if path is None:
            raise MissingHostDependency(
                f"missing host dependency: '{program}' is not on PATH; install it: {fix}",
                step="host-check",
            )
        found[program] = path
    return found


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        raise MissingHostDependency(
            f"imageupdate must run as root here: {why}; run it with sudo", step="host-check"
        )
