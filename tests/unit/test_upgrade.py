"""Upgrade paths as logic: metadata validation, the planner, state compatibility, snapshots (real tar on
real files), config checks, and the rehearsal's idempotency test with real migration scripts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imageupdate.images.upgrade_meta import Migration, ReleaseMeta, parse, version_key
from imageupdate.upgrade import config, snapshot, state
from imageupdate.upgrade.plan import DowngradeRefused, PathBlocked, ReleaseInfo, plan
from imageupdate.upgrade.rehearse import digest, rehearse
from imageupdate.upgrade.sandbox import RunResult

CONF = "/etc/sample-workload/sample-workload.conf"


def meta(version: str, sv: int, migrations: list[tuple[str, int, str]] = (), min_from: str | None = None,
         schema: dict[str, Any] | None = None) -> ReleaseMeta:
    data: dict[str, Any] = {"version": version, "state_version": sv, "min_from": min_from,
                            "migrations": [{"name": n, "state_version": s, "kind": k} for n, s, k in migrations]}
    if schema is not None:
        data["config"] = {CONF: schema}
    m, problems = parse(data)
    assert m is not None, problems
    return m


def sample(**extra: ReleaseInfo) -> dict[str, ReleaseInfo]:
    """The sample workload's R1 to R4 (and whatever else a test adds)."""
    releases = {
        "R1": ReleaseInfo("R1", meta("1", 1, schema={"options": ["storage.fsync"]}), "2026-01-01"),
        "R2": ReleaseInfo("R2", meta("2", 2, [("0002-json-to-sqlite", 2, "contract")], schema={
            "options": ["storage.sync"],
            "deprecated": {"storage.fsync": {"since": "2", "replacement": "storage.sync"}}}), "2026-01-02"),
        "R3": ReleaseInfo("R3", meta("3", 3, [("0003-add-created", 3, "expand")], schema={
            "options": ["storage.sync"],
            "deprecated": {"storage.fsync": {"since": "2", "replacement": "storage.sync"}}}), "2026-01-03"),
        "R4": ReleaseInfo("R4", meta("4", 4, [("0004-kv-to-entries", 4, "contract")], min_from="3", schema={
            "options": ["storage.sync"],
            "removed": {"storage.fsync": {"since": "4", "replacement": "storage.sync"}}}), "2026-01-04"),
    }
    return releases | extra


# metadata -----------------------------------------------------------------------------------------------


def test_versions_sort_as_numbers() -> None:
    assert sorted(["10", "2", "2.1", "1.9"], key=version_key) == ["1.9", "2", "2.1", "10"]


@pytest.mark.parametrize("data, shipped, problem", [
    ({"state_version": 1}, None, "'version' must be"),
    ({"version": "v3", "state_version": 3}, None, "'version' must be"),
    ({"version": "3", "state_version": 0}, None, "'state_version' must be"),
    ({"version": "3", "state_version": 3, "min_from": 2}, None, "'min_from' must be"),
    ({"version": "3", "state_version": 3, "migrations": [{"name": "a", "state_version": 3, "kind": "shrink"}]},
     None, "'kind' must be 'expand' or 'contract'"),
    ({"version": "3", "state_version": 3, "migrations": [{"name": "a", "state_version": 2, "kind": "expand"}]},
     None, "consecutive state versions ending at state_version 3"),
    ({"version": "3", "state_version": 4, "migrations": [{"name": "a", "state_version": 3, "kind": "expand"},
                                                          {"name": "b", "state_version": 5, "kind": "expand"}]},
     None, "consecutive"),
    ({"version": "3", "state_version": 3, "migrations": [{"name": "a", "state_version": 3, "kind": "expand"}]},
     {"b"}, "migration a is listed but /usr/share/imageupdate/migrations/a is not shipped"),
    ({"version": "3", "state_version": 3}, {"b"}, "migrations/b is shipped but not listed"),
    ({"version": "3", "state_version": 3, "config": {"rel/path": {}}}, None, "an absolute path"),
    ({"version": "3", "state_version": 3, "config": {"/etc/x": {"format": "yaml"}}}, None, "is not supported"),
    ({"version": "3", "state_version": 3, "config": {"/etc/x": {"options": ["nosection"]}}}, None, "'section.key'"),
    ({"version": "3", "state_version": 3, "config": {"/etc/x": {"removed": {"a.b": {}}}}}, None, "needs 'since'"),
])
def test_invalid_metadata_is_named(data: dict[str, Any], shipped: set[str] | None, problem: str) -> None:
    m, problems = parse(data, shipped)
    assert m is None and any(problem in p for p in problems), problems


