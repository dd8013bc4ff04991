"""Upgrade paths on real local nodes through a real Heat (needs root): skip-level R1 -> R4 with every
intermediate release's migration run from its own image, a killed migration resumed, a failing
contract step restored from the snapshot, config checked before anything starts.

The sample workload: R2 = 0002-json-to-sqlite (contract), R3 = 0003-add-created (expand), R4 =
0004-kv-to-entries (contract, min_from 3), [storage] fsync deprecated in 2 and removed in 4.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.functional.conftest import imageupdate
from tests.functional.test_rollout import cli, fleet, query, releases_of, rollouts, three_node_site
from tests.functional.test_site import health, http

pytestmark = pytest.mark.functional
CONF = "etc/sample-workload/sample-workload.conf"


@pytest.fixture
def site(upgrade_releases: dict, store_dir: Path, tmp_path: Path) -> Iterator[Path]:  # type: ignore[type-arg]
    yield from three_node_site(tmp_path / "site", store_dir)


def write_data(site: Path, store: Path, count: int = 50) -> dict[str, str]:
    addrs = {n["name"]: n["address"] for n in fleet(site, store)["nodes"]}
    for name, addr in addrs.items():
        for i in range(count):
            http(addr, f"/kv/key{i}", f"{name} value {i}".encode(), "PUT")
    return addrs


def assert_data(addrs: dict[str, str], count: int = 50) -> None:
    for name, addr in addrs.items():
        for i in range(count):
            assert http(addr, f"/kv/key{i}") == f"{name} value {i}".encode()


def state_record(site: Path, node: str) -> dict[str, Any]:
    return json.loads((site / "nodes" / node / "state/imageupdate/state.json").read_text())


def db_tables(site: Path, node: str) -> set[str]:
    db = sqlite3.connect(site / "nodes" / node / "state/var/lib/sample-workload/data.db")
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


def test_plan_shows_every_intermediate_migration_and_the_release_that_cannot_be_skipped(
        site: Path, store_dir: Path, tmp_path: Path) -> None:
    plan = json.loads(cli(site, store_dir, "plan", "--to", "R4", check=True).stdout)
    assert plan["migrates"] and len(plan["groups"]) == 1
    group = plan["groups"][0]
    assert group["nodes"] == ["node0", "node1", "node2"]
    assert (group["from_state"], group["to_state"], group["contract"]) == (1, 4, True)
    assert [(m["release"], m["name"], m["kind"], m["state_version"]) for m in group["steps"]] == [
        ("R2", "0002-json-to-sqlite", "contract", 2), ("R3", "0003-add-created", "expand", 3),
        ("R4", "0004-kv-to-entries", "contract", 4)]
    assert [(h["release"], bool(h["required"])) for h in group["hops"]] == [("R2", False), ("R3", True), ("R4", False)]
    assert "R4 upgrades only from version 3" in group["hops"][1]["required"]
    # a store without R3: the path is blocked, and the message says which state version is missing
    partial = tmp_path / "partial-store"
    partial.mkdir()
    for r in ("R1", "R2", "R4"):
        shutil.copytree(store_dir / r, partial / r, symlinks=True)
    blocked = imageupdate("plan", "--to", "R4", "--site", str(site), "--store", str(partial))
    assert blocked.returncode == 2
    assert "no release in" in blocked.stderr and "from version 2 to 3" in blocked.stderr
    assert "imageupdate build" in blocked.stderr


def test_skip_level_rollout_runs_every_migration_in_order_and_keeps_the_data(site: Path, store_dir: Path) -> None:
    addrs = write_data(site, store_dir)
    # the operator's config, written for R1's replacement option (R2 and later): no finding
    for n in addrs:
        (site / "nodes" / n / "state" / CONF).write_text("[storage]\nsync = true\n")
    proc = cli(site, store_dir, "rollout", "R4", "--resources", str(Path("tools/resources.d").resolve()))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded" and result["resources"] == "destroyed"
    assert releases_of(site, store_dir) == {"node0": "R4", "node1": "R4", "node2": "R4"}
    assert_data(addrs)  # intact, and converted: format 4, table entries, no kv left
    for n, addr in addrs.items():
        assert health(addr)["format"] == 4
        assert db_tables(site, n) == {"entries"}
        assert state_record(site, n)["version"] == 4
    rid = result["rollout"]["id"]
    rows = query(site, "SELECT node, phase, release, migration, kind, state_version, ok FROM migrations "
                       "WHERE rollout = ? ORDER BY started, id", rid)
    rehearsal = [r for r in rows if r["phase"] == "rehearsal"]
    assert [r["migration"] for r in rehearsal] == ["", "0002-json-to-sqlite", "0003-add-created",
                                                   "0004-kv-to-entries"]  # the whole, then each step
    assert all(r["ok"] == 1 for r in rehearsal)
    for n in addrs:
        mine = [(r["phase"], r["release"], r["migration"], r["state_version"], r["ok"]) for r in rows
                if r["node"] == n and r["phase"] != "rehearsal"]
        assert mine == [("snapshot", "", "", 1, 1), ("migration", "R2", "0002-json-to-sqlite", 2, 1),
                        ("migration", "R3", "0003-add-created", 3, 1), ("migration", "R4", "0004-kv-to-entries", 4, 1)]
    checks = query(site, "SELECT node, ok FROM checks WHERE rollout = ? AND name = 'state-version'", rid)
    assert sorted(tuple(c) for c in checks) == [("node0", 1), ("node1", 1), ("node2", 1)]
    # going back to R1 is a rollback, not a rollout
    down = cli(site, store_dir, "rollout", "R1")
    assert down.returncode == 2 and "is a downgrade" in down.stderr and "imageupdate rollback" in down.stderr
    # and the rollback restores the snapshot (contract steps ran), saying so: R1 reads its data again
    back = cli(site, store_dir, "rollback")
    assert back.returncode == 0, back.stderr
    assert releases_of(site, store_dir) == {"node0": "R1", "node1": "R1", "node2": "R1"}
    assert_data(addrs)
    log = " ".join(r["message"] for r in query(site, "SELECT message FROM log WHERE rollout = ?",
                                                json.loads(back.stdout)["rollout"]["id"]))
    assert "restored the state snapshot at version 1" in log and "changes made since the snapshot are gone" in log


def test_a_killed_migration_resumes_from_the_last_recorded_step(site: Path, store_dir: Path) -> None:
    addrs = write_data(site, store_dir, 20)
    killed = imageupdate("site", "rebuild", "node1", "R4", "--site", str(site), "--store", str(store_dir),
                         env={"IMAGEUPDATE_BREAK": "migration:0003-add-created"})
    assert killed.returncode == -9
    rec = state_record(site, "node1")
    assert rec["version"] == 2  # 0002 done, 0003 started and never finished
    assert [(s["migration"], s["ok"]) for s in rec["steps"]] == [("0002-json-to-sqlite", True),
                                                                  ("0003-add-created", None)]
    # the node does not come back on R1's code over migrated state
    recovered = imageupdate("site", "recover", "--site", str(site), "--store", str(store_dir), "--json")
    assert "stays stopped" in recovered.stdout and "0003-add-created" in recovered.stdout
    assert not {n["name"]: n for n in fleet(site, store_dir)["nodes"]}["node1"]["running"]
    resumed = imageupdate("site", "rebuild", "node1", "R4", "--site", str(site), "--store", str(store_dir), "--json")
    assert resumed.returncode == 0, resumed.stderr
    change = json.loads(resumed.stdout)["state"]
    assert "snapshot" not in change  # the snapshot taken before the first step is the one to keep
    assert [s["migration"] for s in change["steps"]] == ["0003-add-created", "0004-kv-to-entries"]
    rec = state_record(site, "node1")
    assert rec["version"] == 4 and [s["migration"] for s in rec["steps"] if s["ok"]] == [
        "0002-json-to-sqlite", "0003-add-created", "0004-kv-to-entries"]
    assert_data({"node1": addrs["node1"]}, 20)
    assert health(addrs["node1"])["release"] == "R4"


def test_a_failing_contract_step_restores_the_snapshot_and_leaves_the_fleet_on_r1(site: Path,
                                                                                  store_dir: Path) -> None:
    addrs = write_data(site, store_dir, 20)
    before = {n: (site / "nodes" / n / "state/var/lib/sample-workload/data.json").read_bytes() for n in addrs}
    # the rehearsal catches it first, on a copy: nothing touched
    proc = cli(site, store_dir, "rollout", "R4-badmig")
    assert proc.returncode == 1
    assert "rehearsal failed: migration 0004-kv-to-entries of R4-badmig failed" in proc.stderr
    assert not any((site / "nodes" / n / "snapshots").exists() for n in addrs)
    assert all(state_record(site, n)["version"] == 1 for n in addrs)
    # without the rehearsal the first node meets it: its state is restored and it goes back to R1
    proc = cli(site, store_dir, "rollout", "R4-badmig", "--no-rehearse")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["status"] == "rolled-back" and result["rollback"]["status"] == "succeeded"
    assert "migration 0004-kv-to-entries of R4-badmig (contract) failed on node0" in result["reason"]
    assert releases_of(site, store_dir) == {"node0": "R1", "node1": "R1", "node2": "R1"}
    assert all(n["running"] for n in fleet(site, store_dir)["nodes"])
    for n, addr in addrs.items():  # data as it was, byte for byte
        assert (site / "nodes" / n / "state/var/lib/sample-workload/data.json").read_bytes() == before[n]
        assert health(addr)["format"] == 1
    assert_data(addrs, 20)
    assert not (site / "nodes/node0/state/var/lib/sample-workload/data.db").exists()
    rb = result["rollback"]["rollout"]["id"]
    phases = [tuple(r) for r in query(site, "SELECT node, phase, ok FROM migrations WHERE rollout = ?", rb)]
    assert phases == [("node0", "restore", 1)]
    failed = query(site, "SELECT migration, ok FROM migrations WHERE rollout = ? AND phase = 'migration'",
                   result["rollout"]["id"])
    assert [tuple(r) for r in failed] == [("0002-json-to-sqlite", 1), ("0003-add-created", 1),
                                          ("0004-kv-to-entries", 0)]


def test_a_removed_config_option_is_caught_before_anything_starts(site: Path, store_dir: Path,
                                                                  tmp_path: Path) -> None:
    (site / "nodes/node1/state" / CONF).write_text("[storage]\nfsync = false\n")
    n_before = len(rollouts(site))
    proc = cli(site, store_dir, "rollout", "R4")
    assert proc.returncode == 2
    assert "node1:/etc/sample-workload/sample-workload.conf: [storage] fsync was removed in R4" in proc.stderr
    assert "use [storage] sync instead" in proc.stderr and "nothing was started" in proc.stderr
    assert len(rollouts(site)) == n_before
    assert releases_of(site, store_dir) == {"node0": "R1", "node1": "R1", "node2": "R1"}
    assert all(state_record(site, n)["version"] == 1 for n in ("node0", "node1", "node2"))
    # check-config says the same, with the deprecation on the way, and exits 1
    checked = cli(site, store_dir, "check-config", "--to", "R4")
    assert checked.returncode == 1
    findings = json.loads(checked.stdout)["findings"]
    assert [(f["level"], f["release"], f["option"]) for f in findings] == [
        ("warning", "R2", "storage.fsync"), ("error", "R4", "storage.fsync")]
    assert cli(site, store_dir, "check-config", "--to", "R3").returncode == 0  # deprecated only: a warning
    # operator files, with no site: matched by name; one that does not parse is bad input
    good = tmp_path / "sample-workload.conf"
    good.write_text("[storage]\nsync = false\n")
    ok = imageupdate("check-config", "--to", "R4", "--from", "R1", str(good), "--store", str(store_dir), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["findings"] == []
    good.write_text("[storage\nsync = false\n")
    bad = imageupdate("check-config", "--to", "R4", "--from", "R1", str(good), "--store", str(store_dir))
    assert bad.returncode == 2 and "is not a valid INI config file" in bad.stderr


def test_rehearse_runs_the_path_on_a_copy_and_changes_nothing(site: Path, store_dir: Path) -> None:
    addrs = write_data(site, store_dir, 20)
    data = {n: (site / "nodes" / n / "state/var/lib/sample-workload/data.json").read_bytes() for n in addrs}
    proc = cli(site, store_dir, "rehearse", "--to", "R4", "--node", "node2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["node"] == "node2" and (report["from_state"], report["to_state"]) == (1, 4)
    assert [(s["migration"], s["ok"], s["idempotent"]) for s in report["steps"]] == [
        ("0002-json-to-sqlite", True, True), ("0003-add-created", True, True), ("0004-kv-to-entries", True, True)]
    assert Path(report["report"]).is_file()
    for n, addr in addrs.items():
        assert (site / "nodes" / n / "state/var/lib/sample-workload/data.json").read_bytes() == data[n]
        assert state_record(site, n)["version"] == 1 and health(addr)["release"] == "R1"
    assert not (site / "upgrade/rehearsal").exists() or not any((site / "upgrade/rehearsal").iterdir())
    assert_data(addrs, 20)
