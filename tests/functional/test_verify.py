"""Verification on a real site (needs root): the gate's evidence, resource survival hooks, the downtime
probe, stale code on a node, and the HTML report rendered in headless Chromium.

The tests share one 3-node site and run in file order: R1 -> R2 with hooks, R2 -> R-broken (rolled back),
then checks and bad input on the fleet back on R2.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.conftest import imageupdate, live_processes_mentioning
from tests.functional.test_rollout import query, releases_of, three_node_site
from tests.functional.test_site import ssh

pytestmark = pytest.mark.functional

RECORDER = """#!/bin/sh
# keeps a token from create to destroy; fails if the key-value store lost it
set -eu
case "$1" in
  create) od -An -N8 -tx1 /dev/urandom | tr -d ' \\n' > "$IMAGEUPDATE_KV/token" ;;
esac
echo "token $(cat "$IMAGEUPDATE_KV/token") ${IMAGEUPDATE_NODE:-fleet}"
"""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(releases: dict, store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:  # type: ignore[type-arg]
    yield from three_node_site(tmp_path_factory.mktemp("verify") / "site", store_dir)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hooks")
    shutil.copy(Path(__file__).resolve().parents[2] / "tools/resources.d/sample-workload", d / "10-sample-workload")
    (d / "20-recorder").write_text(RECORDER)
    (d / "20-recorder").chmod(0o755)
    return d


def cli(site: Path, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return imageupdate(*args, "--site", str(site), "--store", str(store), "--json")


def test_a_rollout_runs_every_check_the_hooks_in_order_and_measures_downtime(site: Path, store_dir: Path,
                                                                            hooks: Path) -> None:
    proc = cli(site, store_dir, "rollout", "R2", "--resources", str(hooks), "--probe-interval", "0.02")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rid = out["rollout"]["id"]
    assert out["status"] == "succeeded" and out["resources"] == "destroyed"
    nodes = ["node0", "node1", "node2"]
    # every gate ran the built-in checks, the shipped tests and the hooks, and all passed
    checks = {(r["node"], r["name"]): r["ok"] for r in query(site, "SELECT * FROM checks WHERE rollout = ?", rid)}
    for n in nodes:
        for name in ("facts", "release", "services", "stale-code", "config", "filesystems", "test:10-service-health",
                     "test:20-data-roundtrip", "resources:10-sample-workload:verify",
                     "resources:20-recorder:verify_noapi", "resources:20-recorder:verify"):
            assert checks.get((n, name)) == 1, (n, name, checks)
    # the evidence travelled with the signal: the gate's data in Heat names every check
    env = json.loads(cli(site, store_dir, "heat", "env").stdout)
    shown = subprocess.run([str(Path(sys.executable).parent / "openstack"), "stack", "resource", "show",
                            env["IMAGEUPDATE_STACK"], f"gate_node1_r{rid}", "-f", "json"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, **env}, check=True)
    gate_data = str(json.loads(shown.stdout)["attributes"]["data"])
    assert all(name in gate_data for name in ("stale-code", "config", "test:20-data-roundtrip", "failed"))
    # the phases in order: create, then per node verify_noapi and verify, then destroy; the data lasted
    runs = query(site, "SELECT * FROM hooks WHERE rollout = ? AND script = '20-recorder' ORDER BY id", rid)
    assert [(r["phase"], r["node"]) for r in runs] == [("create", None)] + [
        (phase, n) for n in nodes for phase in ("verify_noapi", "verify")] + [("destroy", None)]
    tokens = {r["output"].split()[1] for r in runs}
    assert len(tokens) == 1 and all(r["ok"] for r in runs), [r["output"] for r in runs]
    assert not (site / "resources" / "kv").exists()  # destroyed: the store is gone too
    # the probe saw each node's service go down during its rebuild, and come back
    probes = {r["node"]: r for r in query(site, "SELECT * FROM probes WHERE rollout = ?", rid)}
    assert set(probes) == set(nodes)
    for n in nodes:
        p = probes[n]
        outages = json.loads(p["outages"])
        assert p["requests"] > p["failures"] >= 1 and outages, dict(p)
        assert p["downtime"] == pytest.approx(sum(b - a for a, b in outages), abs=0.01) and p["downtime"] > 0


def test_the_broken_release_fails_its_gate_naming_the_check_and_the_report_shows_it(
        site: Path, store_dir: Path, hooks: Path, tmp_path: Path) -> None:
    proc = cli(site, store_dir, "rollout", "R-broken", "--resources", str(hooks))
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["status"] == "rolled-back"
    assert "node0 on R-broken: check test:20-data-roundtrip failed: wrote" in out["reason"]
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
    gate = query(site, "SELECT data FROM steps WHERE rollout = ? AND node = 'node0' AND step = 'gate'",
                 out["rollout"]["id"])
    evidence = {c["name"]: c["ok"] for c in json.loads(gate[0]["data"])["checks"]}
    assert evidence["test:20-data-roundtrip"] is False and evidence["stale-code"] is True

    page = tmp_path / "report.html"
    rep = cli(site, store_dir, "report", "--output", str(page))
    assert rep.returncode == 0, rep.stderr
    doc = json.loads(rep.stdout)
    assert doc["rollout"]["id"] == out["rollout"]["id"] and doc["rollback"] is not None
    assert ("node0", "test:20-data-roundtrip") in {(c["node"], c["name"]) for c in doc["summary"]["failed_checks"]}
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (tools/test.sh installs it)"
    profile = tmp_path / "chromium"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert '<li class="failed-check"><b>node0</b>: test:20-data-roundtrip:' in dom
    assert "Rollback: rollback" in dom and 'class="seg down"' in dom
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2000",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def gate_evidence(site: Path, rollout: int, node: str) -> dict[str, dict]:  # type: ignore[type-arg]
    rows = query(site, "SELECT * FROM checks WHERE rollout = ? AND node = ?", rollout, node)
    return {r["name"]: dict(r) for r in rows}


def test_a_service_answering_500_fails_its_gate_on_the_builtin_checks_alone(site: Path, store_dir: Path,
                                                                           gate_releases: dict) -> None:  # type: ignore[type-arg]
    proc = cli(site, store_dir, "rollout", "R-500")
    assert proc.returncode == 1, proc.stdout[-2000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "rolled-back", out
    assert "node0 on R-500: check health failed: sample-workload: http://127.0.0.1:8080/health answered 500" \
        in out["reason"], out["reason"]
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
    evidence = gate_evidence(site, out["rollout"]["id"], "node0")
    assert not any(name.startswith("test:") for name in evidence)  # R-500 ships no tests: built-ins alone
    assert evidence["services"]["ok"] and not evidence["health"]["ok"]
    assert not evidence["probe"]["ok"] and "was down for the whole gate" in evidence["probe"]["output"]
    assert "node1" not in {r["node"] for r in query(site, "SELECT node FROM checks WHERE rollout = ?",
                                                    out["rollout"]["id"])}


def test_code_run_from_tmp_the_state_partition_and_dev_shm_fails_stale_code(site: Path, store_dir: Path,
                                                                            gate_releases: dict) -> None:  # type: ignore[type-arg]
    proc = cli(site, store_dir, "rollout", "R-stale")
    assert proc.returncode == 1, proc.stdout[-2000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "rolled-back" and "check stale-code failed" in out["reason"], out
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
    evidence = gate_evidence(site, out["rollout"]["id"], "node0")
    stale = evidence["stale-code"]["output"]
    assert not evidence["stale-code"]["ok"] and stale.startswith("3 process(es) run code that is not R-stale's"), \
        stale
    assert "(/usr/bin/python3 /tmp/old.py): runs script /tmp/old.py, which is not on the release's root" in stale
    assert "(/mnt/state/stale-code/sleep infinity): runs /mnt/state/stale-code/sleep, which is not on the " \
           "release's root" in stale
    assert "(/usr/bin/python3 /usr/lib/sample-workload-stale/shm_lib.py): maps deleted /dev/shm/libstale-" in stale
    # the same rule passes the sample service and every other check
    assert all(evidence[n]["ok"] for n in ("services", "health", "config", "test:20-data-roundtrip")), evidence


INJECT = r"""
import ctypes, os, struct, sys
src, pid, target = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)
def ok(rc, what):
    if rc < 0:
        sys.exit(f"{what}: {os.strerror(ctypes.get_errno())}")
    return rc