def test_valid_metadata_parses() -> None:
    m = sample()["R4"].meta
    assert m is not None and m.min_from == "3" and m.first_state_version == 3
    assert m.migrations == (Migration("0004-kv-to-entries", 4, "contract"),)
    assert m.config[CONF].removed["storage.fsync"].replacement == "storage.sync"


# the planner --------------------------------------------------------------------------------------------


def test_skip_level_path_runs_every_intermediate_release_in_order() -> None:
    p = plan(sample(), "R1", 1, "R4")
    assert [(m.release, m.name, m.kind) for m in p.steps] == [
        ("R2", "0002-json-to-sqlite", "contract"), ("R3", "0003-add-created", "expand"),
        ("R4", "0004-kv-to-entries", "contract")]
    assert (p.from_state, p.to_state, p.has_contract) == (1, 4, True)
    assert [(h.release, h.required) for h in p.hops] == [
        ("R2", None), ("R3", "R4 upgrades only from version 3 or later"), ("R4", None)]


def test_a_resumed_path_starts_at_the_recorded_state_version() -> None:
    assert [m.name for m in plan(sample(), "R1", 3, "R4").steps] == ["0004-kv-to-entries"]
    assert plan(sample(), "R3", None, "R3").steps == []


def test_a_missing_intermediate_release_blocks_the_path_and_names_the_state_version() -> None:
    releases = sample()
    del releases["R3"]
    with pytest.raises(PathBlocked, match="migrates the state from version 2 to 3.*imageupdate build"):
        plan(releases, "R1", 1, "R4")


def test_min_from_forces_a_release_without_migrations_onto_the_path() -> None:
    releases = {
        "A": ReleaseInfo("A", meta("1", 1)),
        "B": ReleaseInfo("B", meta("2", 1)),  # no migration, but the barrier C needs
        "C": ReleaseInfo("C", meta("3", 2, [("0002", 2, "expand")], min_from="2")),
    }
    p = plan(releases, "A", 1, "C")
    assert [(h.release, h.required) for h in p.hops] == [("B", "C upgrades only from version 2 or later"),
                                                          ("C", None)]
    del releases["B"]
    with pytest.raises(PathBlocked, match="C \\(version 3\\) upgrades only from version 2 or later and no release "
                                          "of version 2"):
        plan(releases, "A", 1, "C")


def test_a_downgrade_is_refused_pointing_to_rollback() -> None:
    with pytest.raises(DowngradeRefused, match="is a downgrade: use 'imageupdate rollback'"):
        plan(sample(), "R4", 4, "R1")
    with pytest.raises(DowngradeRefused):  # same version but the state is newer than the target's
        plan(sample(), "R3", 4, "R3")


def test_among_variants_of_a_version_the_one_that_passed_here_wins_then_the_first_built() -> None:
    variant = ReleaseInfo("R2-rebuilt", meta("2", 2, [("0002-json-to-sqlite", 2, "contract")]), "2026-02-01")
    releases = sample(**{"R2-rebuilt": variant})
    assert plan(releases, "R1", 1, "R3").steps[0].release == "R2"
    assert plan(releases, "R1", 1, "R3", preferred={"R2-rebuilt"}).steps[0].release == "R2-rebuilt"


