"""The local site with real nodes: namespaces, the image's init, SSH, HTTP (needs root)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageupdate.base import procs
from imageupdate.images import signing
from imageupdate.images.manifest import FILE_INDEX, MANIFEST, ROOT_IMAGE, Manifest, describe_artifact, write_checksums
from imageupdate.site.site import LocalSite
from tests.conftest import SIGNING_KEY
from tests.functional.conftest import imageupdate, live_processes_mentioning, mounts_mentioning

pytestmark = pytest.mark.functional


def http(addr: str, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
    req = urllib.request.Request(f"http://{addr}:8080{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()


def health(addr: str) -> dict:  # type: ignore[type-arg]
    return json.loads(http(addr, "/health"))


def ssh(site: Path, addr: str, *cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(site / "key"), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"root@{addr}", *cmd],
        input=stdin, capture_output=True, text=True, timeout=30, check=False,
    )


def status(site: Path, store: Path) -> dict:  # type: ignore[type-arg]
    proc = imageupdate("site", "status", "--site", str(site), "--store", str(store), "--json", check=True)
    return {n["name"]: n for n in json.loads(proc.stdout)["nodes"]}


def node_pid_namespaces(site: Path, store: Path) -> set[str]:
    return {os.readlink(f"/proc/{n['pid']}/ns/pid") for n in status(site, store).values() if n["pid"]}


def processes_in(namespaces: set[str]) -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "ns/pid") in namespaces and procs.alive(int(p.name)):
                    found.append(f"process {p.name} in a node's pid namespace")
            except OSError:
                continue
    return found


def leftovers(site_id: str, site: Path) -> list[str]:
    found = [f"netns {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                  check=True).stdout.split() if site_id in n]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if site_id in line]
    found += mounts_mentioning(site)
    found += live_processes_mentioning(str(site))  # node-boot carries its site path; other sites may run
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    found += [f"loop {line}" for line in loops.splitlines() if str(site) in line]
    return found


@pytest.fixture
def site(releases: dict, store_dir: Path, tmp_path: Path) -> Iterator[Path]:  # type: ignore[type-arg]
    path = tmp_path / "site"
    proc = imageupdate("site", "up", "--nodes", "3", "--release", "R1", "--site", str(path),
                       "--store", str(store_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    try:
        yield path
    finally:
        imageupdate("site", "destroy", "--force", "--site", str(path), "--store", str(store_dir))


def test_nodes_keep_data_across_a_rebuild(site: Path, store_dir: Path) -> None:
    nodes = status(site, store_dir)
    assert sorted(nodes) == ["node0", "node1", "node2"]
    keys = {}
    for name, n in nodes.items():
        assert n["current"] == "R1" and n["running"] and n["reachable"]
        assert health(n["address"])["release"] == "R1"
        http(n["address"], "/kv/owner", name.encode(), "PUT")
        keys[name] = ssh(site, n["address"], "cat", "/mnt/state/identity/ssh/ssh_host_ed25519_key.pub").stdout
        assert keys[name].startswith("ssh-ed25519")
    assert len(set(keys.values())) == 3, "nodes share an SSH identity"
    for name in nodes:
        proc = imageupdate("site", "rebuild", name, "R2", "--site", str(site), "--store", str(store_dir), "--json")
        assert proc.returncode == 0, proc.stderr
    for name, n in status(site, store_dir).items():
        assert (n["current"], n["previous"]) == ("R2", "R1")
        h = health(n["address"])
        assert (h["release"], h["format"]) == ("R2", 2)
        assert http(n["address"], "/kv/owner") == name.encode()  # data kept and converted
        assert ssh(site, n["address"], "cat", "/etc/imageupdate/release.json").stdout.strip() == '{"release": "R2"}'
        assert ssh(site, n["address"], "cat", "/mnt/state/identity/ssh/ssh_host_ed25519_key.pub").stdout == keys[name]


def shipped_tests(site: Path, addr: str) -> dict[str, bool]:
    names = ssh(site, addr, "ls", "/usr/share/imageupdate/tests").stdout.split()
    assert names, "the release ships no post-deploy tests"
    return {n: ssh(site, addr, f"/usr/share/imageupdate/tests/{n}").returncode == 0 for n in names}


def test_releases_pass_or_fail_their_own_tests(site: Path, store_dir: Path) -> None:
    addr = status(site, store_dir)["node0"]["address"]
    assert shipped_tests(site, addr) == {"10-service-health": True, "20-data-roundtrip": True}
    imageupdate("site", "rebuild", "node0", "R2", "--site", str(site), "--store", str(store_dir), check=True)
    assert shipped_tests(site, addr) == {"10-service-health": True, "20-data-roundtrip": True}
    imageupdate("site", "rebuild", "node0", "R-broken", "--site", str(site), "--store", str(store_dir), check=True)
    assert health(addr)["release"] == "R-broken"
    assert shipped_tests(site, addr) == {"10-service-health": True, "20-data-roundtrip": False}


def test_node_root_is_read_only_and_state_is_writable(site: Path, store_dir: Path) -> None:
    addr = status(site, store_dir)["node0"]["address"]
    ro = ssh(site, addr, "touch", "/usr/imageupdate-test")
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr
    assert ssh(site, addr, "touch", "/mnt/state/ok").returncode == 0
    assert (site / "nodes/node0/state/ok").exists()
    ps = ssh(site, addr, "cat", "/proc/1/cmdline").stdout
    assert "/usr/lib/imageupdate/init" in ps  # the image's own init is PID 1
    assert ssh(site, addr, "hostname").stdout.strip() == "node0"


@pytest.mark.parametrize("step, expected", [("after-intent", "R1"), ("after-stop", "R1"), ("after-switch", "R2")])
def test_rebuild_killed_recovers_on_one_release(site: Path, store_dir: Path, step: str, expected: str) -> None:
    addr = status(site, store_dir)["node1"]["address"]
    http(addr, "/kv/k", b"before-crash", "PUT")
    proc = imageupdate("site", "rebuild", "node1", "R2", "--site", str(site), "--store", str(store_dir),
                       env={"IMAGEUPDATE_BREAK": step})
    assert proc.returncode == -9, proc.stderr  # killed at the step
    proc = imageupdate("site", "recover", "--site", str(site), "--store", str(store_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    n = status(site, store_dir)["node1"]
    assert n["current"] == expected and n["pending"] is None and n["running"]
    assert LocalSite(site).node("node1").wait_ready() is None
    assert health(addr)["release"] == expected
    assert http(addr, "/kv/k") == b"before-crash"


def crafted_release(store_dir: Path, base: str, name: str) -> None:
    """``base``'s tree plus what the trust-boundary report got past the old check: behind a regular file
    whose header has a garbage devmajor field (Python's tarfile stops reading there, GNU tar does not), a
    world-writable character device. Signed off with a correct manifest and checksums."""
    src, dst = store_dir / base, store_dir / name
    shutil.copytree(src, dst)
    raw = subprocess.run(["zstd", "-dc", str(src / ROOT_IMAGE)], capture_output=True, check=True).stdout
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as old, tarfile.open(fileobj=buf, mode="w",
                                                                     format=tarfile.GNU_FORMAT) as new:
        for m in old:
            new.addfile(m, old.extractfile(m) if m.isreg() else None)
        at = new.offset
        bait = tarfile.TarInfo("etc/imageupdate-bait")
        bait.size = 2
        new.addfile(bait, io.BytesIO(b"hi"))
        dev = tarfile.TarInfo("dev/mem-evil")
        dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 1, 0o666
        new.addfile(dev)
    data = bytearray(buf.getvalue())
    hdr = data[at:at + 512]
    hdr[329:337] = b"zzzzzzz\0"
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    data[at:at + 512] = hdr
    (dst / ROOT_IMAGE).write_bytes(subprocess.run(["zstd", "-q", "-c"], input=bytes(data), capture_output=True,
                                                  check=True).stdout)
    m = Manifest.read(dst)
    m.release = name
    m.artifacts[ROOT_IMAGE] = describe_artifact(dst / ROOT_IMAGE, "tar+zstd")
    m.write(dst)
    write_checksums(dst, [ROOT_IMAGE, FILE_INDEX, MANIFEST])
    signing.sign(dst, SIGNING_KEY)  # signed by the trusted key (a compromised build): the tar check must hold


def copied_release(store_dir: Path, src: str, name: str, key: Path | None) -> None:
    """``src`` under another id, signed by ``key`` (None: not signed at all)."""
    dst = store_dir / name
    shutil.copytree(store_dir / src, dst)
    (dst / signing.SIGNATURE).unlink()
    m = Manifest.read(dst)
    m.release = name
    m.write(dst)
    write_checksums(dst, [ROOT_IMAGE, FILE_INDEX, MANIFEST])
    if key is not None:
        signing.sign(dst, key)


def test_a_release_not_signed_by_a_trusted_key_never_reaches_a_node(site: Path, store_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Trust boundary, point 1: an unsigned release, one signed by a key the site does not trust, and one
    edited after signing are refused, one line each, before anything is unpacked or any node changes."""
    stranger = tmp_path / "stranger_ed25519"
    signing.create_key(stranger, "not the operator")
    copied_release(store_dir, "R2", "R-unsigned", None)
    copied_release(store_dir, "R2", "R-stranger", stranger)
    copied_release(store_dir, "R2", "R-edited", SIGNING_KEY)
    edited = store_dir / "R-edited" / MANIFEST
    edited.write_text(edited.read_text().replace('"built_at": "', '"built_at": "1', 1))
    try:
        for release, why in (("R-unsigned", "is not signed"), ("R-stranger", "does not trust"),
                             ("R-edited", "does not match its manifest")):
            before = sorted(p.name for p in (site / "releases").iterdir())
            for argv in (["site", "rebuild", "node0", release], ["rollout", release, "--no-rehearse"]):
                proc = imageupdate(*argv, "--site", str(site), "--store", str(store_dir))
                said = proc.stderr.strip().splitlines()
                assert proc.returncode == 2 and len(said) == 1 and why in said[0], (argv, proc.stderr)
                assert sorted(p.name for p in (site / "releases").iterdir()) == before, argv
            assert {n["current"] for n in status(site, store_dir).values()} == {"R1"}
        proc = imageupdate("keys", "trust", f"{stranger}.pub", "--name", "stranger", "--site", str(site))
        assert proc.returncode == 0, proc.stderr
        proc = imageupdate("site", "rebuild", "node0", "R-stranger", "--site", str(site), "--store", str(store_dir))
        assert proc.returncode == 0, proc.stderr  # trusted now: the same release goes through
        assert status(site, store_dir)["node0"]["current"] == "R-stranger"
    finally:
        imageupdate("site", "rebuild", "node0", "R1", "--site", str(site), "--store", str(store_dir))
        for name in ("R-unsigned", "R-stranger", "R-edited"):
            shutil.rmtree(store_dir / name, ignore_errors=True)


def test_a_crafted_image_writes_no_device_and_nodes_honour_none(site: Path, store_dir: Path) -> None:
    """Trust boundary: the device node hidden behind a parser differential is refused before anything is
    written; node roots and state are nodev; the site is closed to other host users."""
    crafted_release(store_dir, "R1", "R-evil")
    try:
        proc = imageupdate("site", "rebuild", "node0", "R-evil", "--site", str(site), "--store", str(store_dir))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        said = proc.stderr.strip().splitlines()
        assert len(said) == 1 and "device node 'dev/mem-evil'" in said[0], proc.stderr
        assert not (site / "releases/R-evil").exists()
        assert not [p for p in (site / "releases").iterdir() if p.name.startswith(".R-evil")]
        n = status(site, store_dir)["node0"]
        assert (n["current"], n["running"]) == ("R1", True)
    finally:
        shutil.rmtree(store_dir / "R-evil", ignore_errors=True)
    mounts = ssh(site, n["address"], "cat", "/proc/mounts").stdout.splitlines()
    flags = {f[1]: f[3].split(",") for f in (line.split() for line in mounts)}
    for where in ("/", "/mnt/state", "/run", "/tmp", "/dev/shm"):
        assert "nodev" in flags[where], (where, flags[where])
    assert os.stat(site).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("planted,command", [
    ("etc/sample-workload/sample-workload.conf", ["check-config", "--to", "R2"]),
    ("imageupdate/state.json", ["plan", "--to", "R2"]),
])
def test_the_host_does_not_follow_a_link_a_node_planted_in_its_state(site: Path, store_dir: Path, tmp_path: Path,
                                                                     planted: str, command: list[str]) -> None:
    """Seen: root on a node replaced its config on the state partition by a link to a host file, and
    check-config on the host printed that file's sections and keys. Now: one line naming the link."""
    secret = tmp_path / "host-secret.ini"
    secret.write_text('[database]\nadmin_password = hunter2\n{"state_version": 1}\n')
    target = site / "nodes/node0/state" / planted
    assert target.is_file(), target
    saved = target.read_bytes()
    target.unlink()
    target.symlink_to(secret)  # what root on node0 can do to its own state partition
    try:
        proc = imageupdate(*command, "--site", str(site), "--store", str(store_dir))
        said = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(said) == 1 and "is a symlink" in said[0], proc.stderr
        assert "database" not in proc.stdout + proc.stderr and "admin_password" not in proc.stdout + proc.stderr
        assert secret.read_text().startswith("[database]")  # and nothing was written through the link
    finally:
        target.unlink()
        target.write_bytes(saved)


ESCAPE = """
import ctypes, os, sys
site = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def tried(what, rc):
    print(what, "refused" if rc != 0 else "ALLOWED", os.strerror(ctypes.get_errno()) if rc != 0 else "")
tried("mount", libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
tried("mknod", libc.mknod(b"/tmp/mem", 0o20666, os.makedev(1, 1)))
tried("init_module", libc.syscall(175, None, 0, b""))
tried("pivot_root", libc.syscall(155, b"/", b"/"))
os.makedirs("/tmp/cell", exist_ok=True)
os.chroot("/tmp/cell")
os.chdir("../../../../../..")
os.chroot(".")
print("double chroot", "ESCAPED" if os.path.exists(site) else "stayed in the node")
print("proc", "ESCAPED" if os.path.exists("/proc/1/root" + site) else "stayed in the node")
try:
    with open("/proc/sys/kernel/core_pattern", "w") as f:
        f.write("|/bin/true")
    print("core_pattern ALLOWED")
except OSError as e:
    print("core_pattern refused", e)
"""


def test_root_in_a_node_cannot_leave_it(site: Path, store_dir: Path) -> None:
    """Seen: root in a node mounted a tmpfs, created a character device and left its chroot with a second
    chroot, then read the host's files. The node is entered with pivot_root and without the capabilities
    to mount, create devices or load modules."""
    addr = status(site, store_dir)["node0"]["address"]
    out = ssh(site, addr, "python3", "-", str(site), stdin=ESCAPE)
    said = out.stdout + out.stderr
    for attempt in ("mount", "mknod", "init_module", "pivot_root", "core_pattern"):
        assert f"{attempt} refused" in said, said
    assert "double chroot stayed in the node" in said and "proc stayed in the node" in said, said
    caps = ssh(site, addr, "grep", "CapBnd", "/proc/1/status").stdout.split()[-1]
    # sys_admin, mknod, sys_module, dac_read_search (open_by_handle_at), net_raw (ARP spoofing on the bridge)
    assert not int(caps, 16) & (1 << 21 | 1 << 27 | 1 << 16 | 1 << 2 | 1 << 13), caps


def test_only_imageupdate_reaches_the_sites_heat(site: Path, store_dir: Path) -> None:
    """Seen: any local user could signal SUCCESS for a failed gate (loopback Heat, noauth, port in a
    world-readable file). Now a request without the site's secret gets 401, and other users cannot read it."""
    imageupdate("heat", "start", "--site", str(site), "--store", str(store_dir), check=True)
    env = json.loads(imageupdate("heat", "env", "--site", str(site), "--store", str(store_dir), "--json",
                                 check=True).stdout)
    signal = f"{env['OS_ENDPOINT']}/stacks/{env['IMAGEUPDATE_STACK']}/x/resources/gate_node0_r1/signal"
    for token in (None, "guess"):
        req = urllib.request.Request(signal, data=b'{"status": "SUCCESS"}', method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"X-Auth-Token": token} if token else {})})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401
    other = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "cat",
                            str(site / "heat/secret")], capture_output=True, text=True, check=False)
    assert other.returncode != 0 and "Permission denied" in other.stderr
    listed = subprocess.run([str(Path(sys.executable).parent / "openstack"), "stack", "list", "-f", "json"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=False)
    assert listed.returncode == 0, listed.stderr[-500:]  # the operator's own client, through 'heat env'
    imageupdate("heat", "stop", "--site", str(site), "--store", str(store_dir), check=True)


def instances_of(site: Path, node: str) -> set[str]:
    """The pid namespaces of the processes in the node's network namespace, but the host's (where each
    instance's unshare wrapper runs): one per running instance."""
    ns = f"iu-{json.loads((site / 'site.json').read_text())['id']}-{node}"
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout.split()
    found = set()
    for pid in pids:
        try:
            found.add(os.readlink(f"/proc/{pid}/ns/pid"))
        except OSError:
            continue
    return found - {os.readlink("/proc/self/ns/pid")}


def test_rebuild_killed_while_starting_leaves_one_instance(site: Path, store_dir: Path) -> None:
    """Killed after it started the node and before it recorded its pid: the started instance must not live on
    beside the one recover starts (it held the node's ports and failed every later gate), and down stops all."""
    addr = status(site, store_dir)["node1"]["address"]
    http(addr, "/kv/k", b"before-crash", "PUT")
    proc = imageupdate("site", "rebuild", "node1", "R2", "--site", str(site), "--store", str(store_dir),
                       env={"IMAGEUPDATE_BREAK": "in-start@node1"})
    assert proc.returncode == -9, proc.stderr
    assert procs.wait_until(lambda: len(instances_of(site, "node1")) == 1, 10)  # the unrecorded one boots
    proc = imageupdate("site", "recover", "--site", str(site), "--store", str(store_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    imageupdate("site", "rebuild", "node1", "R1", "--site", str(site), "--store", str(store_dir), check=True)
    assert len(instances_of(site, "node1")) == 1
    n = status(site, store_dir)["node1"]
    assert (n["current"], n["running"]) == ("R1", True)
    assert os.readlink(f"/proc/{n['pid']}/ns/pid") in instances_of(site, "node1")
    assert health(addr)["release"] == "R1" and http(addr, "/kv/k") == b"before-crash"
    imageupdate("site", "down", "--site", str(site), "--store", str(store_dir), check=True)
    assert instances_of(site, "node1") == set()


def test_down_kills_an_instance_the_site_has_no_record_of(site: Path, store_dir: Path) -> None:
    record = site / "nodes/node0/node.json"
    rec = json.loads(record.read_text())
    namespaces = {os.readlink(f"/proc/{rec['pid']}/ns/pid")}
    rec["pid"] = None  # as a start killed before it saved the pid leaves it
    record.write_text(json.dumps(rec))
    imageupdate("site", "down", "--site", str(site), "--store", str(store_dir), check=True)
    assert processes_in(namespaces) == []


def test_down_leaves_nothing_and_up_brings_the_nodes_back(site: Path, store_dir: Path) -> None:
    site_id = json.loads((site / "site.json").read_text())["id"]
    addr = status(site, store_dir)["node2"]["address"]
    http(addr, "/kv/k", b"survives down", "PUT")
    namespaces = node_pid_namespaces(site, store_dir)
    assert len(namespaces) == 3 and len(processes_in(namespaces)) >= 9  # init, sshd, service per node
    assert leftovers(site_id, site) != []  # the check sees a running site
    proc = imageupdate("site", "down", "--site", str(site), "--store", str(store_dir))
    assert proc.returncode == 0, proc.stderr
    assert leftovers(site_id, site) == []
    assert processes_in(namespaces) == []
    proc = imageupdate("site", "up", "--site", str(site), "--store", str(store_dir))
    assert proc.returncode == 0, proc.stderr
    assert http(addr, "/kv/k") == b"survives down"
    again = imageupdate("site", "up", "--site", str(site), "--store", str(store_dir))
    assert again.returncode == 2 and "already up" in again.stderr
    imageupdate("site", "destroy", "--site", str(site), "--store", str(store_dir), check=True)
    assert leftovers(site_id, site) == [] and not site.exists()


def test_crashed_site_comes_back(site: Path, store_dir: Path) -> None:
    """SIGKILL every node's init (a crash of the site's processes): site up cleans up and returns."""
    nodes = status(site, store_dir)
    for n in nodes.values():
        subprocess.run(["kill", "-9", str(n["pid"])], check=True)
    proc = imageupdate("site", "up", "--site", str(site), "--store", str(store_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    for n in status(site, store_dir).values():
        assert n["running"] and health(n["address"])["release"] == "R1"


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "2", "--release", "R-nope"], "is not in the store"),
    (["--nodes", "0", "--release", "R1"], "--nodes must be between"),
    (["--nodes", "100000", "--release", "R1"], "--nodes must be between"),
    (["--nodes", "2"], "needs --nodes N and --release R"),
])
def test_site_up_bad_input(releases: dict, store_dir: Path, tmp_path: Path, args: list[str],  # type: ignore[type-arg]
                           needle: str) -> None:
    path = tmp_path / "bad-site"
    proc = imageupdate("site", "up", *args, "--site", str(path), "--store", str(store_dir))
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not path.exists()


def test_site_in_use_is_refused(site: Path, store_dir: Path) -> None:
    with LocalSite(site).locked():
        proc = imageupdate("site", "rebuild", "node0", "R2", "--site", str(site), "--store", str(store_dir))
    assert proc.returncode == 2 and "is in use by process" in proc.stderr
    assert status(site, store_dir)["node0"]["current"] == "R1"
