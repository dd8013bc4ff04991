"""Synthetic DIB-style root tars for unit tests of the packer, diff and store.

These stand in for DIB's *output file*, not for DIB: the functional tests
build real images with the real disk-image-create.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

DPKG_STATUS = """Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12.4+deb12u5
Description: base
 multi-line description: with a colon

Package: python3
Status: install ok installed
Architecture: amd64
Version: 3.11.2-1+b1

Package: removed-but-config
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
"""


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, link: str = "", mtime: int = 1_800_000_000) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = mtime
    ti.uname = ti.gname = "root"
    ti.linkname = link
    if kind == tarfile.REGTYPE:
        payload = data or b""
        ti.size = len(payload)
        tf.addfile(ti, io.BytesIO(payload))
    else:
        tf.addfile(ti)


def make_root_tar(path: Path, release: str = "R1", *, extra: dict[str, bytes] | None = None,
                  packages: str = DPKG_STATUS, reverse: bool = False, mtime: int = 1_800_000_000,
                  kernel: str | None = None) -> Path:
    """A small root tree in DIB's member style (``./`` prefixes, unsorted)."""
    files: dict[str, bytes] = {
        "./etc/imageupdate/release.json": json.dumps({"release": release}).encode(),
        "./etc/imageupdate/state-paths": b"/var/log\n/var/lib/app\n",
        "./var/lib/dpkg/status": packages.encode(),
        "./var/lib/dpkg/info/python3.list": b"/.\n/usr\n/usr/bin\n/usr/bin/python3.11\n",
        "./var/lib/dpkg/info/base-files.list": b"/.\n/etc\n/etc/os-release\n",
        "./etc/os-release": b"PRETTY_NAME=test\n",
        "./usr/bin/python3.11": b"\x7fELF python",
        "./usr/lib/app/server.py": b"print('v1')\n",
        "./usr/share/imageupdate/services/app.json": json.dumps(
            {"name": "app", "command": ["/usr/bin/python3.11"], "paths": ["/usr/lib/app"],
             "packages": ["python3"]}).encode(),
        "./usr/share/imageupdate/tests/10-health": b"#!/bin/sh\nexit 0\n",
    }
    files.update(extra or {})
    dirs = sorted({str(Path(n).parent) for n in files} | {"./etc", "./usr", "./usr/bin", "./var"})
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, ".", kind=tarfile.DIRTYPE, mode=0o755, mtime=mtime)
        for d in sorted(dirs, reverse=reverse):
            if d != ".":
                _add(tf, d, kind=tarfile.DIRTYPE, mode=0o755, mtime=mtime)
        if kernel:
            _add(tf, f"./lib/modules/{kernel}", kind=tarfile.DIRTYPE, mode=0o755, mtime=mtime)
        for name in sorted(files, reverse=reverse):
            mode = 0o755 if "/tests/" in name or "/migrations/" in name or name.endswith(".11") else 0o644
            _add(tf, name, files[name], mode=mode, mtime=mtime)
        _add(tf, "./usr/bin/python3", kind=tarfile.SYMTYPE, link="python3.11", mtime=mtime)
        _add(tf, "./dev", kind=tarfile.DIRTYPE, mode=0o755, mtime=mtime)
        _add(tf, "./dev/null", kind=tarfile.CHRTYPE, mode=0o666, mtime=mtime)
        _add(tf, "./dev/fd", kind=tarfile.SYMTYPE, link="/proc/self/fd", mtime=mtime)
        # A hard link whose name sorts before its target, as DIB's tar can have.
        _add(tf, "./usr/bin/a-hardlink", kind=tarfile.LNKTYPE, link="./usr/bin/python3.11", mtime=mtime)
        _add(tf, "./usr/bin/z-hardlink", kind=tarfile.LNKTYPE, link="./usr/bin/python3.11", mtime=mtime)
    return path
