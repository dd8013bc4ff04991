"""The history database on a temporary SQLite file: rollouts, steps, checks, releases, log; its schema version."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from imageupdate.base.errors import InputError
from imageupdate.history import schema
from imageupdate.history.db import History, RolloutRow
from imageupdate.history.schema import VERSION, HistoryFile, HistoryTooNew, HistoryUnreadable

OPTIONS = {"batch_size": 2, "canary": True, "limit": None, "gate_timeout": 60}
PLAN = {"batches": [["node0"], ["node1", "node2"]], "before": {"node0": "R1"}, "after": {"node0": "R2"}}
NOTHING = {"batches": [], "before": {"node0": "R2"}, "after": {"node0": "R2"}}
V1_FILE = Path(__file__).parent / "data" / "history-v1.sqlite"  # written before versioning (make_history_v1.py)


@pytest.fixture
def h(tmp_path: Path) -> History:
    return History(tmp_path / "site" / "history.sqlite")


# rollouts -----------------------------------------------------------------------------------------


def test_start_records_the_operation(h: History) -> None:
    t0 = time.time()
    row = h.start("rollout", "R2", OPTIONS, PLAN, pid=4242)
    assert h.path.is_file()  # parent directory created on first use
    assert (row.id, row.kind, row.target, row.parent, row.status, row.pid) == (
        1,
        "rollout",
        "R2",
        None,
        "running",
        4242,
    )
    assert row.options == OPTIONS and row.plan == PLAN
    assert t0 <= row.started <= time.time()
    assert (row.finished, row.reason, row.heat, row.sent, row.cancel_requested) == (None, None, None, None, None)
    assert (row.stage, row.options_version) == (None, 1)
    assert row.tag == "r1"
    assert row.to_dict()["tag"] == "r1" and row.to_dict()["plan"] == PLAN
    assert (row.to_dict()["stage"], row.to_dict()["options_version"]) == (None, 1)


def test_start_records_stage_and_options_version(h: History) -> None:
    row = h.start("rollout", "R2", OPTIONS, PLAN, options_version=3, stage="planned")
    assert (row.stage, row.options_version) == ("planned", 3)
    assert h.rollout(row.id) == row


def test_ids_count_up_and_rollouts_lists_newest_first(h: History) -> None:
    a = h.start("adopt", None, {}, NOTHING, status="succeeded")
    b = h.start("rollout", "R2", OPTIONS, PLAN)
    c = h.start("rollback", None, OPTIONS, PLAN, parent=b.id, status="paused")
    assert (a.id, b.id, c.id) == (1, 2, 3)
    assert (c.parent, c.status, c.tag) == (2, "paused", "r3")
    assert [r.id for r in h.rollouts()] == [3, 2, 1]
    assert [r.id for r in h.rollouts(limit=2)] == [3, 2]


def test_rollout_reads_back_and_unknown_is_none(h: History) -> None:
    row = h.start("rollout", "R2", OPTIONS, PLAN)
    assert h.rollout(row.id) == row
    assert h.rollout(99) is None


def test_the_history_outlives_its_object(h: History) -> None:
    row = h.start("rollout", "R2", OPTIONS, PLAN)
    h.say(row.id, "hello")
    again = History(h.path)
    assert again.rollout(row.id) == row
    assert [e["message"] for e in again.log(row.id)] == ["hello"]


def test_update_changes_only_the_fields_given(h: History) -> None:
    row = h.start("rollout", "R2", OPTIONS, PLAN, pid=11)
    new_plan = {"batches": [["node0"]], "before": {}, "after": {}}
    h.update(row.id, status="paused", pid=None, heat="123@456.7", sent=1000.5, plan=new_plan, cancel_requested=2000.0,
             stage="watching", options_version=2)
    got = h.rollout(row.id)
    assert got is not None
    assert (got.status, got.pid, got.heat, got.sent, got.cancel_requested, got.stage, got.options_version) == (
        "paused",
        None,
        "123@456.7",
        1000.5,
        2000.0,
        "watching",
        2,
    )
    assert got.plan == new_plan
    assert (got.kind, got.target, got.options, got.started) == (row.kind, row.target, row.options, row.started)


@pytest.mark.parametrize("field", ["options", "kind", "started", "id", "bogus"])
def test_update_refuses_unknown_fields(h: History, field: str) -> None:
    row = h.start("rollout", "R2", OPTIONS, PLAN)
    with pytest.raises(ValueError, match=field):
        h.update(row.id, status="failed", **{field: "x"})
    assert h.rollout(row.id) == row  # nothing written, not even the allowed field


def test_finish_sets_status_reason_and_time(h: History) -> None:
    row = h.start("rollout", "R2", OPTIONS, PLAN)
    h.finish(row.id, "failed", "gate of node0 failed")
    got = h.rollout(row.id)
    assert got is not None
    assert (got.status, got.reason) == ("failed", "gate of node0 failed")
    assert got.finished is not None and row.started <= got.finished <= time.time()


def test_active_is_the_running_or_paused_one(h: History) -> None:
    assert h.active() is None
    done = h.start("rollout", "R2", OPTIONS, PLAN)
    h.finish(done.id, "succeeded")
    for status in ("failed", "rolled-back", "cancelled"):
        r = h.start("rollout", "R3", OPTIONS, PLAN)
        h.finish(r.id, status)
    assert h.active() is None
    running = h.start("rollout", "R4", OPTIONS, PLAN)
    got = h.active()
    assert got is not None and got.id == running.id
    h.update(running.id, status="paused")
    got = h.active()
    assert got is not None and (got.id, got.status) == (running.id, "paused")
    h.finish(running.id, "cancelled")
    assert h.active() is None


def test_active_includes_a_paused_rollback(h: History) -> None:
    h.start("rollback", None, OPTIONS, PLAN, status="paused")
    got = h.active()
    assert got is not None and (got.kind, got.status) == ("rollback", "paused")


def test_undoable_is_the_newest_finished_rollout(h: History) -> None:
    assert h.undoable() is None
    first = h.start("rollout", "R2", OPTIONS, PLAN)
    h.finish(first.id, "succeeded")
    second = h.start("rollout", "R3", OPTIONS, PLAN)
    h.finish(second.id, "failed")
    got = h.undoable()
    assert got is not None and got.id == second.id
    h.update(second.id, status="rolled-back")
    got = h.undoable()
    assert got is not None and got.id == first.id


def test_undoable_skips_running_paused_rollbacks_and_adopts(h: History) -> None:
    cancelled = h.start("rollout", "R2", OPTIONS, PLAN)
    h.finish(cancelled.id, "cancelled")
    h.start("adopt", None, {}, NOTHING, status="succeeded")
    h.start("rollback", None, OPTIONS, PLAN, status="succeeded")
    h.start("rollout", "R3", OPTIONS, PLAN, status="paused")
    h.start("rollout", "R4", OPTIONS, PLAN, status="running")
    got = h.undoable()
    assert got is not None and got.id == cancelled.id


def test_undoable_skips_a_rollout_that_changed_nothing(h: History) -> None:
    changed = h.start("rollout", "R2", OPTIONS, PLAN)
    h.finish(changed.id, "succeeded")
    noop = h.start("rollout", "R2", OPTIONS, NOTHING)  # what the engine records for "nothing to do"
    h.finish(noop.id, "succeeded", "every selected node already runs R2")
    got = h.undoable()
    assert got is not None and got.id == changed.id


def test_sent_round_trips_template_and_environment(h: History) -> None:
    row = h.start("rollout", "R2", OPTIONS, PLAN)
    other = h.start("rollout", "R3", OPTIONS, PLAN)
    assert h.sent(row.id) is None
    template = {"heat_template_version": "2021-04-16", "resources": {"server_node0": {"type": "X"}}}
    env = {"environment": {"resource_registry": {"ImageUpdate::Server": "server.yaml"}}, "files": {"a": "b"}}
    h.update(row.id, template=template, environment=env, sent=5.0)
    assert h.sent(row.id) == (template, env)
    assert h.sent(other.id) is None
    assert h.sent(42) is None


# steps --------------------------------------------------------------------------------------------


def test_step_upsert_keeps_fields_not_given(h: History) -> None:
    rid = h.start("rollout", "R2", OPTIONS, PLAN).id
    h.step(rid, "node0", "rebuild", "pending", batch=0, from_release="R1", to_release="R2")
    h.step(rid, "node0", "rebuild", "running", started=100.0)
    h.step(rid, "node0", "rebuild", "succeeded", finished=107.5, data={"k": [1, 2]})
    [s] = h.steps(rid)
    assert (s.rollout, s.node, s.step, s.batch, s.from_release, s.to_release) == (
        rid,
        "node0",
        "rebuild",
        0,
        "R1",
        "R2",
    )
    assert (s.status, s.started, s.finished, s.reason, s.data) == ("succeeded", 100.0, 107.5, None, {"k": [1, 2]})
    assert s.seconds == 7.5
    assert s.to_dict()["seconds"] == 7.5
    h.step(rid, "node0", "rebuild", "failed", reason="disk full")
    [s] = h.steps(rid)
    assert (s.status, s.reason, s.batch, s.started, s.data) == ("failed", "disk full", 0, 100.0, {"k": [1, 2]})


def test_one_row_per_rollout_node_and_step(h: History) -> None:
    rid = h.start("rollout", "R2", OPTIONS, PLAN).id
    other = h.start("rollout", "R3", OPTIONS, PLAN).id
    h.step(rid, "node0", "rebuild", "running", started=1.0)
    h.step(rid, "node0", "gate", "running", started=2.0)
    h.step(rid, "node1", "rebuild", "running", started=3.0)
    h.step(rid, "node0", "rebuild", "succeeded", finished=1.5)
    h.step(other, "node0", "rebuild", "running", started=4.0)
    assert [(s.node, s.step, s.status) for s in h.steps(rid)] == [
        ("node0", "rebuild", "succeeded"),
        ("node0", "gate", "running"),
        ("node1", "rebuild", "running"),
    ]
    assert [(s.rollout, s.node) for s in h.steps(other)] == [(other, "node0")]


def test_steps_are_ordered_by_start_then_insertion(h: History) -> None:
    rid = h.start("rollout", "R2", OPTIONS, PLAN).id
    h.step(rid, "node2", "rebuild", "running", started=30.0)
    h.step(rid, "node0", "rebuild", "running", started=10.0)
    h.step(rid, "node1", "rebuild", "failed", finished=20.0)  # never seen starting: ordered by its end
    h.step(rid, "node3", "rebuild", "pending", batch=1)
    h.step(rid, "node4", "rebuild", "pending", batch=1)
    assert [s.node for s in h.steps(rid)] == ["node3", "node4", "node0", "node1", "node2"]
    pending = h.steps(rid)[0]
    assert (pending.started, pending.finished, pending.seconds, pending.data) == (None, None, None, None)


# checks -------------------------------------------------------------------------------------------


def test_checks_are_kept_per_rollout_and_node(h: History) -> None:
    rid = h.start("rollout", "R2", OPTIONS, PLAN).id
    other = h.start("rollout", "R3", OPTIONS, PLAN).id
    h.check(rid, "node0", "release", True, 0.25, "runs R2")
    h.check(rid, "node0", "test:http", False, 1.5, "x" * 5000 + "END")
    h.check(rid, "node1", "release", True, 0.5, "runs R2")
    h.check(other, "node0", "release", True, 0.1, "runs R3")
    all_checks = h.checks(rid)
    assert [(c["node"], c["name"], c["ok"]) for c in all_checks] == [
        ("node0", "release", 1),
        ("node0", "test:http", 0),
        ("node1", "release", 1),
    ]
    assert all_checks[0]["seconds"] == 0.25 and all_checks[0]["output"] == "runs R2"
    long = all_checks[1]["output"]
    assert len(long) == 4000 and long.endswith("END")  # the tail is kept
    assert [c["name"] for c in h.checks(rid, "node0")] == ["release", "test:http"]
    assert [c["name"] for c in h.checks(rid, "node1")] == ["release"]
    assert h.checks(rid, "node9") == []
    assert [c["output"] for c in h.checks(other)] == ["runs R3"]


# releases -----------------------------------------------------------------------------------------


def test_last_good_is_the_newest_release_that_passed(h: History) -> None:
    r1 = h.start("adopt", None, {}, NOTHING).id
    r2 = h.start("rollout", "R2", OPTIONS, PLAN).id
    r3 = h.start("rollout", "R3", OPTIONS, PLAN).id
    assert h.last_good("node0") is None
    h.reached("node0", "R1", r1, good=True)
    h.reached("node1", "R1", r1, good=True)
    h.reached("node0", "R2", r2, good=True)
    h.reached("node0", "R3", r3, good=False)
    assert h.last_good("node0") == "R2"
    assert h.last_good("node1") == "R1"
    assert h.last_good("node2") is None


def test_last_good_before_a_rollout_ignores_it_and_later_ones(h: History) -> None:
    r1 = h.start("adopt", None, {}, NOTHING).id
    r2 = h.start("rollout", "R2", OPTIONS, PLAN).id
    r3 = h.start("rollout", "R3", OPTIONS, PLAN).id
    h.reached("node0", "R1", r1, good=True)
    h.reached("node0", "R2", r2, good=True)
    h.reached("node0", "R3", r3, good=True)
    assert h.last_good("node0") == "R3"
    assert h.last_good("node0", before=r3) == "R2"
    assert h.last_good("node0", before=r2) == "R1"
    assert h.last_good("node0", before=r1) is None
    assert h.last_good("node0", before=99) == "R3"


# log ----------------------------------------------------------------------------------------------


def test_say_and_log(h: History) -> None:
    rid = h.start("rollout", "R2", OPTIONS, PLAN).id
    other = h.start("rollout", "R3", OPTIONS, PLAN).id
    t0 = time.time()
    h.say(rid, "batch 1: node0")
    h.say(other, "elsewhere")
    h.say(None, "site-wide")
    h.say(rid, "rebuilding node0 to R2", node="node0")
    entries = h.log(rid)
    assert [(e["rollout"], e["node"], e["message"]) for e in entries] == [
        (rid, None, "batch 1: node0"),
        (rid, "node0", "rebuilding node0 to R2"),
    ]
    assert all(t0 <= e["at"] <= time.time() for e in entries)
    assert [e["message"] for e in h.log(other)] == ["elsewhere"]
    with closing(sqlite3.connect(h.path)) as db:
        assert db.execute("SELECT message FROM log WHERE rollout IS NULL").fetchall() == [("site-wide",)]


# schema version -----------------------------------------------------------------------------------


def _user_version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def _columns(path: Path, table: str) -> list[str]:
    with closing(sqlite3.connect(path)) as db:
        return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]


def _schema(path: Path) -> dict[str, str]:
    with closing(sqlite3.connect(path)) as db:
        return {r[0]: r[1] for r in db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")}


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy of a history file written by the release before schema versioning."""
    path = tmp_path / "site" / "history.sqlite"
    path.parent.mkdir()
    shutil.copyfile(V1_FILE, path)
    return path