def test_a_hop_is_of_the_targets_kind_when_the_store_holds_both() -> None:
    # seen in the suite: one store held R2 (the tree) and M2 (the same workload built as a machine image,
    # built first); R1 -> R3 went through M2, because the first built won
    m2 = ReleaseInfo("M2", meta("2", 2, [("0002-json-to-sqlite", 2, "contract")]), "2025-12-31", machine=True)
    releases = sample(M2=m2)
    assert plan(releases, "R1", 1, "R3").steps[0].release == "R2"
    m3 = ReleaseInfo("M3", meta("3", 3, [("0003-add-index", 3, "expand")]), "2026-03-01", machine=True)
    machines = sample(M2=m2, M3=m3)
    assert plan(machines, "R1", 1, "M3").steps[0].release == "M2"
    assert plan(releases, "R1", 1, "R3", preferred={"M2"}).steps[0].release == "M2"  # what passed here first


def test_releases_without_metadata_are_a_plain_swap_but_cannot_start_a_versioned_path() -> None:
    releases = sample(old=ReleaseInfo("old", None), new=ReleaseInfo("new", None))
    assert plan(releases, "old", None, "new").steps == []
    with pytest.raises(PathBlocked, match="old has no upgrade metadata"):
        plan(releases, "old", None, "R2")


# state compatibility ------------------------------------------------------------------------------------


def step(name: str, sv: int, kind: str, ok: bool | None = True) -> state.StepRecord:
    return state.StepRecord("R", name, sv, kind, 1.0, None if ok is None else 2.0, ok)


def test_old_code_runs_on_state_changed_by_expand_steps_only() -> None:
    r2 = sample()["R2"].meta
    rec = state.StateRecord(3, [step("0002", 2, "contract"), step("0003", 3, "expand")])
    assert state.incompatible(rec, "R2", r2) is None
    r1 = sample()["R1"].meta
    why = state.incompatible(rec, "R1", r1)
    assert why is not None and "contract migration 0002" in why and "restores the snapshot" in why


def test_new_code_refuses_unmigrated_state_and_everything_refuses_a_half_done_step() -> None:
    r4 = sample()["R4"].meta
    assert "its migrations have not run" in (state.incompatible(state.StateRecord(3), "R4", r4) or "")
    rec = state.StateRecord(2, [step("0002", 2, "contract"), step("0003", 3, "expand", ok=None)])
    assert "was interrupted" in (state.incompatible(rec, "R3", sample()["R3"].meta) or "")
    assert state.incompatible(state.StateRecord(None), "R4", r4) is None  # unknown: a legacy state


def test_state_record_round_trips_atomically(tmp_path: Path) -> None:
    rec = state.StateRecord(2, [step("0002", 2, "contract")])
    state.write(tmp_path, rec)
    assert state.read(tmp_path) == rec
    assert not list(tmp_path.rglob("*.tmp"))
    state.seed(tmp_path, sample()["R1"].meta, "R1")  # an existing record is never reseeded
    assert state.read(tmp_path).version == 2


# snapshots ----------------------------------------------------------------------------------------------


def test_snapshot_is_read_back_and_restores_exactly(tmp_path: Path) -> None:
    live = tmp_path / "state"
    (live / "var/lib/app").mkdir(parents=True)
    (live / "var/lib/app/data.json").write_text('{"a": 1}')
    os.symlink("data.json", live / "var/lib/app/link")
    os.chmod(live / "var/lib/app/data.json", 0o640)
    before = digest(live)
    snap = snapshot.take(live, tmp_path / "snaps", 1, "R1", "node0")
    assert Path(snap.path).is_file() and snap.state_version == 1
    (live / "var/lib/app/data.json").write_text("migrated")
    (live / "var/lib/app/new").write_text("x")
    assert snapshot.find(tmp_path / "snaps", 0) is None
    found = snapshot.find(tmp_path / "snaps", 3)
    assert found is not None and found.path == snap.path
    snapshot.restore(found, live, "node0")
    assert digest(live) == before
    assert not (tmp_path / "state.restoring").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
