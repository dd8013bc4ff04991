"""The release manifest: what exactly is inside one release image.

``manifest.json`` sits next to the artifacts in the store. Its ``artifacts``
section records the sha256 and size of every artifact; ``SHA256SUMS`` (the
``sha256sum`` format) covers the artifacts and the manifest itself, so
``sha256sum -c SHA256SUMS`` works without imageupdate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
ROOT_IMAGE = "root.tar.zst"
FILE_INDEX = "files.jsonl"
MANIFEST_FORMAT = 1


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
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["artifacts"] = {k: Artifact(**v) for k, v in data.get("artifacts", {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls.from_dict(json.loads((directory / MANIFEST).read_text()))


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
