"""The rehearsal's idempotency test judged by what the release says its state is: ``volatile`` paths left
out of the file digest, a release's state digest compared instead (here SQLite stands in for the
database, and plain Python for the sandbox), and a state digest that cannot be taken failing it."""
from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from imageupdate.base.errors import OperationError
from imageupdate.images import packer
from imageupdate.images.upgrade_meta import MAX_VOLATILE, Migration, parse
from imageupdate.upgrade.plan import ReleaseInfo, plan
from imageupdate.upgrade.rehearse import STATE_DIGEST_TIMEOUT, changed_lines, digest, discard_leftovers, rehearse
from imageupdate.upgrade.sandbox import RunResult
from tests.fakeroot_tar import make_root_tar

DIGEST = "/usr/share/imageupdate/state-digest"


def one_step_plan(name: str) -> Any:
    def meta(version: str, sv: int, migrations: list[dict[str, Any]]) -> Any:
        m, problems = parse({"version": version, "state_version": sv, "migrations": migrations})
        assert m is not None, problems
        return m
    releases = {"A": ReleaseInfo("A", meta("1", 1, [])),
                "B": ReleaseInfo("B", meta("2", 2, [{"name": name, "state_version": 2, "kind": "expand"}]))}
    return plan(releases, "A", 1, "B")


def python(script: str, state_dir: Path) -> RunResult:
    """Runs ``script`` on the copy with this Python, stdout apart (as ``sandbox.run(split=True)``)."""
    proc = subprocess.run([sys.executable, "-c", script, str(state_dir)], capture_output=True, text=True,
                          check=False)
    return RunResult(proc.returncode, proc.stdout, 0.01, proc.stderr)


def runner(script: str) -> Any:
    def run(step: Migration, state_dir: Path) -> RunResult:
        r = python(script, state_dir)
        return RunResult(r.returncode, r.output + r.errors, r.seconds)
    return run


# A database that rewrites its statistics whenever it runs, and two migrations on it.
DB = """import os, sqlite3, sys, time
db = os.path.join(sys.argv[1], "var/lib/app/db.sqlite")
os.makedirs(os.path.dirname(db), exist_ok=True)
os.makedirs(os.path.join(sys.argv[1], "var/lib/app/stats"), exist_ok=True)
with open(os.path.join(sys.argv[1], "var/lib/app/stats/last-start"), "w") as f:
    f.write(str(time.time_ns()))
c = sqlite3.connect(db)
c.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT)")
"""
ADD_COLUMN = DB + """cols = [r[1] for r in c.execute("PRAGMA table_info(items)")]
if "created" not in cols:
    c.execute("ALTER TABLE items ADD COLUMN created TEXT")
c.commit()
"""
INSERT_EVERY_RUN = DB + """c.execute("INSERT INTO items (name) VALUES ('again')")
c.commit()
"""
# The release's state digest: the schema and a checksum of every table's rows, whatever the file bytes.
STATE_DIGEST = """import hashlib, os, sqlite3, sys
c = sqlite3.connect(os.path.join(sys.argv[1], "var/lib/app/db.sqlite"))
for name, sql in c.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall():
    rows = c.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()
    print(f"{name} schema {sql}")
    print(f"{name} rows {len(rows)} {hashlib.sha256(repr(rows).encode()).hexdigest()[:16]}")
print("startup log, not the digest", file=sys.stderr)
"""


def state_digest(script: str = STATE_DIGEST, calls: list[str] | None = None) -> Any:
    def take(release: str, state_dir: Path) -> RunResult | None:
        if calls is not None:
            calls.append(release)
        return python(script, state_dir)
    return take


def test_volatile_paths_parse_and_are_checked_against_the_state_paths() -> None:
    data = {"version": "2", "state_version": 2, "volatile": ["/var/lib/app/stats", "/var/lib/app/wal"]}
    m, problems = parse(data, state_paths=["/var/lib/app"])
    assert m is not None and m.volatile == ("/var/lib/app/stats", "/var/lib/app/wal"), problems
    assert parse({"version": "2", "state_version": 2})[0].volatile == ()  # type: ignore[union-attr]
    m, problems = parse(data, state_paths=["/srv/data"])
    assert m is None and "volatile /var/lib/app/stats is not under a state path of this release (/srv/data)" \
        in problems


