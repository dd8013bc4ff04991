from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imageupdate.base.errors import InvalidReleaseId, ReleaseExists, ReleaseNotFound, StoreNotWritable
from imageupdate.images.manifest import ROOT_IMAGE
from imageupdate.images.publishing import STAGING
from imageupdate.images.store import ImageStore, validate_release_id
from tests.conftest import staged_release


@pytest.mark.parametrize("rid", ["R1", "2026.11.1", "r2-rc1", "a", "v1+build.3", "x" * 64])
def test_valid_release_ids(rid: str) -> None:
    assert validate_release_id(rid) == rid


@pytest.mark.parametrize("rid", ["", "../x", "a/b", ".hidden", "-x", "a..b", "x" * 65, "a b", "r\n", "é"])
def test_unsafe_release_ids_are_refused(rid: str) -> None:
    with pytest.raises(InvalidReleaseId) as exc:
        validate_release_id(rid)
    assert exc.value.exit_code == 2


def test_publish_list_show_verify(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    publish("R2")
    assert store.releases() == ["R1", "R2"]
    assert store.manifest("R2").release == "R2"
    result = store.verify("R1")
    assert result.ok, result.problems
    assert set(result.checked) == {"root.tar.zst", "files.jsonl", "manifest.json"}
    assert not any((store.root / STAGING).iterdir())


def test_publish_refuses_existing_release_and_keeps_it(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    before = (store.path("R1") / ROOT_IMAGE).read_bytes()
    with pytest.raises(ReleaseExists):
        publish("R1", extra={"./usr/lib/app/server.py": b"print('other')\n"})
    assert (store.path("R1") / ROOT_IMAGE).read_bytes() == before
    assert not any((store.root / STAGING).iterdir())


def test_force_swaps_atomically(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    old = (store.path("R1") / ROOT_IMAGE).read_bytes()
    with store.staging("R1") as stage:
        staged_release(stage / "release", "R1", extra={"./usr/lib/app/server.py": b"print('v9')\n"})
        store.publish(stage / "release", "R1", force=True)
    assert (store.path("R1") / ROOT_IMAGE).read_bytes() != old
    assert store.verify("R1").ok
    assert not any((store.root / STAGING).iterdir())


def test_failure_while_staging_leaves_no_entry(store: ImageStore) -> None:
    with pytest.raises(RuntimeError), store.staging("R1") as stage:
        staged_release(stage / "release", "R1")
        raise RuntimeError("disk-image-create failed")
    assert store.releases() == []
    assert not store.path("R1").exists()
    assert not any((store.root / STAGING).iterdir())


def test_verify_finds_a_corrupted_artifact(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    image = store.path("R1") / ROOT_IMAGE
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    result = store.verify("R1")
    assert not result.ok
    assert any("root.tar.zst: sha256" in p for p in result.problems)


def test_verify_finds_a_missing_artifact(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    (store.path("R1") / "files.jsonl").unlink()
    assert "files.jsonl is missing" in store.verify("R1").problems


def test_delete(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    store.delete("R1")
    assert store.releases() == []
    with pytest.raises(ReleaseNotFound):
        store.delete("R1")


def test_unknown_release_names_the_known_ones(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    with pytest.raises(ReleaseNotFound) as exc:
        store.manifest("R7")
    assert "have: R1" in str(exc.value) and "imageupdate build R7" in str(exc.value)


def test_store_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreNotWritable) as exc:
        ImageStore(blocker / "store").ensure_writable()
    assert exc.value.exit_code == 2


def test_build_killed_half_way_leaves_no_entry(store: ImageStore, tmp_path: Path) -> None:
    """A process killed with SIGKILL while staging: no release, swept later."""
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from pathlib import Path
        from imageupdate.images.store import ImageStore
        from tests.conftest import staged_release
        store = ImageStore(Path({str(store.root)!r}))
        with store.staging("R1") as stage:
            staged_release(stage / "release", "R1")
            Path({str(ready)!r}).write_text("x")
            time.sleep(60)
            store.publish(stage / "release", "R1")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(200):
            if ready.exists():
                break
            proc.poll()
            assert proc.returncode is None, "helper died early"
            time.sleep(0.05)
        assert ready.exists()
        assert len(list((store.root / STAGING).iterdir())) == 1
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert store.releases() == []
    assert not store.path("R1").exists()
    assert store.sweep_stale()  # the dead build's staging goes
    assert not any((store.root / STAGING).iterdir())


def test_sweep_keeps_a_live_build(store: ImageStore) -> None:
    with store.staging("R1") as stage:
        assert store.sweep_stale() == []
        assert stage.exists()


def test_construction_touches_nothing(tmp_path: Path) -> None:
    ImageStore(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
