from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from imageupdate.images.manifest import (
    CHECKSUMS,
    MANIFEST,
    ROOT_IMAGE,
    Artifact,
    Manifest,
    read_checksums,
    write_checksums,
)
from imageupdate.images.store import ImageStore


def test_manifest_round_trip_and_format(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    written = publish("R1", kernel="6.1.0-28-amd64")
    raw = json.loads((store.path("R1") / MANIFEST).read_text())
    assert raw["format"] == 1 and raw["release"] == "R1" and raw["kernel"] == "6.1.0-28-amd64"
    assert set(raw["artifacts"]) == {"root.tar.zst", "files.jsonl"}
    read = Manifest.read(store.path("R1"))
    assert read == written
    assert isinstance(read.artifacts[ROOT_IMAGE], Artifact)


def test_unknown_keys_from_a_newer_imageupdate_are_ignored(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    path = store.path("R1") / MANIFEST
    data = json.loads(path.read_text())
    data["added_by_a_later_version"] = {"x": 1}
    assert Manifest.from_dict(data).release == "R1"


def test_checksums_are_sha256sum_compatible(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"alpha")
    (tmp_path / "b").write_bytes(b"beta")
    write_checksums(tmp_path, ["b", "a"], {"a": hashlib.sha256(b"alpha").hexdigest()})
    assert read_checksums(tmp_path) == {
        "a": hashlib.sha256(b"alpha").hexdigest(),
        "b": hashlib.sha256(b"beta").hexdigest(),
    }
    assert (tmp_path / CHECKSUMS).read_text().splitlines()[0].endswith("  a")
    subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUMS], cwd=tmp_path, check=True)