fd = ok(libc.syscall(428, -100, src.encode(), 1 | 0x80000), "open_tree")  # OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
attr = struct.pack("QQQQ", 1, 0, 0, 0)  # struct mount_attr: attr_set = MOUNT_ATTR_RDONLY
ok(libc.syscall(442, fd, b"", 0x1000, attr, len(attr)), "mount_setattr")  # AT_EMPTY_PATH
ok(libc.setns(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY), 0x00020000), "setns")  # CLONE_NEWNS
ok(libc.syscall(429, fd, b"", -100, target.encode(), 4), "move_mount")  # MOVE_MOUNT_F_EMPTY_PATH
"""
UNMOUNT = r"""
import ctypes, os, sys
pid, target = sys.argv[1:]
libc = ctypes.CDLL(None, use_errno=True)
if libc.setns(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY), 0x00020000) != 0 or libc.umount2(target.encode(), 2) != 0:
    sys.exit(f"umount {target}: {os.strerror(ctypes.get_errno())}")  # 2: MNT_DETACH
"""


def show_in_node(pid: int, source: Path, target: str) -> None:
    """Mount the host's ``source`` (read-only) at ``target`` inside a node: the node's root was entered with
    pivot_root and the host's detached, so no host path can be named from inside; a detached clone of the
    host's tree is moved in instead (open_tree, then move_mount after setns)."""
    subprocess.run([sys.executable, "-c", INJECT, str(source), str(pid), target], check=True)