@pytest.mark.parametrize("volatile, problem", [
    (["/var/lib/app/stats"], None),
    (["/var/lib/other"], "volatile /var/lib/other is not under a state path of this release (/var/log, /var/lib/app)"),
])
def test_the_build_checks_volatile_paths_against_the_images_state_paths(
        tmp_path: Path, volatile: list[str], problem: str | None) -> None:
    upgrade = {"version": "1", "state_version": 1, "volatile": volatile}
    (tmp_path / "out").mkdir()
    facts = packer.pack(make_root_tar(tmp_path / "dib.tar", extra={
        "./usr/share/imageupdate/upgrade.json": json.dumps(upgrade).encode()}), tmp_path / "out", 1_700_000_000)
    assert facts.upgrade_problems == ([problem] if problem else [])
    assert facts.upgrade == (None if problem else upgrade)


@pytest.mark.parametrize("volatile, problem", [
    ("/var/lib/app", "'volatile' must be a list"),
    ([f"/var/lib/app/{i}" for i in range(MAX_VOLATILE + 1)], f"at most {MAX_VOLATILE}"),
    (["var/lib/app"], "an absolute path"),
    (["/var/lib/app/../../etc"], "no '..'"),
    (["/var/lib/app/"], "trailing '/'"),
    (["//var/lib/app"], "'//'"),
    (["/"], "not / itself"),
    (["/var/" + "x" * 2000], "at most 1024 characters"),
    ([3], "an absolute path"),
])
def test_invalid_volatile_paths_are_named(volatile: Any, problem: str) -> None:
    m, problems = parse({"version": "2", "state_version": 2, "volatile": volatile})
    assert m is None and any(problem in p for p in problems), problems


def test_the_file_digest_leaves_out_volatile_paths_and_what_is_beneath_them(tmp_path: Path) -> None:
    (tmp_path / "var/lib/app/stats/deep").mkdir(parents=True)
    (tmp_path / "var/lib/app/stats/deep/x").write_text("x")
    (tmp_path / "var/lib/app/statsfile").write_text("kept: a sibling whose name only starts the same")
    (tmp_path / "var/lib/app/data").write_text("kept")
    assert sorted(digest(tmp_path, ["/var/lib/app/stats"])) == [
        "var", "var/lib", "var/lib/app", "var/lib/app/data", "var/lib/app/statsfile"]
    assert "var/lib/app/stats/deep/x" in digest(tmp_path)


def test_a_second_run_that_only_touches_a_volatile_path_passes(tmp_path: Path) -> None:
    report = rehearse("node0", one_step_plan("add-column"), lambda dst: None, tmp_path / "work",
                      runner(ADD_COLUMN), volatile={"B": ["/var/lib/app/stats"]})
    assert report.ok, report.problems
    assert report.steps[0].idempotent is True and report.steps[0].digest == "files"


def test_without_volatile_the_rewritten_statistics_fail_the_file_digest(tmp_path: Path) -> None:
    report = rehearse("node0", one_step_plan("add-column"), lambda dst: None, tmp_path / "work",
                      runner(ADD_COLUMN), volatile={"A": ["/var/lib/app/stats"]})  # another release's
    assert not report.ok and report.steps[0].changed == ["var/lib/app/stats/last-start"]


def test_a_migration_that_inserts_on_every_run_fails_the_file_digest(tmp_path: Path) -> None:
    report = rehearse("node0", one_step_plan("insert"), lambda dst: None, tmp_path / "work",
                      runner(INSERT_EVERY_RUN), volatile={"B": ["/var/lib/app/stats"]})
    assert not report.ok and report.steps[0].changed == ["var/lib/app/db.sqlite"]
    assert "changed var/lib/app/db.sqlite again" in report.problems[0]