@pytest.mark.parametrize("before_it", ["nothing", "a restore killed half way"])
def test_a_mounted_state_is_restored_in_place(tmp_path: Path, before_it: str) -> None:
    """Seen on a VM site: a rollback restored node0's snapshot into its state disk, mounted by the host, and the
    exchange of the mount point failed with EBUSY; the rollback ended failed, the node between releases."""
    live = tmp_path / "state"
    live.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "iu-test-state", str(live)], check=True)
    try:
        (live / "imageupdate").mkdir()
        (live / "imageupdate/state.json").write_text('{"version": 1}')
        (live / "data").write_text("v1 data")
        before = digest(live)
        snap = snapshot.take(live, tmp_path / "snaps", 1, "R1", "node0")
        (live / "imageupdate/state.json").write_text('{"version": 2, "contract": "0002"}')
        (live / "data").write_text("v2 data")
        (live / "new").write_text("written on v2")
        if before_it != "nothing":  # killed after moving some of the old state aside
            (live / snapshot.RESTORING / "data").parent.mkdir()
            (live / snapshot.RESTORING / "data").write_text("partial")
            (live / snapshot.REPLACED).mkdir()
            os.rename(live / "new", live / snapshot.REPLACED / "new")
        snapshot.restore(snap, live, "node0")
        assert digest(live) == before
        assert sorted(os.listdir(live)) == ["data", "imageupdate"]
    finally:
        subprocess.run(["umount", str(live)], check=True)


def test_a_snapshot_that_cannot_be_written_fails_and_leaves_no_partial_file(tmp_path: Path) -> None:
    live = tmp_path / "state"
    live.mkdir()
    (live / "f").write_text("x")
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (snaps / ".v1.tar.zst.tmp").mkdir()  # tar cannot write its output there
    with pytest.raises(Exception, match="snapshot of node0's state failed"):
        snapshot.take(live, snaps, 1, "R1", "node0")
    assert not (snaps / "v1.tar.zst").exists() and snapshot.find(snaps, 1) is None


# config -------------------------------------------------------------------------------------------------


def cfg(text: str) -> config.ConfigFile:
    return config.ConfigFile("node0:" + CONF, CONF, text)


def path_to(target: str) -> list[ReleaseInfo]:
    releases = sample()
    order = ["R2", "R3", "R4"]
    return [releases[r] for r in order[:order.index(target) + 1]]


def test_a_removed_option_fails_with_the_release_and_its_replacement() -> None:
    found = config.check([cfg("[storage]\nfsync = false\n")], path_to("R4"), "R4")
    assert [(f.level, f.release) for f in found] == [("warning", "R2"), ("error", "R4")]
    assert found[1].message == "[storage] fsync was removed in R4 (version 4): use [storage] sync instead"
    with pytest.raises(config.ConfigIncompatible, match="removed in R4"):
        config.raise_errors(found)


def test_a_deprecated_option_only_warns_and_an_unknown_one_warns_too() -> None:
    found = config.check([cfg("[storage]\nfsync = false\n")], path_to("R3"), "R3")
    assert [(f.level, f.message) for f in found] == [
        ("warning", "[storage] fsync is deprecated since version 2 (R2); use [storage] sync")]
    config.raise_errors(found)
    found = config.check([cfg("[storage]\nsync = true\ncolour = blue\n")], path_to("R4"), "R4")
    assert [(f.level, f.option) for f in found] == [("warning", "storage.colour")]


def test_a_config_file_that_does_not_parse_is_bad_input() -> None:
    with pytest.raises(config.ConfigUnparseable, match="is not a valid INI config file"):
        config.check([cfg("[storage\nsync = true\n")], path_to("R4"), "R4")


