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

from imageupdate.base.errors import EXIT_BAD_INPUT, InputError
from imageupdate.rollout.engine import RolloutOptions
from imageupdate.rollout.lock import RolloutInProgress, RolloutLock
from imageupdate.verify.checks import CheckResult, Verdict

REPO = Path(__file__).resolve().parents[2]

# a second process that takes the site's lock for rollout 7 and holds it until its stdin closes
HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from imageupdate.base.locks import describe_process
    from imageupdate.rollout.lock import RolloutLock
    describe_process(" ".join(["imageupdate", *sys.argv[1:]]))  # what the front door does
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


# verdicts ------------------------------------------------------------------------------------------


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
    assert d["started"] == v.started and d["finished"] is None


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
        (RolloutOptions(hook_timeout=0), "--hook-timeout must be above 0 seconds, not 0"),
        (RolloutOptions(probe_interval=0.001), "--probe-interval must be between 0.01 and 10 seconds, not 0.001"),
    ],
)
def test_bad_options_are_bad_input(opts: RolloutOptions, flag: str) -> None:
    with pytest.raises(InputError) as exc:
        opts.validate()
    assert str(exc.value) == flag
    assert exc.value.exit_code == 2


def test_a_service_the_probe_saw_down_for_the_whole_gate_fails_it(tmp_path: Path) -> None:
    """The gate's evidence includes the downtime probe: down from the gate's start to its end fails it."""
    from types import SimpleNamespace
    from typing import Any

    from imageupdate.rollout.watch import Watch, Watcher
    from imageupdate.verify.checks import CheckResult, Verdict
    from imageupdate.verify.probe import Endpoint, Prober

    now = [1000.0]
    answers: dict[str, bool] = {"node0": False, "node1": True}
    prober = Prober([Endpoint("node0", "10.0.0.1", (8080,), "/health"), Endpoint("node1", "10.0.0.2", (8080,))],
                     clock=lambda: now[0])

    def verify(target: Any, want: Any, extra: Any = None) -> Verdict:
        for _ in range(10):  # the probe asks while the checks run
            now[0] += 0.5
            for name, probe in prober.probes.items():
                probe.record(now[0], answers[name])
        verdict = Verdict(target.name, want, [CheckResult("release", True, 0.1, "ok")])
        verdict.results.extend(extra())
        return verdict

    fleet = SimpleNamespace(path=tmp_path, history=None, target=lambda n: SimpleNamespace(name=n),
                            expectation=lambda r: r, wait_booted=lambda n, t: None)
    extras = SimpleNamespace(hooks=None)
    orch = Watcher(None, "stack", fleet, None, extras, verify, say=lambda *a: None,  # type: ignore[arg-type]
                   sleep=lambda s: None)
    watch = Watch(prober=prober)
    row = SimpleNamespace(id=1, options={"gate_timeout": 600})
    down = orch.check_node(row, "node0", "R2", watch)  # type: ignore[arg-type]
    assert not down.ok
    assert "check probe failed: probe: http://10.0.0.1:8080/health was down for the whole gate (10 of 10 " \
           "requests failed over 5.0 s)" in down.reason
    up = orch.check_node(row, "node1", "R2", watch)  # type: ignore[arg-type]
    assert up.ok and [r.name for r in up.results] == ["release", "probe"]
    assert orch.check_node(row, "node2", "R2", watch).ok  # type: ignore[arg-type]  # not probed: no evidence
