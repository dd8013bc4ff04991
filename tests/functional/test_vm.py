"""VM nodes (issue 16): two QEMU machines booting each release's own kernel, rolled and rolled back through the
site's Heat exactly as namespace nodes are. One site for the module: a TCG boot costs about 25 s of CPU."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageupdate.images import signing
from imageupdate.images.manifest import INITRD, MANIFEST, Manifest, describe_artifact, write_checksums
from tests.conftest import SIGNING_KEY, imageupdate, live_processes_mentioning, mounts_mentioning
from tests.functional.test_rollout import cli, query, releases_of
from tests.functional.test_site import health, http, ssh

pytestmark = pytest.mark.functional


def derived_release(store_dir: Path, src: str, name: str, initrd: bytes | None = None) -> None:
    """``src`` under another id (its tree still says ``src``), optionally with another initrd; checksums and
    manifest rewritten and signed by the trusted key. No DIB run: a TCG machine build costs a minute."""
    dst = store_dir / name
    if dst.exists():
        return
    tmp = store_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(store_dir / src, tmp)
    (tmp / signing.SIGNATURE).unlink()
    m = Manifest.read(tmp)
    m.release = name
    if initrd is not None:
        (tmp / INITRD).write_bytes(initrd)
        m.artifacts[INITRD] = describe_artifact(tmp / INITRD, m.artifacts[INITRD].format)
    m.write(tmp)
    write_checksums(tmp, [*m.artifacts, MANIFEST])
    signing.sign(tmp, SIGNING_KEY)
    os.rename(tmp, dst)


@pytest.fixture(scope="module")
def derived(machine_releases: dict, store_dir: Path) -> None:  # type: ignore[type-arg]
    """M2-again: M2 under another id (the target of the rebuilds killed half way); M-noboot: M2 whose initrd
    is garbage, so its kernel panics for want of a root (no initramfs to find it by label)."""
    derived_release(store_dir, "M2", "M2-again")
    derived_release(store_dir, "M2", "M-noboot", initrd=os.urandom(4096))


@pytest.fixture(scope="module")
def vm_site(machine_releases: dict, derived: None, store_dir: Path,  # type: ignore[type-arg]
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("vm") / "site"
    up = imageupdate("site", "up", "--kind", "vm", "--nodes", "2", "--release", "M1", "--site", str(path),
                     "--store", str(store_dir), "--json", timeout=900)
    try:
        assert up.returncode == 0, up.stderr
        yield path
    finally:
        imageupdate("site", "destroy", "--force", "--site", str(path), "--store", str(store_dir))
        assert not live_processes_mentioning(str(path)) and not mounts_mentioning(path)


def test_vm_nodes_boot_their_releases_kernel_on_a_read_only_root(vm_site: Path, store_dir: Path) -> None:
    nodes = {n["name"]: n for n in json.loads(cli(vm_site, store_dir, "site", "status").stdout)["nodes"]}
    addr = nodes["node0"]["address"]
    cmdline = ssh(vm_site, addr, "cat", "/proc/cmdline").stdout
    assert "init=/usr/lib/imageupdate/vm-init" in cmdline and "root=LABEL=" in cmdline
    kernel = ssh(vm_site, addr, "uname", "-r").stdout.strip()
    assert kernel.endswith("-amd64") and "cloud" not in kernel  # M1's: Debian's generic kernel
    assert "/usr/lib/imageupdate/init" in ssh(vm_site, addr, "cat", "/proc/1/cmdline").stdout  # PID 1, as on a
    # namespace node: the gate holds services to be its children
    assert ssh(vm_site, addr, "touch", "/usr/x").returncode != 0
    mounts = ssh(vm_site, addr, "cat", "/proc/mounts").stdout
    assert any(line.split()[1] == "/mnt/state" and "nodev" in line for line in mounts.splitlines())
    assert health(addr)["release"] == "M1"


def test_vm_nodes_roll_m1_to_m2_and_keep_their_data(vm_site: Path, store_dir: Path) -> None:
    addrs = {n["name"]: n["address"] for n in json.loads(cli(vm_site, store_dir, "site", "status").stdout)["nodes"]}
    for name, addr in addrs.items():
        http(addr, "/kv/owner", f"data of {name}".encode(), "PUT")
    diff = json.loads(imageupdate("images", "diff", "M1", "M2", "--store", str(store_dir), "--json",
                                  check=True).stdout)
    assert diff["kernel_changed"] and diff["action"] == "reboot", diff  # M2 boots the cloud kernel
    # both VMs in one batch: two guests rebooting at once (and a minute less of CI than one after the other)
    proc = cli(vm_site, store_dir, "rollout", "M2", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded", result
    assert releases_of(vm_site, store_dir) == {"node0": "M2", "node1": "M2"}
    batches = query(vm_site, "SELECT DISTINCT batch FROM steps WHERE rollout = ? AND step = 'gate'",
                    result["rollout"]["id"])
    assert [tuple(b) for b in batches] == [(0,)], batches
    for name, addr in addrs.items():
        assert health(addr)["release"] == "M2"
        assert http(addr, "/kv/owner") == f"data of {name}".encode()  # migrated by 0002 on the state disk
        assert ssh(vm_site, addr, "uname", "-r").stdout.strip() == diff["kernel_new"]  # booted M2's kernel
    checks = query(vm_site, "SELECT node, name, ok FROM checks WHERE rollout = ?", result["rollout"]["id"])
    assert checks and all(ok for _n, _name, ok in checks), checks


def test_a_release_that_does_not_boot_fails_with_its_console_and_is_rolled_back(vm_site: Path,
                                                                                 store_dir: Path) -> None:
    proc = cli(vm_site, store_dir, "rollout", "M-noboot")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["status"] == "rolled-back", result
    assert "console ends:" in result["reason"] and "Kernel panic" in result["reason"], result["reason"]
    assert releases_of(vm_site, store_dir) == {"node0": "M2", "node1": "M2"}
    addr = {n["name"]: n["address"] for n in json.loads(cli(vm_site, store_dir, "site", "status").stdout)
            ["nodes"]}["node0"]
    assert health(addr)["release"] == "M2"


def test_a_release_whose_service_fails_its_test_on_a_vm_node_is_rolled_back(vm_site: Path,
                                                                            store_dir: Path) -> None:
    """M-broken boots and its service answers /health, but the release's own test finds the bug: node0's gate
    fails on it, nothing else is touched, and node0 boots M2 again with its data."""
    proc = cli(vm_site, store_dir, "rollout", "M-broken")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["status"] == "rolled-back" and "test:20-data-roundtrip" in result["reason"], result
    assert releases_of(vm_site, store_dir) == {"node0": "M2", "node1": "M2"}
    touched = query(vm_site, "SELECT node FROM steps WHERE rollout = ? AND step = 'rebuild' AND status != 'pending'",
                    result["rollout"]["id"])
    assert [r["node"] for r in touched] == ["node0"]
    addr = {n["name"]: n["address"] for n in json.loads(cli(vm_site, store_dir, "site", "status").stdout)
            ["nodes"]}["node0"]
    assert health(addr)["release"] == "M2" and http(addr, "/kv/owner") == b"data of node0"


def test_a_tree_only_release_is_refused_before_anything_stops(vm_site: Path, store_dir: Path,
                                                              releases: dict) -> None:  # type: ignore[type-arg]
    for argv in (["site", "rebuild", "node0", "R2"], ["rollout", "R2"]):
        proc = imageupdate(*argv, "--site", str(vm_site), "--store", str(store_dir))
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(said) == 1 and "no kernel to boot" in said[0], (argv, proc.stderr)
    assert releases_of(vm_site, store_dir) == {"node0": "M2", "node1": "M2"}


@pytest.mark.parametrize("step, expected", [("after-stop", "M2"), ("after-switch", "M2-again")])
def test_a_vm_killed_mid_rebuild_recovers_on_one_release(vm_site: Path, store_dir: Path, step: str,
                                                         expected: str) -> None:
    addr = {n["name"]: n["address"] for n in json.loads(cli(vm_site, store_dir, "site", "status").stdout)
            ["nodes"]}["node1"]
    http(addr, "/kv/k", b"before-crash", "PUT")
    proc = imageupdate("site", "rebuild", "node1", "M2-again", "--site", str(vm_site), "--store", str(store_dir),
                       env={"IMAGEUPDATE_BREAK": step})
    assert proc.returncode == -9, proc.stderr
    proc = imageupdate("site", "recover", "--site", str(vm_site), "--store", str(store_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    n = {n["name"]: n for n in json.loads(cli(vm_site, store_dir, "site", "status").stdout)["nodes"]}["node1"]
    assert n["current"] == expected and n["pending"] is None and n["running"]
    assert not mounts_mentioning(vm_site / "nodes/node1/state")  # the disk is the VM's again
    proc = imageupdate("site", "rebuild", "node1", "M2", "--site", str(vm_site), "--store", str(store_dir))
    assert proc.returncode == 0, proc.stderr
    assert health(addr)["release"] == "M2" and http(addr, "/kv/k") == b"before-crash"