def test_given_files_are_matched_by_name(tmp_path: Path) -> None:
    f = tmp_path / "sample-workload.conf"
    f.write_text("[storage]\n")
    assert config.files_given([f], {CONF})[0].schema_path == CONF
    other = tmp_path / "other.conf"
    other.write_text("")
    with pytest.raises(config.InputError, match="no release on the path has a config file named other.conf"):
        config.files_given([other], {CONF})
    with pytest.raises(config.InputError, match="does not exist"):
        config.files_given([tmp_path / "missing.conf"], {CONF})


# rehearsal ----------------------------------------------------------------------------------------------

IDEMPOTENT = """import os, sys
p = os.path.join(sys.argv[1], "data")
if not os.path.exists(p + ".v2"):
    os.replace(p, p + ".v2") if os.path.exists(p) else open(p + ".v2", "w").close()
"""
NOT_IDEMPOTENT = """import os, sys
with open(os.path.join(sys.argv[1], "counter"), "a") as f:
    f.write("x")
"""


def local_runner(scripts: dict[str, str]) -> Any:
    """Runs a step's script with this Python on the copy (the real runner chroots into the release)."""
    def run(step: Migration, state_dir: Path) -> RunResult:
        proc = subprocess.run([sys.executable, "-c", scripts[step.name], str(state_dir)], capture_output=True,
                              text=True, check=False)
        return RunResult(proc.returncode, proc.stdout + proc.stderr, 0.01)
    return run


def one_step_plan(name: str, kind: str = "expand") -> Any:
    releases = {"A": ReleaseInfo("A", meta("1", 1)), "B": ReleaseInfo("B", meta("2", 2, [(name, 2, kind)]))}
    return plan(releases, "A", 1, "B")


def test_the_rehearsal_passes_an_idempotent_step_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "live"
    src.mkdir()
    (src / "data").write_text("v1")
    report = rehearse("node0", one_step_plan("m"), lambda dst: (dst / "data").write_text("v1"),
                      tmp_path / "work", local_runner({"m": IDEMPOTENT}))
    assert report.ok and report.steps[0].idempotent is True and report.state_bytes == 2
    assert not (tmp_path / "work").exists()
    assert (src / "data").read_text() == "v1"


def test_the_rehearsal_reports_a_step_that_changes_the_state_again(tmp_path: Path) -> None:
    report = rehearse("node0", one_step_plan("count"), lambda dst: None, tmp_path / "work",
                      local_runner({"count": NOT_IDEMPOTENT}))
    assert not report.ok and report.steps[0].idempotent is False and report.steps[0].changed == ["counter"]
    assert "migration count of B is not idempotent: running it twice on the copy of node0's state changed " \
           "counter again" in report.problems[0]
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False


def test_the_rehearsal_reports_a_failing_step(tmp_path: Path) -> None:
    report = rehearse("node0", one_step_plan("boom"), lambda dst: None, tmp_path / "work",
                      local_runner({"boom": "import sys; sys.exit('cannot convert')"}))
    assert not report.ok and "failed on the copy of node0's state: cannot convert" in report.problems[0]