def test_the_v1_fixture_is_what_the_first_migration_creates(v1: Path, tmp_path: Path) -> None:
    assert _user_version(v1) == 0
    fresh = tmp_path / "v1-only.sqlite"
    with closing(sqlite3.connect(fresh)) as db:
        db.executescript(schema.MIGRATIONS[0])
    assert _schema(fresh) == _schema(v1)  # the shipped v1 step was not edited


def test_a_pre_versioning_file_is_migrated_and_its_rows_read_back(v1: Path) -> None:
    h = History(v1)
    adopt, rollout = h.rollout(1), h.rollout(2)
    assert rollout == RolloutRow(
        2, "rollout", "R2", None,
        {"batch_size": 1, "canary": True, "limit": None, "pause": False, "gate_timeout": 60, "rollback": True},
        {"batches": [["node0"], ["node1"]], "before": {"node0": "R1", "node1": "R1"},
         "after": {"node0": "R2", "node1": "R2"}},
        "failed", "gate of node0 failed", 2000.0, 2100.5, None, "123@456.7", None, 2010.0,
    )
    assert (rollout.stage, rollout.options_version) == (None, 1)
    assert adopt is not None and (adopt.kind, adopt.status, adopt.stage, adopt.options_version) == (
        "adopt", "succeeded", None, 1)
    assert [r.id for r in h.rollouts()] == [2, 1]
    assert h.undoable() == rollout and h.active() is None
    assert h.sent(2) == ({"resources": {}}, {"environment": {}, "files": {}})
    assert [(s.step, s.status, s.seconds, s.reason, s.data) for s in h.steps(2)] == [
        ("rebuild", "succeeded", 40.0, None, None),
        ("gate", "failed", 50.0, "test:http failed", {"checks": 2}),
    ]
    assert [(c["name"], c["ok"], c["output"]) for c in h.checks(2)] == [("test:http", 0, "connection refused")]
    assert h.last_good("node0") == "R1" and h.good_releases() == {"R1"}
    assert [(e["node"], e["message"]) for e in h.log(2)] == [("node0", "rebuilt node0 to R2")]
    assert _user_version(v1) == VERSION == 2
    assert _columns(v1, "rollouts")[-2:] == ["stage", "options_version"]


