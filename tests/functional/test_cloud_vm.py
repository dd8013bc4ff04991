"""The cloud path booting real machine images (issue 16, point 3): a control plane whose Nova driver runs each
server as a QEMU machine from the kernel, initrd and root image Glance holds (downloaded through Glance's
API: the compute host is given no store), its network, hostname and keypair on a config drive made by Nova's
own builder, its state on the flavor's ephemeral disk kept by a preserve_ephemeral rebuild. Two servers."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageupdate.images.manifest import ROOT_QCOW2, sha256_file
from tests.functional.conftest import live_processes_mentioning
from tests.functional.test_cloud import ROOT, cloud, openstack, pinned, servers
from tests.functional.test_rollout import query
from tests.functional.test_site import health, http

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def vm_plane(machine_releases: dict, store_dir: Path,  # type: ignore[type-arg]
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("cloudvm")
    plane_dir = base / "plane"
    ctl = [sys.executable, str(ROOT / "tools/openstack/controlplane.py")]
    proc = subprocess.run([*ctl, "start", str(plane_dir), "--vm"], capture_output=True, text=True, timeout=900,
                          check=False)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        key = base / "operator"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        p = {"dir": plane_dir, "env": {"OS_CLIENT_CONFIG_FILE": str(plane_dir / "clouds.yaml")},
             "fleet": base / "fleet", "store": store_dir, "key": key}
        openstack(p, "keypair", "create", "--public-key", f"{key}.pub", "operator")
        yield p
    finally:
        stop = subprocess.run([*ctl, "stop", str(plane_dir)], capture_output=True, text=True, timeout=300,
                              check=False)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not live_processes_mentioning(str(plane_dir))


def ssh(p: dict[str, Any], node: str, addr: str, *cmd: str) -> str:
    """As the operator, with the host key pinned from the node's console."""
    return subprocess.run(["ssh", "-i", str(p["key"]), "-o", "StrictHostKeyChecking=yes", "-o",
                           f"UserKnownHostsFile={p['fleet'] / 'known_hosts'}", "-o", f"HostKeyAlias=imageupdate-{node}",
                           "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{addr}", *cmd],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def test_servers_boot_what_glance_holds_migrate_themselves_and_roll_back(vm_plane: dict[str, Any]) -> None:
    p = vm_plane
    up = cloud(p, "cloud", "up", "--nodes", "2", "--release", "M1", "--flavor", "imageupdate-node",
               "--ssh-key", str(p["key"]), "--key-name", "operator", "--network", "none")
    assert up.returncode == 0, up.stderr
    imgs = {i["Name"]: i for i in openstack(p, "image", "list", "--long")}
    assert {"imageupdate-M1", "imageupdate-M1-kernel", "imageupdate-M1-initrd"} <= set(imgs)
    root = openstack(p, "image", "show", "imageupdate-M1")
    props = root["properties"]
    assert props["kernel_id"] == imgs["imageupdate-M1-kernel"]["ID"]
    assert props["ramdisk_id"] == imgs["imageupdate-M1-initrd"]["ID"]
    assert root["disk_format"] == "qcow2"
    # what the compute host booted is Glance's copy, checked: the same bytes as the signed manifest's
    cached = p["dir"] / "nova/instances/_base" / f"{root['id']}.root"
    assert sha256_file(cached) == json.loads((p["store"] / "M1/manifest.json").read_text())["artifacts"][
        ROOT_QCOW2]["sha256"]
    assert sorted(servers(p)) == ["node0", "node1"] and set(pinned(p)) == {"node0", "node1"}
    addrs = {n["name"]: n["address"] for n in json.loads(cloud(p, "status").stdout)["nodes"]}
    for name, addr in addrs.items():
        assert ssh(p, name, addr, "hostname").strip() == name  # from the config drive
        assert "/usr/lib/imageupdate/vm-init" in ssh(p, name, addr, "cat", "/proc/cmdline")  # the image's own
        assert "cloud" not in ssh(p, name, addr, "uname", "-r")
        http(addr, "/kv/owner", f"data of {name}".encode(), "PUT")
    ids = {n: s["id"] for n, s in servers(p).items()}
    disks = {n: (p["dir"] / "nova/instances" / i / "disk.eph0").stat().st_ino for n, i in ids.items()}

    proc = cloud(p, "rollout", "M2", "--batch-size", "2")  # the pair rebuilt at once by Nova
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded", result
    after = servers(p)
    assert {n: s["id"] for n, s in after.items()} == ids  # rebuilt in place
    assert {s["image"] for s in after.values()} == {"imageupdate-M2"}
    kernel = json.loads((p["store"] / "M2/manifest.json").read_text())["kernel"]
    for name, addr in addrs.items():
        assert health(addr)["release"] == "M2"
        assert ssh(p, name, addr, "uname", "-r").strip() == kernel  # M2's kernel, from Glance
        # M2's own image ran its migration 0002 (JSON to SQLite) on the kept state disk before its service
        assert http(addr, "/kv/owner") == f"data of {name}".encode()
        assert (p["dir"] / "nova/instances" / ids[name] / "disk.eph0").stat().st_ino == disks[name]
    rows = [tuple(r) for r in query(p["fleet"], "SELECT node, phase, migration, ok FROM migrations WHERE "
                                               "rollout = ?", result["rollout"]["id"])]
    for name in addrs:
        assert (name, "snapshot", "", 1) in rows and (name, "migration", "0002-json-to-sqlite", 1) in rows, rows

    http(addrs["node0"], "/kv/later", b"written on M2", "PUT")
    proc = cloud(p, "rollback", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    back = json.loads(proc.stdout)
    assert back["status"] == "succeeded", back
    assert {s["image"] for s in servers(p).values()} == {"imageupdate-M1"}
    for name, addr in addrs.items():
        assert health(addr)["release"] == "M1" and "cloud" not in ssh(p, name, addr, "uname", "-r")
        # M1's image found a contract step beyond its state version and restored the snapshot at boot
        assert http(addr, "/kv/owner") == f"data of {name}".encode()
    with pytest.raises(urllib.error.HTTPError):
        http(addrs["node0"], "/kv/later")  # written after the snapshot: gone with M2's state
    rows = [tuple(r) for r in query(p["fleet"], "SELECT node, phase FROM migrations WHERE rollout = ?",
                                    back["rollout"]["id"])]
    assert {("node0", "restore"), ("node1", "restore")} <= set(rows), rows