def test_a_path_never_takes_a_migration_from_another_product() -> None:
    """A store holding two products: another product's "version 2" must not migrate this one's state."""
    import dataclasses

    def product(info: ReleaseInfo, name: str) -> ReleaseInfo:
        assert info.meta is not None
        return dataclasses.replace(info, meta=dataclasses.replace(info.meta, product=name))

    releases = {k: product(v, "sample") for k, v in sample().items()}
    releases["PG1"] = product(ReleaseInfo("PG1", meta("1", 1), "2025-01-01"), "pgweb")
    # built first and preferred: it would have been picked for state version 2 before
    releases["PG2"] = product(ReleaseInfo("PG2", meta("2", 2, [("0002-add-note", 2, "expand")]), "2025-01-02"),
                              "pgweb")
    releases["PG3"] = product(ReleaseInfo("PG3", meta("3", 3, [("0003-name-to-title", 3, "contract")]),
                                          "2025-01-03"), "pgweb")
    up = plan(releases, "R1", 1, "R3", preferred={"PG2"})
    assert [(m.release, m.name) for m in up.steps] == [("R2", "0002-json-to-sqlite"), ("R3", "0003-add-created")]
    up = plan(releases, "PG1", 1, "PG3", preferred={"R2"})
    assert [(m.release, m.name) for m in up.steps] == [("PG2", "0002-add-note"), ("PG3", "0003-name-to-title")]
    with pytest.raises(PathBlocked, match="R1 is product 'sample' and PG3 is product 'pgweb'"):
        plan(releases, "R1", 1, "PG3")
    del releases["PG2"]
    with pytest.raises(PathBlocked, match="no release in the store migrates the state from version 1 to 2"):
        plan(releases, "PG1", 1, "PG3")
    # a fleet built before its product had a name: its unnamed releases belong to the path, others' do not
    unnamed = {k: v for k, v in sample().items() if k in ("R1", "R2")}
    releases.update({"old-R1": unnamed["R1"], "old-R2": unnamed["R2"]})
    up = plan(releases, "old-R1", 1, "R3")
    assert [(m.release, m.name) for m in up.steps] == [("R2", "0002-json-to-sqlite"), ("R3", "0003-add-created")]
    with pytest.raises(PathBlocked, match="from version 1 to 2"):
        plan({k: v for k, v in releases.items() if k not in ("R2", "old-R2")}, "old-R1", 1, "PG3")


def test_a_product_name_is_checked() -> None:
    assert parse({"version": "1", "state_version": 1, "product": "pgweb"})[0].product == "pgweb"  # type: ignore[union-attr]
    for bad in ("", "Pg Web", "../x", 7, "x" * 65):
        meta_, problems = parse({"version": "1", "state_version": 1, "product": bad})
        assert meta_ is None and "'product' must be" in problems[0]


def test_a_fleet_that_migrates_in_its_images_refuses_a_path_through_another_releases_migrations() -> None:
    from imageupdate.base.errors import InputError
    from imageupdate.rollout.path import FleetPlan, require_in_image

    one = FleetPlan("R2", {"node0": plan(sample(), "R1", 1, "R2")}, [])
    require_in_image(one)  # R2's image ships 0002: the node runs it itself
    skip = FleetPlan("R4", {"node0": plan(sample(), "R3", 3, "R4"), "node1": plan(sample(), "R1", 1, "R4")}, [])
    with pytest.raises(InputError) as e:
        require_in_image(skip)
    assert str(e.value).startswith("node1: the path R1 -> R4 runs R2's migrations (0002-json-to-sqlite)")
    assert "roll out R2 first, then R4" in str(e.value)
    assert (e.value.node, e.value.release, e.value.step) == ("node1", "R4", "plan")


@pytest.mark.parametrize("text", ['[1]', '{"version": true}', '{"version": -1}', '{"version": 10000000000}',
                                  '{"version": 1, "steps": [{"x": 1}]}', '{"version": 1, "steps": "abc"}',
                                  '{"version": 1, "events": [1]}',
                                  '{"version": 1, "steps": [{"release": "R2", "migration": "m", "kind": "expand", '
                                  '"state_version": "2", "started": 1}]}',
                                  '{"version": 1, "steps": [{"release": "R2", "migration": "m", "kind": "expand", '
                                  '"state_version": 2, "started": "soon"}]}'])
def test_a_state_record_from_a_node_shaped_oddly_is_a_value_error(text: str) -> None:
    """A node's journal is hostile input: any shape but the journal's own is a ValueError, which every reader
    turns into a one-line reason (a TypeError escaped the gate's journal read as a traceback)."""
    with pytest.raises(ValueError):
        state.loads(text)


def test_a_state_record_round_trips_through_loads() -> None:
    rec = state.StateRecord(2, [state.StepRecord("R2", "0002-json-to-sqlite", 2, "contract", 1.5, 2.5, True, "ok")],
                            [{"at": 1.0, "event": "seeded"}])
    assert state.loads(json.dumps(rec.to_dict())) == rec
