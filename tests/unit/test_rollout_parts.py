"""Rollout parts that need no Heat: the site lock, a node's checks with a fake runner, the options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageupdate.errors import EXIT_BAD_INPUT, InputError
from imageupdate.rollout.engine import RolloutOptions
from imageupdate.rollout.lock import RolloutInProgress, RolloutLock
from imageupdate.verify.checks import LIST_TESTS, TESTS_DIR, CheckResult, NodeTarget, Verdict, verify_node

REPO = Path(__file__).resolve().parents[2]

# a second process that takes the site's lock for rollout 7 and holds it until its stdin closes
HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from imageupdate.rollout.lock import RolloutLock
    lock = RolloutLock(Path(sys.argv[1]))
    lock.acquire(7)
    print("held", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "rollout", "R2"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


# the lock -----------------------------------------------------------------------------------------


def test_acquire_records_the_owner(tmp_path: Path) -> None:
    site = tmp_path / "site"
    lock = RolloutLock(site)
    assert lock.owner() is None
    lock.acquire(3)
    try:
        assert lock.path == site / "rollout.lock" and lock.path.is_file()
        owner = lock.owner()
        assert owner is not None
        assert (owner.pid, owner.rollout) == (os.getpid(), 3)
        assert owner.command.startswith("imageupdate")
        lock.record(8)  # the operation's row exists now
        again = RolloutLock(site).owner()
        assert again is not None and (again.pid, again.rollout) == (os.getpid(), 8)
        assert json.loads(lock.path.read_text())["rollout"] == 8  # one record, rewritten
    finally:
        lock.release()


def test_a_second_process_is_refused_with_the_owner_named(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    lock = RolloutLock(tmp_path)
    assert lock.held_by_other()
    owner = lock.owner()
    assert owner is not None
    assert (owner.pid, owner.rollout) == (holder.pid, 7)
    assert owner.command == f"imageupdate {tmp_path} rollout R2"
    with pytest.raises(RolloutInProgress) as exc:
        lock.acquire()
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"process {holder.pid} ('imageupdate {tmp_path} rollout R2', since ")
    assert "imageupdate cancel" in message
    assert exc.value.exit_code == EXIT_BAD_INPUT and isinstance(exc.value, InputError)
    assert lock._fd is None  # nothing held after a refusal


def test_the_lock_is_free_once_its_owner_is_gone(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    lock = RolloutLock(tmp_path)
    assert lock.held_by_other()
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=5) == 0
    assert not lock.held_by_other()
    stale = lock.owner()
    assert stale is not None and stale.pid == holder.pid  # the record stays to say who held it last
    with lock:
        lock.acquire()
        owner = lock.owner()
        assert owner is not None and owner.pid == os.getpid() and owner.rollout is None


def test_release_frees_the_lock(tmp_path: Path) -> None:
    first, second = RolloutLock(tmp_path), RolloutLock(tmp_path)
    first.acquire()
    with pytest.raises(RolloutInProgress, match=f"process {os.getpid()} "):
        second.acquire()  # flock is per open file: a second open in this process conflicts too
    first.release()
    first.release()  # idempotent
    second.acquire()
    second.release()
    assert not RolloutLock(tmp_path).held_by_other()


def test_context_exit_frees_the_lock_even_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), RolloutLock(tmp_path) as lock:
        lock.acquire()
        with pytest.raises(RolloutInProgress):
            RolloutLock(tmp_path).acquire()
        raise RuntimeError("boom")
    other = RolloutLock(tmp_path)
    other.acquire()
    other.release()


def test_held_by_other_on_a_free_site(tmp_path: Path) -> None:
    assert RolloutLock(tmp_path).held_by_other() is False


def test_refusal_without_an_owner_record(tmp_path: Path) -> None:
    first = RolloutLock(tmp_path)
    first.acquire()
    try:
        first.path.write_text("not json")
        assert first.owner() is None
        with pytest.raises(RolloutInProgress, match="^another process is operating"):
            RolloutLock(tmp_path).acquire()
    finally:
        first.release()


def test_record_without_the_lock_writes_nothing(tmp_path: Path) -> None:
    lock = RolloutLock(tmp_path)
    lock.record(5)
    assert not lock.path.exists()


# a node's checks ----------------------------------------------------------------------------------


TARGET = NodeTarget("node0", "10.0.0.10", Path("/keys/id"))


class FakeNode:
    """Answers the commands verify_node runs, as SSH would; records them."""

    def __init__(
        self,
        stamp: str = '{"release": "R2"}',
        stamp_rc: int = 0,
        stamp_err: str = "",
        tests: dict[str, tuple[int, str, str]] | None = None,
        listing_rc: int = 0,
    ) -> None:
        self.stamp, self.stamp_rc, self.stamp_err = stamp, stamp_rc, stamp_err
        self.tests = tests or {}
        self.listing_rc = listing_rc
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, target: NodeTarget, command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        assert target == TARGET
        self.calls.append((command, timeout))
        if command == ["cat", "/etc/imageupdate/release.json"]:
            return subprocess.CompletedProcess(command, self.stamp_rc, self.stamp, self.stamp_err)
        if command == LIST_TESTS:
            if self.listing_rc:
                return subprocess.CompletedProcess(command, self.listing_rc, "", "ssh: connect to host: refused")
            return subprocess.CompletedProcess(command, 0, "".join(f"{n}\n" for n in self.tests), "")
        name = command[0].removeprefix(TESTS_DIR + "/")
        rc, out, err = self.tests[name]
        return subprocess.CompletedProcess(command, rc, out, err)


def test_a_healthy_node_passes_every_test_in_name_order() -> None:
    node = FakeNode(tests={"20-http": (0, "ok\n", ""), "10-data": (0, "", ""), "30-db": (0, "fine", "")})
    v = verify_node(TARGET, "R2", run=node)
    assert v.ok and v.failed == []
    assert [(r.name, r.ok, r.output) for r in v.results] == [
        ("release", True, "runs R2"),
        ("test:10-data", True, "exit status 0"),
        ("test:20-http", True, "ok"),
        ("test:30-db", True, "fine"),
    ]
    assert all(r.seconds >= 0 for r in v.results)
    assert v.reason == "node0 on R2: 4 checks passed"
    assert [c[0] for c in node.calls][3:] == [[f"{TESTS_DIR}/20-http"], [f"{TESTS_DIR}/30-db"]]
    assert node.calls[0][1] == 30.0 and node.calls[2][1] == 120.0


def test_release_mismatch_fails_and_skips_the_tests() -> None:
    node = FakeNode(stamp='{"release": "R1"}', tests={"10-data": (0, "", "")})
    v = verify_node(TARGET, "R2", run=node)
    assert not v.ok
    assert [(r.name, r.ok) for r in v.results] == [("release", False)]
    assert v.results[0].output == "node runs 'R1', expected 'R2'"
    assert v.reason == "node0 on R2: check release failed: node runs 'R1', expected 'R2'"
    assert len(node.calls) == 1  # neither listed nor ran a test


def test_an_unreachable_node_fails_its_release_check() -> None:
    node = FakeNode(
        stamp="",
        stamp_rc=255,
        stamp_err="ssh: connect to host 10.0.0.10 port 22: No route to host\n",
        tests={"10-data": (0, "", "")},
    )
    v = verify_node(TARGET, "R2", run=node)
    assert not v.ok and len(v.results) == 1 and len(node.calls) == 1
    assert v.results[0].output == (
        "node does not answer over SSH at 10.0.0.10: ssh: connect to host 10.0.0.10 port 22: No route to host"
    )
    assert "check release failed: node does not answer over SSH" in v.reason


def test_an_unreachable_node_without_stderr_names_the_exit_status() -> None:
    v = verify_node(TARGET, "R2", run=FakeNode(stamp="", stamp_rc=124))
    assert v.results[0].output == "node does not answer over SSH at 10.0.0.10: 124"


def test_a_stamp_that_is_not_json_fails() -> None:
    v = verify_node(TARGET, "R2", run=FakeNode(stamp="R2\n"))
    assert not v.ok and v.results[0].output.startswith("release stamp /etc/imageupdate/release.json is not")


@pytest.mark.parametrize("stamp", ['"R2"', "null", '["R2"]'])
def test_a_stamp_that_is_json_but_not_an_object_fails(stamp: str) -> None:
    v = verify_node(TARGET, "R2", run=FakeNode(stamp=stamp))
    assert not v.ok and v.results[0].name == "release"


def test_failing_tests_are_all_run_and_the_first_is_named() -> None:
    node = FakeNode(
        tests={
            "10-data": (0, "", ""),
            "20-http": (1, "GET /\n", "connection refused\nexpected 200, got 503\n"),
            "30-db": (2, "", ""),
            "40-cache": (0, "", ""),
        }
    )
    v = verify_node(TARGET, "R2", run=node)
    assert not v.ok
    assert [(r.name, r.ok) for r in v.results] == [
        ("release", True),
        ("test:10-data", True),
        ("test:20-http", False),
        ("test:30-db", False),
        ("test:40-cache", True),
    ]
    assert [r.name for r in v.failed] == ["test:20-http", "test:30-db"]
    assert v.results[3].output == "exit status 2"
    assert v.reason == "node0 on R2: check test:20-http failed: expected 200, got 503 (and 1 more)"


def test_a_single_failure_says_no_more() -> None:
    v = verify_node(TARGET, "R2", run=FakeNode(tests={"10-data": (1, "disk missing\n", "")}))
    assert v.reason == "node0 on R2: check test:10-data failed: disk missing"


def test_a_release_without_tests_passes_on_its_stamp() -> None:
    v = verify_node(TARGET, "R2", run=FakeNode())
    assert v.ok and [r.name for r in v.results] == ["release"]
    assert v.reason == "node0 on R2: 1 checks passed"


@pytest.mark.parametrize("rc", [1, 2, 255])
def test_tests_that_cannot_be_listed_fail_the_gate(rc: int) -> None:
    v = verify_node(TARGET, "R2", run=FakeNode(listing_rc=rc))
    assert not v.ok and [r.name for r in v.results] == ["release", "tests"]
    assert "cannot list" in v.reason and "refused" in v.reason


def test_verdict_reason_with_silent_failure_and_long_output() -> None:
    v = Verdict(
        "node1",
        "R3",
        [
            CheckResult("release", True, 0.1, "runs R3"),
            CheckResult("test:a", False, 0.2, "  \n "),
            CheckResult("test:b", False, 0.2, "x"),
            CheckResult("test:c", False, 0.2, "y"),
        ],
    )
    assert v.reason == "node1 on R3: check test:a failed: failed (and 2 more)"
    long = Verdict("node1", "R3", [CheckResult("test:a", False, 0.2, "first\n" + "z" * 500)])
    assert long.reason == "node1 on R3: check test:a failed: " + "z" * 200
    d = v.to_dict()
    assert d["ok"] is False and d["reason"] == v.reason and d["node"] == "node1"
    checks = d["checks"]
    assert isinstance(checks, list) and len(checks) == 4
    assert checks[1] == {"name": "test:a", "ok": False, "seconds": 0.2, "output": "  \n "}


def test_a_verdict_without_checks_is_not_ok() -> None:
    assert Verdict("node0", "R2").ok is False


# options ------------------------------------------------------------------------------------------


def test_default_options_are_valid() -> None:
    RolloutOptions().validate()
    RolloutOptions(batch_size=3, canary=True, gate_timeout=1).validate()


@pytest.mark.parametrize(
    "opts, flag",
    [
        (RolloutOptions(batch_size=0), "--batch-size must be at least 1, not 0"),
        (RolloutOptions(batch_size=-2), "--batch-size must be at least 1, not -2"),
        (RolloutOptions(gate_timeout=0), "--gate-timeout must be at least 1 second, not 0"),
        (RolloutOptions(gate_timeout=-5), "--gate-timeout must be at least 1 second, not -5"),
    ],
)
def test_bad_options_are_bad_input(opts: RolloutOptions, flag: str) -> None:
    with pytest.raises(InputError) as exc:
        opts.validate()
    assert str(exc.value) == flag
    assert exc.value.exit_code == 2
