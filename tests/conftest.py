from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageupdate.images import packer
from imageupdate.images.manifest import (
    FILE_INDEX,
    MANIFEST,
    ROOT_IMAGE,
    Manifest,
    describe_artifact,
    write_checksums,
)
from imageupdate.images.store import ImageStore
from tests.fakeroot_tar import make_root_tar


def staged_release(directory: Path, release: str, **tar_args: object) -> Manifest:
    """Pack a synthetic root into ``directory`` as a complete release directory."""
    directory.mkdir(parents=True)
    raw = make_root_tar(directory.parent / f"{directory.name}.dib.tar", release, **tar_args)  # type: ignore[arg-type]
    facts = packer.pack(raw, directory, 1_700_000_000)
    raw.unlink()
    m = Manifest(
        release=release, built_at=f"2026-01-01T00:00:{len(release):02d}Z", build_seconds=1.0,
        elements=["x"], expanded_elements=["x"], dib_version="test", imageupdate_version="test",
        source_date_epoch=1_700_000_000, environment={}, packages=facts.packages,
        kernel=facts.kernel, services=facts.services, tests=facts.tests,
        migrations=facts.migrations, state_paths=facts.state_paths,
        files={"count": facts.file_count},
    )
    m.artifacts = {
        ROOT_IMAGE: describe_artifact(directory / ROOT_IMAGE, "tar+zstd"),
        FILE_INDEX: describe_artifact(directory / FILE_INDEX, "jsonl"),
    }
    m.write(directory)
    write_checksums(directory, [ROOT_IMAGE, FILE_INDEX, MANIFEST])
    return m


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def publish(store: ImageStore, tmp_path: Path):  # type: ignore[no-untyped-def]
    def _publish(release: str, **tar_args: object) -> Manifest:
        with store.staging(release) as stage:
            m = staged_release(stage / "release", release, **tar_args)
            store.publish(stage / "release", release)
        return m

    return _publish


def needs_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