def test_a_state_digest_that_stays_the_same_passes_although_files_changed(tmp_path: Path) -> None:
    calls: list[str] = []
    report = rehearse("node0", one_step_plan("add-column"), lambda dst: None, tmp_path / "work",
                      runner(ADD_COLUMN), digest_step=state_digest(calls=calls))
    assert report.ok, report.problems
    step = report.steps[0]
    assert step.digest == "state-digest" and step.idempotent is True and step.changed == []
    assert calls == ["B", "B"]  # the step's release's digest, after the first and after the second run
    assert json.loads(json.dumps(report.to_dict()))["steps"][0]["digest"] == "state-digest"


def test_a_state_digest_that_changes_fails_naming_the_difference(tmp_path: Path) -> None:
    report = rehearse("node0", one_step_plan("insert"), lambda dst: None, tmp_path / "work",
                      runner(INSERT_EVERY_RUN), digest_step=state_digest())
    step = report.steps[0]
    assert not report.ok and step.ok and step.idempotent is False and step.digest == "state-digest"
    assert [line.split()[:3] for line in step.changed] == [["-items", "rows", "1"], ["+items", "rows", "2"]]
    assert report.problems[0].startswith(
        "migration insert of B is not idempotent: running it twice on the copy of node0's state changed its "
        f"state digest ({DIGEST}): -items rows 1 ")


def test_a_release_without_a_state_digest_gets_the_file_digest(tmp_path: Path) -> None:
    report = rehearse("node0", one_step_plan("insert"), lambda dst: None, tmp_path / "work",
                      runner(INSERT_EVERY_RUN), digest_step=lambda release, state_dir: None,
                      volatile={"B": ["/var/lib/app/stats"]})
    assert not report.ok and report.steps[0].digest == "files"
    assert report.steps[0].changed == ["var/lib/app/db.sqlite"]


@pytest.mark.parametrize("result, said", [
    (RunResult(1, "", 0.1, "psql: connection refused\n"), "exit 1: psql: connection refused"),
    (RunResult(-9, "partial\n", 120.0, f"\nkilled after {STATE_DIGEST_TIMEOUT:.0f} s"), "killed after 120 s"),
    (RunResult(0, "  \n", 0.1, "started\n"), "it printed nothing on stdout (started)"),
])
def test_a_state_digest_that_fails_or_times_out_fails_the_rehearsal_naming_it(
        tmp_path: Path, result: RunResult, said: str) -> None:
    report = rehearse("node0", one_step_plan("add-column"), lambda dst: None, tmp_path / "work",
                      runner(ADD_COLUMN), digest_step=lambda release, state_dir: result)
    step = report.steps[0]
    assert not report.ok and not step.ok and step.idempotent is None and step.digest_error == said
    assert report.problems == [f"state digest {DIGEST} of B failed on the copy of node0's state: {said}"]
    assert said in step.output


def test_a_state_digest_that_fails_only_after_the_second_run_fails_too(tmp_path: Path) -> None:
    results = iter([RunResult(0, "v1\n", 0.1), RunResult(3, "", 0.1, "boom\n")])
    report = rehearse("node0", one_step_plan("add-column"), lambda dst: None, tmp_path / "work",
                      runner(ADD_COLUMN), digest_step=lambda release, state_dir: next(results))
    assert report.problems == [f"state digest {DIGEST} of B failed on the copy of node0's state: exit 3: boom"]


def test_a_second_run_that_fails_is_reported_whatever_the_digest(tmp_path: Path) -> None:
    script = ("import os, sys; p = os.path.join(sys.argv[1], 'ran')\n"
              "if os.path.exists(p): sys.exit('already ran')\nopen(p, 'w').close()")
    report = rehearse("node0", one_step_plan("once"), lambda dst: None, tmp_path / "work", runner(script),
                      digest_step=state_digest("print('same')"))
    assert not report.ok and report.steps[0].idempotent is False
    assert "changed (the second run failed) again" in report.problems[0]
    assert "second run failed: already ran" in report.steps[0].output


