"""The release manifest: what exactly is inside one release image.

``manifest.json`` sits next to the artifacts in the store. Its ``artifacts``
section records the sha256 and size of every artifact; ``SHA256SUMS`` (the
``sha256sum`` format) covers the artifacts and the manifest itself, so
``sha256sum -c SHA256SUMS`` works without imageupdate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
ROOT_IMAGE = "root.tar.zst"
FILE_INDEX = "files.jsonl"
# a machine image (TripleO's overcloud-full trio), beside the tree: artifact -> format
ROOT_QCOW2, KERNEL, INITRD = "root.qcow2", "vmlinuz", "initrd"
MACHINE_ARTIFACTS = {ROOT_QCOW2: "qcow2", KERNEL: "linux-kernel", INITRD: "initramfs"}
STATE_LABEL = "iu-state"  # a machine node's state disk: ext4 labels hold 16 bytes ("imageupdate-state" is 17)
VM_INIT = "/usr/lib/imageupdate/vm-init"  # PID 1 of a booted node (elements/imageupdate-debian-machine)
MANIFEST_FORMAT = 1


def boot_command_line(root_label: str, init: str = VM_INIT) -> str:
    """The kernel command line a machine image boots with, wherever it runs; the platform adds the network
    (``ip=`` on the local site; a cloud's guest reads its config drive)."""
    return " ".join([f"root=LABEL={root_label}", "ro", "console=ttyS0", "net.ifnames=0", "panic=1", f"init={init}",
                     f"imageupdate.state={STATE_LABEL}"])


@dataclass
class Artifact:
    sha256: str
    size: int
    format: str


@dataclass
class Manifest:
    release: str
    built_at: str
    build_seconds: float
    elements: list[str]
    expanded_elements: list[str]
    dib_version: str
    imageupdate_version: str
    source_date_epoch: int
    environment: dict[str, str]
    packages: dict[str, dict[str, str]]
    kernel: str | None
    services: list[dict[str, Any]]
    tests: list[dict[str, Any]]
    migrations: list[dict[str, Any]]
    state_paths: list[str]
    files: dict[str, int]
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    upgrade: dict[str, Any] | None = None  # upgrade.json: version, state_version, min_from, migrations, config
    boot: dict[str, str] | None = None  # a machine image: root_label, init, state_label (None: a tree only)
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """A manifest from its JSON, every field checked against the schema (``ManifestInvalid`` names the
        first field that is missing or of the wrong type): a store is input like any other."""
        if not isinstance(data, dict):
            raise ManifestInvalid(f"the manifest is a JSON {type(data).__name__}, not an object")
        for name, check in SCHEMA.items():
            if name not in data:
                if name in OPTIONAL:
                    continue
                raise ManifestInvalid(f"field {name!r} is missing")
            if not check(data[name]):
                raise ManifestInvalid(f"field {name!r} is not {DESCRIBED[name]} ({_short(data[name])})")
        if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            raise ManifestInvalid(f"format {data['format']} is not {MANIFEST_FORMAT}: written by another imageupdate")
        values = {k: v for k, v in data.items() if k in SCHEMA}
        values["artifacts"] = {k: Artifact(**v) for k, v in data.get("artifacts", {}).items()}
        return cls(**values)

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls.parse(read_raw(directory))

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        try:
            return cls.from_dict(json.loads(raw))
        except RecursionError:
            raise ManifestInvalid("nested too deeply") from None


class ManifestInvalid(ValueError):
    """A manifest that is not valid JSON of the manifest's schema."""


MAX_MANIFEST = 64 * 1024 * 1024  # bytes: a manifest lists packages and services, not files


def read_raw(directory: Path) -> bytes:
    """The manifest's bytes, bounded, not through a link (what is signed is what is parsed)."""
    fd = os.open(directory / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_MANIFEST + 1)
    if len(raw) > MAX_MANIFEST:
        raise ManifestInvalid(f"larger than {MAX_MANIFEST} bytes")
    return raw


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and v >= 0


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _objects(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def _named(v: Any) -> bool:
    return _objects(v) and all(isinstance(x.get("name"), str) for x in v)


def _str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def _packages(v: Any) -> bool:
    return isinstance(v, dict) and all(_str_map(x) for x in v.values())


def _counts(v: Any) -> bool:
    return isinstance(v, dict) and all(_int(x) for x in v.values())


_LABEL = re.compile(r"[A-Za-z0-9._-]{1,16}")  # an ext4 label, and nothing a kernel command line would split
_INIT = re.compile(r"/[A-Za-z0-9._/-]{1,200}")


def _boot(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and set(v) == {"root_label", "init", "state_label"}
                         and all(isinstance(x, str) for x in v.values()) and bool(_LABEL.fullmatch(v["root_label"]))
                         and bool(_INIT.fullmatch(v["init"])) and ".." not in v["init"].split("/")
                         and v["state_label"] == STATE_LABEL)


def _artifacts(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(a, dict) and set(a) == {"sha256", "size", "format"} and isinstance(a["sha256"], str)
        and len(a["sha256"]) == 64 and all(c in "0123456789abcdef" for c in a["sha256"])
        and _int(a["size"]) and a["size"] >= 0 and isinstance(a["format"], str) for a in v.values())


SCHEMA: dict[str, Any] = {
    "release": _str, "built_at": _str, "build_seconds": _number, "elements": _strs, "expanded_elements": _strs,
    "dib_version": _str, "imageupdate_version": _str, "source_date_epoch": _int, "environment": _str_map,
    "packages": _packages, "kernel": lambda v: v is None or _str(v), "services": _named, "tests": _objects,
    "migrations": _objects, "state_paths": _strs, "files": _counts, "artifacts": _artifacts,
    "upgrade": lambda v: v is None or isinstance(v, dict), "format": _int,
    "boot": _boot,
}
DESCRIBED = {
    "release": "a string", "built_at": "a string", "build_seconds": "a number of seconds",
    "elements": "a list of strings", "expanded_elements": "a list of strings", "dib_version": "a string",
    "imageupdate_version": "a string", "source_date_epoch": "an integer", "environment": "a map of strings",
    "packages": "a map of package name to a map of strings", "kernel": "a string or null",
    "services": "a list of objects with a name", "tests": "a list of objects", "migrations": "a list of objects",
    "state_paths": "a list of strings", "files": "a map of counts",
    "artifacts": "a map of name to {sha256 (64 hex digits), size, format}", "upgrade": "an object or null",
    "format": "an integer",
    "boot": f"null or {{root_label (an ext4 label), init (an absolute path), state_label ({STATE_LABEL})}}",
}
OPTIONAL = {"artifacts", "upgrade", "format", "boot"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def describe_artifact(path: Path, fmt: str) -> Artifact:
    return Artifact(sha256=sha256_file(path), size=path.stat().st_size, format=fmt)


def write_checksums(directory: Path, names: list[str], known: dict[str, str] | None = None) -> None:
    """Write SHA256SUMS for ``names``; ``known`` digests are not recomputed."""
    known = known or {}
    lines = [f"{known.get(n) or sha256_file(directory / n)}  {n}\n" for n in sorted(names)]
    (directory / CHECKSUMS).write_text("".join(lines))


def read_checksums(directory: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in (directory / CHECKSUMS).read_text().splitlines():
        digest, _, name = line.partition("  ")
        if digest and name:
            sums[name] = digest
    return sums