def test_a_migrated_file_takes_new_writes(v1: Path) -> None:
    h = History(v1)
    h.update(2, stage="ended", options_version=2)
    got = h.rollout(2)
    assert got is not None and (got.status, got.stage, got.options_version) == ("failed", "ended", 2)
    new = h.start("rollout", "R3", OPTIONS, PLAN, options_version=2, stage="planned")
    assert (new.id, new.stage, new.options_version) == (3, "planned", 2)
    again = History(v1)  # a later process finds it current
    assert again.rollout(3) == new and _user_version(v1) == VERSION


def test_a_fresh_file_gets_the_latest_version(h: History) -> None:
    assert h.active() is None
    assert _user_version(h.path) == VERSION
    assert _columns(h.path, "rollouts")[-2:] == ["stage", "options_version"]
    assert set(_schema(h.path)) >= {"rollouts", "steps", "checks", "releases", "hooks", "probes", "migrations", "log"}


def test_the_schema_is_checked_once_per_instance(h: History, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = HistoryFile.migrate

    def counting(self: HistoryFile, conn: sqlite3.Connection) -> None:
        calls.append(1)
        real(self, conn)

    monkeypatch.setattr(HistoryFile, "migrate", counting)
    rid = h.start("rollout", "R2", OPTIONS, PLAN).id
    h.say(rid, "hello")
    h.update(rid, stage="watching")
    assert h.rollouts() and len(calls) == 1
    History(h.path).rollouts()
    assert len(calls) == 2  # each instance checks once


def test_a_failed_migration_leaves_the_file_at_the_version_before(
    v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    History(v1).rollouts()
    broken = "ALTER TABLE rollouts ADD COLUMN extra TEXT;\nSELECT * FROM no_such_table;\n"
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, broken))
    monkeypatch.setattr(schema, "VERSION", VERSION + 1)
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        History(v1).rollouts()
    assert _user_version(v1) == VERSION
    assert "extra" not in _columns(v1, "rollouts")  # the step and its bump are one transaction


