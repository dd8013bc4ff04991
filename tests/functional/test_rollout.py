"""Rollouts through a real ephemeral Heat onto real local nodes (needs root).

Each test gets its own 3-node site on R1 (and so its own Heat and stack); the releases come from the
session's store (R1, R2 and R-broken, built with the real disk-image-create).
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageupdate.base import procs
from tests.functional.conftest import imageupdate, live_processes_mentioning
from tests.functional.test_site import http, leftovers

pytestmark = pytest.mark.functional


def three_node_site(path: Path, store_dir: Path, release: str = "R1", nodes: int = 3) -> Iterator[Path]:
    """A site of ``nodes`` nodes on ``release`` at ``path``; destroyed afterwards, and nothing of it (its Heat
    included) left."""
    imageupdate("site", "up", "--nodes", str(nodes), "--release", release, "--site", str(path), "--store",
                str(store_dir), check=True)
    site_id = json.loads((path / "site.json").read_text())["id"]
    try:
        yield path
    finally:
        imageupdate("site", "destroy", "--force", "--site", str(path), "--store", str(store_dir))
        assert not leftovers(site_id, path)
        assert not live_processes_mentioning(f"{path}/heat")


@pytest.fixture
def site(releases: dict, store_dir: Path, tmp_path: Path) -> Iterator[Path]:  # type: ignore[type-arg]
    yield from three_node_site(tmp_path / "site", store_dir)


def cli(site: Path, store: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return imageupdate(*args, "--site", str(site), "--store", str(store), "--json", check=check)


def fleet(site: Path, store: Path) -> dict[str, Any]:
    return json.loads(cli(site, store, "status", check=True).stdout)


def releases_of(site: Path, store: Path) -> dict[str, str]:
    return {n["name"]: n["release"] for n in fleet(site, store)["nodes"]}


def query(site: Path, sql: str, *args: object) -> list[sqlite3.Row]:
    """Read the history as any tool would; no history yet reads as no rows."""
    if not (site / "history.sqlite").exists():
        return []
    db = sqlite3.connect(f"file:{site / 'history.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        db.row_factory = sqlite3.Row
        return db.execute(sql, args).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    finally:
        db.close()


def steps(site: Path, rollout: int) -> dict[tuple[str, str], sqlite3.Row]:
    return {(r["node"], r["step"]): r for r in query(site, "SELECT * FROM steps WHERE rollout = ?", rollout)}


def rollouts(site: Path) -> list[sqlite3.Row]:
    return query(site, "SELECT * FROM rollouts ORDER BY id")


def put_data(site: Path, store: Path) -> dict[str, str]:
    addrs = {n["name"]: n["address"] for n in fleet(site, store)["nodes"]}
    for name, addr in addrs.items():
        http(addr, "/kv/owner", f"data of {name}".encode(), "PUT")
    return addrs


def assert_data(addrs: dict[str, str]) -> None:
    for name, addr in addrs.items():
        assert http(addr, "/kv/owner") == f"data of {name}".encode()


def wait_for(predicate: Any, timeout: float = 120) -> None:
    assert procs.wait_until(predicate, timeout, interval=0.2), "timed out waiting"


def heat_pid(site: Path) -> int:
    return int(json.loads((site / "heat/heat.json").read_text())["pid"])


def background_rollout(site: Path, store: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "imageupdate", "rollout", *args, "--site", str(site),
                             "--store", str(store), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_rollout_goes_node_by_node_behind_gates(site: Path, store_dir: Path) -> None:
    addrs = put_data(site, store_dir)
    proc = cli(site, store_dir, "rollout", "R2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded"
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
    assert_data(addrs)  # state kept and converted by R2's migration
    st = steps(site, result["rollout"]["id"])
    for n in ("node0", "node1", "node2"):
        assert st[(n, "rebuild")]["status"] == st[(n, "gate")]["status"] == "succeeded"
        assert st[(n, "gate")]["finished"] > st[(n, "gate")]["started"] >= st[(n, "rebuild")]["finished"] - 0.01
    # strict order: a node starts only after the gate of the node before it passed
    assert st[("node1", "rebuild")]["started"] >= st[("node0", "gate")]["finished"] - 1.0
    assert st[("node2", "rebuild")]["started"] >= st[("node1", "gate")]["finished"] - 1.0
    assert st[("node0", "gate")]["finished"] < st[("node1", "gate")]["started"] < st[("node2", "gate")]["started"]
    checks = [tuple(r) for r in query(site, "SELECT node, name, ok FROM checks WHERE rollout = ?",
                                      result["rollout"]["id"])]
    assert ("node1", "test:20-data-roundtrip", 1) in checks and ("node1", "release", 1) in checks
    # the stack as the standard client sees it
    env = json.loads(cli(site, store_dir, "heat", "env", check=True).stdout)
    events = subprocess.run([str(Path(sys.executable).parent / "openstack"), "stack", "event", "list",
                             env["IMAGEUPDATE_STACK"], "-f", "json"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env}, check=True)
    names = {e["resource_name"] for e in json.loads(events.stdout)}
    assert {"server_node0", f"gate_node2_r{result['rollout']['id']}"} <= names
    # nothing left to do: a second rollout to the same release is a no-op
    again = json.loads(cli(site, store_dir, "rollout", "R2", check=True).stdout)
    assert again["status"] == "nothing-to-do"


def test_broken_release_fails_on_its_first_node_and_rolls_back(site: Path, store_dir: Path) -> None:
    cli(site, store_dir, "rollout", "R2", check=True)
    addrs = put_data(site, store_dir)
    proc = cli(site, store_dir, "rollout", "R-broken")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["status"] == "rolled-back"
    assert "node0" in result["reason"] and "20-data-roundtrip" in result["reason"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("imageupdate: error:")]
    assert len(errors) == 1 and "rolled back" in errors[0]
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
    assert_data(addrs)
    st = steps(site, result["rollout"]["id"])
    assert st[("node0", "gate")]["status"] == "failed"
    assert st[("node1", "rebuild")]["status"] == st[("node2", "rebuild")]["status"] == "pending"  # untouched
    assert ("node1", "gate") not in st and ("node2", "gate") not in st
    rb = result["rollback"]
    assert rb["status"] == "succeeded" and rb["rollout"]["parent"] == result["rollout"]["id"]
    rb_steps = steps(site, rb["rollout"]["id"])
    assert set(rb_steps) == {("node0", "rebuild"), ("node0", "gate")}
    assert rb_steps[("node0", "gate")]["status"] == "succeeded"
    # the rebuild of node1 and node2 never happened: their previous release is still R1
    for n in ("node1", "node2"):
        record = json.loads((site / "nodes" / n / "node.json").read_text())
        assert (record["current"], record["previous"]) == ("R2", "R1")
    # the fleet can move on after a rollback
    assert json.loads(cli(site, store_dir, "status", check=True).stdout)["active"] is None


def test_canary_then_batches_of_two(site: Path, store_dir: Path) -> None:
    # canary node0, then node1 and node2 together
    proc = cli(site, store_dir, "rollout", "R2", "--canary", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rollout"]["plan"]["batches"] == [["node0"], ["node1", "node2"]]
    st = steps(site, result["rollout"]["id"])
    canary_passed = st[("node0", "gate")]["finished"]
    for n in ("node1", "node2"):
        assert st[(n, "rebuild")]["started"] >= canary_passed - 1.0
    # the batch ran together: each one's rebuild started before the other's gate finished
    assert st[("node1", "rebuild")]["started"] < st[("node2", "gate")]["finished"]
    assert st[("node2", "rebuild")]["started"] < st[("node1", "gate")]["finished"]


def test_no_rollback_leaves_the_fleet_for_inspection_then_rollback(site: Path, store_dir: Path) -> None:
    proc = cli(site, store_dir, "rollout", "R-broken", "--no-rollback", "--limit", "node1,node2")
    assert proc.returncode == 1 and proc.stdout, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "failed" and result["rollback"] is None
    assert "--no-rollback" in proc.stderr and "imageupdate rollback" in proc.stderr
    assert releases_of(site, store_dir) == {"node0": "R1", "node1": "R-broken", "node2": "R1"}
    proc = cli(site, store_dir, "rollback")
    assert proc.returncode == 0, proc.stderr
    assert releases_of(site, store_dir) == {"node0": "R1", "node1": "R1", "node2": "R1"}
    assert rollouts(site)[-2]["status"] == "rolled-back"


def test_pause_between_batches_resume_and_cancel(site: Path, store_dir: Path) -> None:
    proc = cli(site, store_dir, "rollout", "R2", "--pause-between-batches")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "paused"
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R1", "node2": "R1"}
    status = fleet(site, store_dir)
    assert status["active"]["state"] == "paused"
    second = cli(site, store_dir, "rollout", "R2")
    assert second.returncode == 2 and "imageupdate resume" in second.stderr
    proc = cli(site, store_dir, "resume")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "paused"
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R1"}
    proc = cli(site, store_dir, "cancel")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert "status" in result, proc.stdout + proc.stderr  # an error document instead: say which
    assert result["status"] == "cancelled" and result["rollback"]["status"] == "succeeded"
    assert releases_of(site, store_dir) == {"node0": "R1", "node1": "R1", "node2": "R1"}


def test_rollout_killed_mid_way_is_finished_by_resume(site: Path, store_dir: Path) -> None:
    addrs = put_data(site, store_dir)
    child = background_rollout(site, store_dir, "R2")
    try:
        wait_for(lambda: ("node0", "gate") in steps(site, 2) and steps(site, 2)[("node0", "gate")]["finished"])
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    status = fleet(site, store_dir)
    assert status["active"]["state"] == "interrupted"
    second = cli(site, store_dir, "rollout", "R2")
    assert second.returncode == 2 and "was interrupted" in second.stderr
    proc = cli(site, store_dir, "resume")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded"
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
    assert_data(addrs)


def test_heat_killed_mid_rollout_is_finished_by_resume(site: Path, store_dir: Path) -> None:
    child = background_rollout(site, store_dir, "R2")
    wait_for(lambda: ("node1", "gate") in steps(site, 2))
    os.kill(heat_pid(site), signal.SIGKILL)
    _out, err = child.communicate(timeout=120)
    assert child.returncode == 1 and "Heat stopped answering" in err and "imageupdate resume" in err
    proc = cli(site, store_dir, "resume")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded"
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
    row = rollouts(site)[1]
    assert row["status"] == "succeeded" and row["id"] == 2


def test_bad_input_starts_nothing(site: Path, store_dir: Path) -> None:
    cases = [
        (("rollout", "R9"), "R9"),
        (("rollout", "R2", "--limit", "node0,node7"), "node7"),
        (("rollout", "R2", "--batch-size", "0"), "--batch-size"),
        (("rollout", "R2", "--gate-timeout", "0"), "--gate-timeout"),
        (("rollback", "--to", "R9"), "R9"),
        (("resume",), "nothing to resume"),
        (("cancel",), "nothing to cancel"),
    ]
    for args, named in cases:
        proc = cli(site, store_dir, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = proc.stderr.strip().splitlines()
        assert len(errors) == 1 and named in errors[0], (args, proc.stderr)
    assert not rollouts(site)
    # a second rollout while one runs
    child = background_rollout(site, store_dir, "R2")
    try:
        wait_for(lambda: any(r["kind"] == "rollout" for r in rollouts(site)))
        proc = cli(site, store_dir, "rollout", "R2")
        assert proc.returncode == 2 and "operating this site's fleet" in proc.stderr
    finally:
        child.communicate(timeout=300)
    assert child.returncode == 0
    # a site that is not up
    cli(site, store_dir, "site", "down", check=True)
    proc = cli(site, store_dir, "rollout", "R1")
    assert proc.returncode == 2 and "not up" in proc.stderr
    assert [r["kind"] for r in rollouts(site)] == ["adopt", "rollout"]


def test_heat_service_starts_once_and_stops(site: Path, store_dir: Path) -> None:
    first = json.loads(cli(site, store_dir, "heat", "start", check=True).stdout)
    again = json.loads(cli(site, store_dir, "heat", "start", check=True).stdout)
    assert first["pid"] == again["pid"] and first["endpoint"].startswith("http://127.0.0.1:")
    cli(site, store_dir, "site", "down", check=True)  # takes the site's Heat down with it
    assert not procs.alive(first["pid"])
    assert json.loads(cli(site, store_dir, "heat", "status", check=True).stdout)["running"] is False


def test_gate_timing_out_while_nobody_watches_is_rolled_back_by_resume(site: Path, store_dir: Path) -> None:
    # imageupdate dies with node0's verdict in hand, before it signals: the gate times out in Heat
    proc = imageupdate("rollout", "R2", "--gate-timeout", "3", "--site", str(site), "--store", str(store_dir),
                       env={"IMAGEUPDATE_BREAK": "before-signal"})
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: fleet(site, store_dir)["stack"]["state"] == "UPDATE_FAILED", timeout=60)
    proc = cli(site, store_dir, "resume")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["status"] == "rolled-back" and "timed out" in result["reason"]
    assert steps(site, result["rollout"]["id"])[("node0", "gate")]["status"] == "timed-out"
    assert result["rollback"]["rollout"]["options"]["gate_timeout"] == 600  # the way back is not rushed
    assert releases_of(site, store_dir) == {"node0": "R1", "node1": "R1", "node2": "R1"}


def test_rollout_killed_before_its_update_reached_heat_is_sent_by_resume(site: Path, store_dir: Path) -> None:
    proc = imageupdate("rollout", "R2", "--site", str(site), "--store", str(store_dir),
                       env={"IMAGEUPDATE_BREAK": "before-update"})
    assert proc.returncode == -signal.SIGKILL
    assert fleet(site, store_dir)["active"]["state"] == "interrupted"
    assert releases_of(site, store_dir) == {"node0": "R1", "node1": "R1", "node2": "R1"}
    proc = cli(site, store_dir, "resume")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "succeeded"
    assert releases_of(site, store_dir) == {"node0": "R2", "node1": "R2", "node2": "R2"}