def test_a_process_left_on_the_old_release_is_flagged_as_stale(site: Path, store_dir: Path) -> None:
    node = json.loads((site / "nodes/node1/node.json").read_text())
    addr = {n["name"]: n["address"] for n in json.loads(cli(site, store_dir, "status").stdout)["nodes"]}["node1"]
    old = site / "nodes/node1/state/old-release"
    old.mkdir()
    # R1's tree, still on the host, shown inside node1 (read-only) as /mnt/state/old-release
    target = "/mnt/state/old-release"
    show_in_node(node["pid"], site / "releases/R1", target)
    try:
        started = ssh(site, addr, "setsid chroot /mnt/state/old-release /usr/bin/python3 -c "
                                  "'import time; time.sleep(600)' </dev/null >/dev/null 2>&1 & sleep 0.5; echo ok")
        assert started.returncode == 0, started.stderr
        proc = cli(site, store_dir, "check")
        assert proc.returncode == 1
        verdicts = {v["node"]: v for v in json.loads(proc.stdout)["nodes"]}
        assert verdicts["node0"]["ok"] and verdicts["node2"]["ok"]
        stale = {c["name"]: c for c in verdicts["node1"]["checks"]}["stale-code"]
        assert not stale["ok"]
        assert "runs /mnt/state/old-release/usr/bin/python3.11, which is not on the release's root" in stale["output"]
        assert "check stale-code failed" in verdicts["node1"]["reason"]
        assert "nodes failed their checks" in proc.stderr
    finally:
        ssh(site, addr, "pkill -f 'time[.]sleep[(]600[)]'; true")
        subprocess.run([sys.executable, "-c", UNMOUNT, str(node["pid"]), target], check=True)
    again = cli(site, store_dir, "check", "node1")
    assert again.returncode == 0, again.stdout


def test_a_hanging_hook_is_cut_off_and_nothing_is_touched(site: Path, store_dir: Path, tmp_path: Path) -> None:
    hang = tmp_path / "hang"
    hang.mkdir()
    (hang / "10-hang").write_text("#!/bin/sh\n[ \"$1\" = create ] && exec sleep 600\nexit 0\n")
    (hang / "10-hang").chmod(0o755)
    # R-broken: the same version as R2 (no migration), so only the hook stands in the way
    proc = cli(site, store_dir, "rollout", "R-broken", "--resources", str(hang), "--hook-timeout", "2")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["status"] == "failed"
    assert out["reason"] == "resource hook 10-hang create failed: timed out after 2 s (killed)"
    assert out["resources"] == "destroyed"
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
    assert not query(site, "SELECT * FROM steps WHERE rollout = ? AND status != 'pending'", out["rollout"]["id"])
    assert not live_processes_mentioning("sleep 600")


def test_bad_input_starts_nothing(site: Path, store_dir: Path, tmp_path: Path) -> None:
    before = len(query(site, "SELECT id FROM rollouts"))
    proc = cli(site, store_dir, "rollout", "R1", "--resources", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    notexec = tmp_path / "hooks"
    notexec.mkdir()
    (notexec / "x").write_text("#!/bin/sh\n")
    proc = cli(site, store_dir, "rollout", "R1", "--resources", str(notexec))
    assert proc.returncode == 2 and "is not executable: chmod +x" in proc.stderr
    assert len(query(site, "SELECT id FROM rollouts")) == before
    proc = cli(site, store_dir, "report", "999")
    assert proc.returncode == 2 and "no rollout 999 in" in proc.stderr
    proc = cli(site, store_dir, "check", "node9")
    assert proc.returncode == 2 and "unknown nodes: node9" in proc.stderr
