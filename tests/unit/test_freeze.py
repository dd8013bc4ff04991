"""A frozen node is continued whoever dies: the watchdog of ``procs.frozen`` continues the tree when the one
that froze it is SIGKILLed or hangs past its bound, and leaves nothing behind on the normal path; a node
with a stopped process shows as paused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from imageupdate.base import procs
from imageupdate.commands import render
from imageupdate.site.node import Node, NodeStatus
from imageupdate.site.site import SiteStatus

REPO = Path(__file__).resolve().parents[2]

# Enters frozen(pid) and dies inside it: by the crashpoint (IMAGEUPDATE_BREAK=in-freeze), or by its own
# SIGKILL after printing the tree's states (proof that it was frozen).
CHILD = """import json, os, signal, sys
from imageupdate.base import procs
pid = int(sys.argv[1])
with procs.frozen(pid):
    print(json.dumps([procs.state(p) for p in procs.tree(pid)]), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
print("survived", flush=True)
"""


def poll(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture
def node_tree() -> Iterator[int]:
    """A stand-in for a node: a shell (its init) with two sleeps, in its own session."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert poll(lambda: len(procs.tree(proc.pid)) == 3, 5.0), procs.tree(proc.pid)
        yield proc.pid
    finally:
        pids = procs.tree(proc.pid)
        for p in pids:
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stopped_in(pids: list[int]) -> list[int]:
    return [p for p in pids if procs.state(p) == "T"]


def watchdogs() -> list[int]:
    """Our children that run the watchdog's code."""
    return [p for p in procs.children(os.getpid()) if "class Stop(Exception)" in procs.cmdline(p)]


@pytest.mark.parametrize("how", ["crashpoint", "sigkill"])
def test_a_tree_frozen_by_a_process_that_is_sigkilled_is_continued(node_tree: int, how: str) -> None:
    pids = procs.tree(node_tree)
    env = {**os.environ, "IMAGEUPDATE_BREAK": "in-freeze"} if how == "crashpoint" else \
        {k: v for k, v in os.environ.items() if k != "IMAGEUPDATE_BREAK"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(node_tree)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=30, check=False)
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr)
    if how == "sigkill":
        assert json.loads(child.stdout) == ["T", "T", "T"]  # it was frozen when it died
    assert "survived" not in child.stdout
    assert poll(lambda: not stopped_in(pids), 3.0), [(p, procs.state(p)) for p in pids]
    assert all(procs.alive(p) for p in pids)


def test_a_hung_caller_does_not_freeze_the_tree_past_its_bound(node_tree: int) -> None:
    pids = procs.tree(node_tree)
    t0 = time.monotonic()
    with pytest.raises(procs.FreezeExpired, match="not crash-consistent"), procs.frozen(node_tree, bound=1):
        assert stopped_in(pids) == pids
        # continued after its 1 s bound, not at FREEZE_BOUND (300 s); 30 s of slack for a loaded machine
        assert poll(lambda: not stopped_in(pids), 30.0), [(p, procs.state(p)) for p in pids]
        continued = time.monotonic() - t0
    assert 0.9 <= continued < 30.0


def test_the_normal_path_continues_the_tree_and_leaves_no_watchdog_behind(node_tree: int) -> None:
    pids = procs.tree(node_tree)
    with procs.frozen(node_tree):
        assert stopped_in(pids) == pids
        # the watchdog was forked before the first SIGSTOP; on a loaded machine it may not have exec'd yet
        assert poll(lambda: len(watchdogs()) == 1, 10.0), watchdogs()
        dogs = watchdogs()
        assert os.getsid(dogs[0]) == dogs[0]  # its own session: a Ctrl-C of ours does not reach it
    assert not stopped_in(pids)
    assert not os.path.exists(f"/proc/{dogs[0]}")  # exited and reaped
    assert watchdogs() == []


def test_an_exception_in_the_block_continues_the_tree_and_propagates(node_tree: int) -> None:
    pids = procs.tree(node_tree)
    with pytest.raises(RuntimeError, match="copy failed"), procs.frozen(node_tree):
        raise RuntimeError("copy failed")
    assert not stopped_in(pids)
    assert watchdogs() == []


def test_nothing_to_freeze_starts_no_watchdog() -> None:
    with procs.frozen(None):
        assert watchdogs() == []


def test_state_reads_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    odd = tmp_path / "a) b (T c"
    odd.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(odd), "60"])
    try:
        assert poll(lambda: procs.state(proc.pid) == "S", 5.0)
        os.kill(proc.pid, signal.SIGSTOP)
        assert poll(lambda: procs.stopped(proc.pid), 5.0)
        assert procs.parent(proc.pid) == os.getpid()
    finally:
        proc.kill()
        proc.wait()
    assert procs.state(proc.pid) is None and not procs.stopped(proc.pid)


class FakeNet:
    def address(self, index: int) -> str:
        return "127.0.0.1"


def test_a_node_with_a_stopped_process_is_paused(tmp_path: Path, node_tree: int) -> None:
    node = Node(tmp_path, FakeNet(), tmp_path / "releases", "node0", 0)  # type: ignore[arg-type]
    (tmp_path / "node.json").write_text(json.dumps({"name": "node0", "index": 0, "current": "r1", "pid": node_tree}))
    status = node.status()
    assert status.running and not status.paused
    sleeper = procs.tree(node_tree)[-1]
    os.kill(sleeper, signal.SIGSTOP)  # one process of the tree is enough
    assert poll(lambda: procs.stopped(sleeper), 5.0)
    status = node.status()
    assert status.running and status.paused and not status.reachable and status.pid == node_tree
    assert " paused unreachable" in str(render.node_line(status))
    os.kill(sleeper, signal.SIGCONT)
    assert poll(lambda: not node.status().paused, 5.0)


def test_site_status_says_paused_instead_of_running() -> None:
    def status(running: bool, paused: bool) -> NodeStatus:
        return NodeStatus("node0", "10.0.0.10", "r1", None, None, running, False, 1 if running else None,
                          paused=paused)
    assert str(render.node_line(status(True, True))) == "node0 10.0.0.10 r1 paused unreachable"
    assert str(render.node_line(status(True, False))) == "node0 10.0.0.10 r1 running unreachable"
    assert str(render.node_line(status(False, False))) == "node0 10.0.0.10 r1 stopped unreachable"
    console = Console(width=200, record=True)
    console.print(render.site_status(SiteStatus("/site", True, "10.0.0.0/24", [status(True, True)])))
    text = console.export_text()
    assert "paused" in text and "running" not in text


def test_the_children_of_a_process_that_is_gone_are_none() -> None:
    """A node's status reads its process tree while processes exit: one that went between the listing and
    the read has no children (it raised FileNotFoundError through 'status' before)."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    assert procs.children(child.pid) == []
    assert procs.children(2**22 + 7) == []  # beyond pid_max: never was