def test_a_file_from_a_newer_imageupdate_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(HistoryTooNew) as e:
        History(path).rollouts()
    message = str(e.value)
    assert str(path) in message and "99" in message and str(VERSION) in message and "upgrade imageupdate" in message
    assert "\n" not in message
    assert isinstance(e.value, InputError) and e.value.exit_code == 2
    assert _user_version(path) == 99 and _schema(path) == {}  # nothing written


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    path.write_bytes(b"this is not a SQLite database\x00\xff" * 200)
    with pytest.raises(HistoryUnreadable) as e:
        History(path).rollouts()
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, InputError) and not isinstance(e.value, sqlite3.Error)


def test_two_instances_migrating_an_old_file_at_once_both_succeed(v1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = 4
    barrier = threading.Barrier(count)
    seen = threading.local()
    real = HistoryFile.version

    def version(self: HistoryFile, conn: sqlite3.Connection) -> int:
        got = real(self, conn)
        if not getattr(seen, "once", False):  # every thread has read the old version before any migrates
            seen.once = True
            barrier.wait(timeout=10)
        return got

    monkeypatch.setattr(HistoryFile, "version", version)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append([r.id for r in History(v1).rollouts()])
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and results == [[2, 1]] * count
    assert _user_version(v1) == VERSION
    assert _columns(v1, "rollouts").count("stage") == 1


def test_a_status_or_stage_the_history_does_not_list_is_refused(h: History) -> None:
    """The lists in history.db's docstring are the values written: a new one must be added there first."""
    rid = h.start("rollout", "R2", OPTIONS, PLAN, stage="planned").id
    for bad in ({"status": "rolling-back"}, {"stage": "rolling-back"}):
        with pytest.raises(ValueError, match="cannot be 'rolling-back'"):
            h.update(rid, **bad)
    with pytest.raises(ValueError, match="steps.status"):
        h.step(rid, "node0", "gate", "passed")
    row = h.rollout(rid)
    assert row is not None and (row.status, row.stage) == ("running", "planned") and h.steps(rid) == []