def test_changed_lines_are_bounded() -> None:
    before = "\n".join(f"t{i} 1" for i in range(30))
    after = "\n".join(f"t{i} 2" for i in range(30))
    lines = changed_lines(before, after)
    assert len(lines) == 11 and lines[-1] == "(and 50 more lines)" and lines[0] == "-t0 1"
    assert changed_lines("a\n", "a\n") == []
    assert changed_lines("x" * 500, "y")[0] == "-" + "x" * 199 + "..."


# The work directory: private while it holds the copy, gone when the rehearsal ends, and what a killed
# rehearsal left behind discarded.


def test_the_work_directory_is_private_and_removed_after_a_pass_or_a_failure(tmp_path: Path) -> None:
    seen: list[int] = []

    def copy(dst: Path) -> None:
        seen.append(stat.S_IMODE(dst.parent.stat().st_mode))
        (dst / "etc/ssh").mkdir(parents=True)
        (dst / "etc/ssh/ssh_host_ed25519_key").write_text("secret")

    old = os.umask(0o022)
    try:
        passed = rehearse("node0", one_step_plan("add-column"), copy, tmp_path / "work", runner(ADD_COLUMN),
                          volatile={"B": ["/var/lib/app/stats"]})
        failed = rehearse("node0", one_step_plan("broken"), copy, tmp_path / "work", runner("raise SystemExit(3)"))
    finally:
        os.umask(old)
    assert passed.ok and not failed.ok and seen == [0o700, 0o700]
    assert not (tmp_path / "work").exists()


def test_the_work_directory_is_removed_when_the_copy_fails(tmp_path: Path) -> None:
    def copy(dst: Path) -> None:
        (dst / "partial").write_text("half a copy")
        raise OperationError("copying failed", step="rehearse")

    with pytest.raises(OperationError, match="copying failed"):
        rehearse("node0", one_step_plan("add-column"), copy, tmp_path / "work", runner(ADD_COLUMN))
    assert not (tmp_path / "work").exists()


def test_a_second_rehearsal_in_the_same_place_is_refused_while_one_runs(tmp_path: Path) -> None:
    def copy(dst: Path) -> None:
        with pytest.raises(OperationError, match="a rehearsal on node0 is already running"):
            rehearse("node0", one_step_plan("add-column"), lambda d: None, tmp_path / "work", runner(ADD_COLUMN))
        assert discard_leftovers(tmp_path) == []  # nor discarded under it
        assert dst.is_dir()

    report = rehearse("node0", one_step_plan("add-column"), copy, tmp_path / "work", runner(ADD_COLUMN),
                      volatile={"B": ["/var/lib/app/stats"]})
    assert report.ok, report.problems


def test_discard_leftovers_removes_what_killed_rehearsals_left(tmp_path: Path) -> None:
    root = tmp_path / "upgrade/rehearsal"
    assert discard_leftovers(root) == []  # no rehearsal ever ran
    for node in ("node0", "node1", "node2"):
        (root / node / "state/etc/ssh").mkdir(parents=True)
        (root / node / "state/etc/ssh/ssh_host_ed25519_key").write_text("secret")
        (root / node / "state/etc/ssh/ssh_host_ed25519_key").chmod(0)
    (root / "node1/sandbox/root-x").mkdir(parents=True)
    (root / "node1/state/link").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/kept").write_text("not the rehearsal's")
    running = os.open(root.parent / ".rehearsal-node2.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(running, fcntl.LOCK_EX)  # a rehearsal of node2 still runs: left alone
        assert discard_leftovers(root) == [str(root / "node0"), str(root / "node1")]
    finally:
        os.close(running)
    assert (root / "node2/state/etc/ssh").is_dir() and (tmp_path / "outside/kept").is_file()
    assert not (root / "node0").exists() and not (root / "node1").exists()
    assert discard_leftovers(root) == [str(root / "node2")]
    assert list(root.iterdir()) == []
    assert discard_leftovers(root) == []
