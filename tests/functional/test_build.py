"""The build step end to end with the real disk-image-create (needs root)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from imageupdate.images.publishing import STAGING
from imageupdate.images.store import ImageStore
from tests.functional.conftest import imageupdate, live_processes_mentioning, mounts_mentioning

pytestmark = pytest.mark.functional


def _members(store_dir: Path, release: str, tmp_path: Path) -> dict[str, tarfile.TarInfo]:
    raw = tmp_path / f"{release}.tar"
    with open(raw, "wb") as f:
        subprocess.run(["zstd", "-dc", str(store_dir / release / "root.tar.zst")], stdout=f, check=True)
    with tarfile.open(raw) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_manifests_say_what_is_inside(releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    r1, r2 = releases["R1"]["manifest"], releases["R2"]["manifest"]
    assert r1["release"] == "R1" and r2["release"] == "R2"
    assert r1["elements"] == ["imageupdate-debian-slim", "imageupdate-node", "sample-workload-v1"]
    assert {"imageupdate-node", "debootstrap", "sample-workload"} <= set(r1["expanded_elements"])
    assert r1["dib_version"] == "3.43.0"
    assert r1["kernel"] is None  # the slim OS has none
    for pkg in ("python3", "openssh-server", "curl"):
        assert pkg in r1["packages"], pkg
    assert "sqlite3" in r2["packages"] and "curl" not in r2["packages"]
    assert [s["name"] for s in r1["services"]] == ["sample-workload"]
    assert [t["name"] for t in r1["tests"]] == ["10-service-health", "20-data-roundtrip"]
    assert all(t["executable"] for t in r1["tests"])
    assert r1["migrations"] == [] and [m["name"] for m in r2["migrations"]] == ["0002-json-to-sqlite"]
    assert r1["state_paths"] == ["/var/log", "/var/lib/sample-workload", "/etc/sample-workload"]
    assert (r1["upgrade"]["version"], r1["upgrade"]["state_version"], r1["upgrade"]["migrations"]) == ("1", 1, [])
    assert r2["upgrade"]["migrations"] == [{"name": "0002-json-to-sqlite", "state_version": 2, "kind": "contract"}]
    assert r1["environment"]["DIB_IMAGEUPDATE_RELEASE"] == "R1"
    root = r1["artifacts"]["root.tar.zst"]
    assert root["size"] == (store_dir / "R1" / "root.tar.zst").stat().st_size


def test_checksums_verify_with_imageupdate_and_sha256sum(releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    for release in releases:
        proc = imageupdate("images", "verify", release, "--store", str(store_dir), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["ok"] is True
        subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=store_dir / release, check=True)


def test_image_is_a_node_root_without_identity(releases: dict, store_dir: Path, tmp_path: Path) -> None:  # type: ignore[type-arg]
    m = _members(store_dir, "R1", tmp_path)
    assert not [n for n in m if n.startswith("etc/ssh/ssh_host_")], "host keys baked into the image"
    assert m["etc/machine-id"].issym() and m["etc/machine-id"].linkname == "/mnt/state/identity/machine-id"
    assert m["var/lib/sample-workload"].linkname == "/mnt/state/var/lib/sample-workload"
    assert m["var/log"].linkname == "/mnt/state/var/log"
    assert "usr/share/imageupdate/state-seed/var/lib/sample-workload" in m
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt/state"):
        assert m[d].isdir(), d
    names = [n for n in m if n != "."]
    body = names[5:]  # after the root directories the packer adds
    assert body == sorted(body)
    assert max(x.mtime for x in m.values()) <= releases["R1"]["manifest"]["source_date_epoch"]


def test_diff_r1_r2(releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    proc = imageupdate("images", "diff", "R1", "R2", "--store", str(store_dir), "--json", check=True)
    d = json.loads(proc.stdout)
    assert [p["name"] for p in d["packages_added"]] == ["sqlite3"]
    assert "curl" in [p["name"] for p in d["packages_removed"]]
    assert d["kernel_changed"] is False
    (svc,) = d["services"]
    assert svc["name"] == "sample-workload" and svc["status"] == "changed"
    changed = {p for g in d["files"] for p in g["changed"]}
    assert "usr/lib/sample-workload/sample_workload/storage.py" in changed
    assert d["migrations_added"] == ["0002-json-to-sqlite"]
    assert d["action"] == "restart"
    human = imageupdate("images", "diff", "R1", "R2", "--store", str(store_dir), check=True).stdout
    assert "sqlite3" in human and "pkg:curl" in human and "needs: restart" in human


def test_rebuild_with_force_replaces_and_is_nearly_identical(releases: dict, store_dir: Path,  # type: ignore[type-arg]
                                                            tmp_path: Path) -> None:
    # a copy of the session's R1 in a store of its own: the other worker's sites may be unpacking the shared R1
    shutil.copytree(store_dir / "R1", tmp_path / "store" / "R1")
    store_dir = tmp_path / "store"
    refused = imageupdate("build", "R1", "-e", "sample-workload-v1", "--store", str(store_dir))
    assert refused.returncode == 2 and "already exists" in refused.stderr
    store = ImageStore(store_dir)
    before = store.file_index("R1")
    proc = imageupdate("build", "R1", "-e", "sample-workload-v1", "--force", "--store", str(store_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    after = store.file_index("R1")
    differ = sorted(p for p in before.keys() | after.keys()
                    if (before.get(p) and before[p].signature()) != (after.get(p) and after[p].signature()))
    print(f"files differing between two builds of R1: {len(differ)}: {differ}")
    assert before.keys() == after.keys()
    assert len(differ) < 30, differ
    assert store.verify("R1").ok


def _wait_for(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"build ended early: {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _leftovers(root: Path) -> tuple[list[str], list[str]]:
    return mounts_mentioning(root), live_processes_mentioning(str(root))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_build_leaves_nothing(releases: dict, tmp_path: Path, sig: signal.Signals) -> None:  # type: ignore[type-arg]
    store_dir = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "imageupdate", "build", "RK", "-e", "sample-workload-v2",
                             "--store", str(store_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((store_dir / ".logs").glob("build-RK-*.log")) and time.monotonic() < deadline:
            time.sleep(0.1)
        (log,) = list((store_dir / ".logs").glob("build-RK-*.log"))
        _wait_for(log, "install.d", proc)  # DIB is deep in the chroot, mounts up
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 20
    while any(_leftovers(store_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    mounts, procs = _leftovers(store_dir)
    assert mounts == [] and procs == []
    store = ImageStore(store_dir)
    assert store.releases() == [] and not (store_dir / "RK").exists()
    if sig == signal.SIGTERM:
        assert rc == 130 and "interrupted" in proc.stderr.read()  # EXIT_INTERRUPTED: cancelled, not failed
        assert not any((store_dir / STAGING).iterdir())  # cleaned by the process itself
    else:
        assert len(list((store_dir / STAGING).iterdir())) == 1  # SIGKILL: no chance to clean
        store.sweep_stale()
        assert not any((store_dir / STAGING).iterdir())


def test_out_of_disk_build_leaves_no_entry(releases: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(small)], check=True)
    try:
        proc = imageupdate("build", "RF", "-e", "sample-workload-v1", "--store", str(small / "store"),
                           env={"IMAGEUPDATE_MIN_FREE_MB": "1"})
        print(proc.stderr)
        assert proc.returncode == 1, proc.stderr
        assert "nothing was published" in proc.stderr or "disk-image-create failed" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 30
        store = ImageStore(small / "store")
        assert store.releases() == []
        assert not any((small / "store" / STAGING).iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_precheck_refuses_a_store_without_room(tmp_path: Path) -> None:
    small = tmp_path / "tiny"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        proc = imageupdate("build", "RT", "-e", "sample-workload-v1", "--store", str(small / "store"))
        assert proc.returncode == 1 and "MiB free" in proc.stderr
        assert os.listdir(small / "store" / STAGING) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
