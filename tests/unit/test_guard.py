"""While an operation is open nothing else changes the site: the guard, and the site commands that ask it (no root)."""
from __future__ import annotations

import ast
import fcntl
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from imageupdate.base.datadirs import heat_templates_dir
from imageupdate.base.errors import EXIT_BAD_INPUT, InputError
from imageupdate.cli.main import build_parser, main
from imageupdate.heat.service import HeatService
from imageupdate.history.db import History
from imageupdate.images.store import ImageStore
from imageupdate.site import guard, lifecycle
from imageupdate.site import rebuild as site_rebuild
from imageupdate.site.guard import OperationOpen, open_operation, refuse_while_open
from imageupdate.site.network import SiteNet
from imageupdate.site.site import LocalSite
from imageupdate.site.sitedir import TOMBSTONE, SiteNotFound

PLAN = {"batches": [["node0"], ["node1"]], "before": {"node0": "R1", "node1": "R1"},
        "after": {"node0": "R2", "node1": "R2"}}
BREAKS = "would delete every node's state, snapshots and the history"


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def open_rollout(site: Path, status: str = "running", pid: int | None = None, kind: str = "rollout",
                 target: str | None = "R2") -> int:
    history = History(site / "history.sqlite")
    history.start("adopt", None, {}, {"batches": [], "before": {}, "after": {}})  # finished below: not open
    history.finish(1, "succeeded")
    return history.start(kind, target, {"batch_size": 1}, PLAN, pid=pid, status=status).id


def make_site(path: Path, nodes: int = 2) -> LocalSite:
    """A site directory as ``site up`` leaves it, without anything running."""
    (path / "nodes").mkdir(parents=True)
    (path / "site.json").write_text(json.dumps({
        "id": "abc123", "subnet": "10.231.99.0/24", "store": str(path.parent / "store"),
        "nodes": [{"name": f"node{i}", "index": i} for i in range(nodes)]}))
    for i in range(nodes):
        (path / "nodes" / f"node{i}").mkdir()
    (path / ".lock").write_text("")
    return LocalSite(path, ImageStore(path.parent / "store"))


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site's commands need root; their refusals are checked without it (nothing runs)."""
    monkeypatch.setattr(lifecycle, "require_root", lambda why: None)
    monkeypatch.setattr(site_rebuild, "require_root", lambda why: None)
    monkeypatch.setattr(HeatService, "stop", lambda self: "not running")
    for name in ("create_bridge", "delete_bridge", "delete_node"):
        monkeypatch.setattr(SiteNet, name, lambda *a: None)
    monkeypatch.setattr(SiteNet, "bridge_exists", lambda self: True)


# open_operation ------------------------------------------------------------------------------------------------


def test_no_history_is_no_operation_and_creates_nothing(tmp_path: Path) -> None:
    assert open_operation(tmp_path) is None
    assert open_operation(tmp_path / "missing") is None
    assert list(tmp_path.iterdir()) == []


def test_running_with_a_live_owner(tmp_path: Path) -> None:
    rid = open_rollout(tmp_path, pid=os.getpid())
    assert open_operation(tmp_path) == f"rollout {rid} to R2 is running (process {os.getpid()})"


def test_running_with_a_dead_owner_is_interrupted(tmp_path: Path) -> None:
    pid = dead_pid()
    rid = open_rollout(tmp_path, pid=pid)
    assert open_operation(tmp_path) == f"rollout {rid} to R2 was interrupted (process {pid} is gone)"


def test_paused(tmp_path: Path) -> None:
    rid = open_rollout(tmp_path, status="paused", pid=dead_pid())
    assert open_operation(tmp_path) == f"rollout {rid} to R2 is paused"


def test_rollback_to_last_good_releases(tmp_path: Path) -> None:
    rid = open_rollout(tmp_path, status="paused", kind="rollback", target=None)
    assert open_operation(tmp_path) == f"rollback {rid} to each node's last good release is paused"


def test_finished_operations_are_not_open(tmp_path: Path) -> None:
    history = History(tmp_path / "history.sqlite")
    for status in ("succeeded", "failed", "rolled-back", "cancelled"):
        row = history.start("rollout", "R2", {}, PLAN, pid=os.getpid())
        history.finish(row.id, status)
    assert open_operation(tmp_path) is None
    assert refuse_while_open(tmp_path, "site destroy", BREAKS, force=False) is None


def test_a_held_rollout_lock_is_an_operation_under_way(tmp_path: Path) -> None:
    """Between taking the rollout lock and writing its row (or after closing it), a rollout still operates."""
    lock = tmp_path / "rollout.lock"
    lock.write_text(json.dumps({"pid": 4242, "rollout": None, "command": "imageupdate rollout R2", "since": 0}))
    assert open_operation(tmp_path) is None  # the record alone is not a holder
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        said = open_operation(tmp_path)
        assert said == "an operation of process 4242 ('imageupdate rollout R2') is under way"
        with pytest.raises(OperationOpen) as e:
            refuse_while_open(tmp_path, "heat stop", "would stop its Heat", force=False)
        assert "wait for it to finish or stop it ('imageupdate cancel')" in e.value.message
    finally:
        os.close(fd)
    assert open_operation(tmp_path) is None


# refuse_while_open ---------------------------------------------------------------------------------------------


def test_refusal_is_one_line_naming_the_operation_the_harm_and_the_ways_out(tmp_path: Path) -> None:
    rid = open_rollout(tmp_path, pid=os.getpid())
    with pytest.raises(OperationOpen) as e:
        refuse_while_open(tmp_path, "site destroy", BREAKS, force=False)
    err = e.value
    assert isinstance(err, InputError) and err.exit_code == EXIT_BAD_INPUT
    assert "\n" not in err.message
    assert err.message == (f"rollout {rid} to R2 is running (process {os.getpid()}) on site {tmp_path}: "
                           f"'site destroy' {BREAKS}; wait for it to finish or stop it ('imageupdate cancel') "
                           "first, or pass --force")


def test_paused_or_interrupted_point_to_resume_and_cancel(tmp_path: Path) -> None:
    rid = open_rollout(tmp_path, status="paused")
    with pytest.raises(OperationOpen) as e:
        refuse_while_open(tmp_path, "site down", "would stop every node", force=False)
    assert e.value.message == (f"rollout {rid} to R2 is paused on site {tmp_path}: 'site down' would stop every "
                               "node; finish it ('imageupdate resume') or stop it ('imageupdate cancel') first, "
                               "or pass --force")


def test_force_goes_ahead_and_says_what_it_overrode(tmp_path: Path) -> None:
    rid = open_rollout(tmp_path, pid=dead_pid())
    said = refuse_while_open(tmp_path, "site destroy", BREAKS, force=True)
    assert said is not None and said.startswith(f"rollout {rid} to R2 was interrupted")


# the site's commands -------------------------------------------------------------------------------------------


def test_destroy_down_and_heat_stop_refuse_and_change_nothing(tmp_path: Path, as_root: None) -> None:
    site = make_site(tmp_path / "site")
    open_rollout(site.path, status="paused")
    before = sorted(p.name for p in site.path.rglob("*"))
    for call, command in ((site.destroy, "site destroy"), (site.down, "site down"),
                          (site.stop_heat, "heat stop")):
        with pytest.raises(OperationOpen) as e:
            call()
        assert f"'{command}'" in e.value.message and "is paused" in e.value.message
    assert sorted(p.name for p in site.path.rglob("*")) == before
    assert site.config()["id"] == "abc123"


def test_destroy_with_force_removes_the_site(tmp_path: Path, as_root: None) -> None:
    site = make_site(tmp_path / "site")
    open_rollout(site.path, status="paused")
    site.destroy(force=True)
    assert not site.path.exists()


def test_an_interrupted_destroy_is_finished_without_force(tmp_path: Path, as_root: None) -> None:
    """The tombstone says a destroy had been allowed (or forced) already: finishing it asks nothing more."""
    site = make_site(tmp_path / "site")
    open_rollout(site.path, status="paused")
    os.replace(site.path / "site.json", site.path / TOMBSTONE)
    with pytest.raises(SiteNotFound) as e:
        site.status()
    assert "being destroyed" in e.value.message and "site destroy" in e.value.message
    with pytest.raises(SiteNotFound):
        site.up()  # a half-destroyed site is not brought back
    site.destroy()
    assert not site.path.exists()


def test_operator_rebuild_refused_heat_rebuild_and_force_go_on(tmp_path: Path, as_root: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_site(tmp_path / "site")
    rid = open_rollout(site.path, pid=dead_pid())
    done: list[str] = []
    monkeypatch.setattr(site_rebuild, "switch", lambda site, node, release: done.append(node.name))
    with pytest.raises(OperationOpen) as e:
        site.rebuild("node1", "R2")
    assert e.value.message.startswith(f"rollout {rid} to R2 was interrupted")
    assert "'site rebuild node1 R2' would change node1 under it" in e.value.message
    assert done == []
    site.rebuild("node1", "R2", by_heat=True)
    site.rebuild("node1", "R2", force=True)
    assert done == ["node1", "node1"]


def test_rebuild_checks_again_once_it_holds_the_locks(tmp_path: Path, as_root: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild that waited for the locks is refused if an operation opened meanwhile."""
    site = make_site(tmp_path / "site")
    locked = LocalSite.locked

    @contextmanager
    def opens_while_waiting(self: LocalSite, *a: Any, **kw: Any) -> Iterator[None]:
        open_rollout(self.path, status="running", pid=os.getpid())
        with locked(self, *a, **kw):
            yield

    monkeypatch.setattr(LocalSite, "locked", opens_while_waiting)
    monkeypatch.setattr(site_rebuild, "switch", lambda site, node, release: pytest.fail("rebuilt"))
    with pytest.raises(OperationOpen):
        site.rebuild("node0", "R2", wait=1)


@pytest.mark.parametrize("how", ["tombstone", "removed"])
def test_rebuild_of_a_site_destroyed_while_it_waited_fails_cleanly(tmp_path: Path, as_root: None, how: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_site(tmp_path / "site")
    locked = LocalSite.locked

    @contextmanager
    def destroyed_while_waiting(self: LocalSite, *a: Any, **kw: Any) -> Iterator[None]:
        if how == "tombstone":  # the destroy has begun and let go of the lock, or is still under way
            os.replace(self.path / "site.json", self.path / TOMBSTONE)
        else:  # the destroy is done
            subprocess.run(["rm", "-rf", str(self.path)], check=True)
        with locked(self, *a, **kw):
            yield

    monkeypatch.setattr(LocalSite, "locked", destroyed_while_waiting)
    monkeypatch.setattr(site_rebuild, "switch", lambda site, node, release: pytest.fail("rebuilt"))
    with pytest.raises(SiteNotFound) as e:
        site.rebuild("node0", "R2", wait=1, by_heat=True)
    assert "\n" not in e.value.message
    if how == "tombstone":
        assert "was destroyed while the rebuild of node0 to R2 waited" in e.value.message
        assert not (site.path / "nodes/node0/.lock").exists()  # not even the node's lock was taken
    else:
        assert not site.path.exists()  # nothing made again: no directory, no lock file


def test_rebuild_of_a_site_taken_down_meanwhile_fails_cleanly(tmp_path: Path, as_root: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A node cannot start without its site's bridge: say so instead of leaving a half-made namespace."""
    site = make_site(tmp_path / "site")
    monkeypatch.setattr(SiteNet, "bridge_exists", lambda self: False)
    monkeypatch.setattr(site_rebuild, "switch", lambda site, node, release: pytest.fail("rebuilt"))
    with pytest.raises(InputError) as e:
        site.rebuild("node0", "R2", by_heat=True)
    assert f"site {site.path} is down" in e.value.message and "imageupdate site up" in e.value.message


def test_destroy_sweeps_every_namespace_and_link_named_for_the_site(tmp_path: Path, as_root: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Namespaces and veths of nodes that site.json does not know (half created) go too; other sites' stay."""
    netns, links = tmp_path / "netns", tmp_path / "net"
    netns.mkdir()
    links.mkdir()
    for name in ("iu-abc123-node0", "iu-abc123-node7", "iu-abc124-node0"):
        (netns / name).touch()
    for name in ("iuvabc123000", "iuvabc123007", "iuvabc124000", "eth0", "iub-abc123"):
        (links / name).touch()
    calls: list[tuple[str, ...]] = []

    def fake_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(["ip", *args], 0, "", "")

    monkeypatch.setattr(lifecycle, "NETNS_DIR", netns)
    monkeypatch.setattr(lifecycle, "SYS_NET", links)
    monkeypatch.setattr(lifecycle, "ip", fake_ip)
    make_site(tmp_path / "site").destroy()
    assert ("netns", "del", "iu-abc123-node0") in calls and ("netns", "del", "iu-abc123-node7") in calls
    assert ("link", "del", "iuvabc123000") in calls and ("link", "del", "iuvabc123007") in calls
    assert not any("abc124" in " ".join(c) or "eth0" in c for c in calls)
    assert not (tmp_path / "site").exists()


# the command line ----------------------------------------------------------------------------------------------


def test_cli_refuses_in_one_line_and_exits_2(tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site(tmp_path / "site")
    rid = open_rollout(site.path, status="paused")
    for argv in (["site", "destroy"], ["site", "down"], ["heat", "stop"], ["site", "rebuild", "node1", "R2"]):
        assert main([*argv, "--site", str(site.path)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"imageupdate: error: rollout {rid} to R2 is paused"), argv
        assert "--force" in err[0]
    assert (site.path / "site.json").is_file()


def test_cli_force_warns_and_goes_ahead(tmp_path: Path, as_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site(tmp_path / "site")
    rid = open_rollout(site.path, status="paused")
    assert main(["heat", "stop", "--force", "--site", str(site.path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"imageupdate: warning: rollout {rid} to R2 is paused on site {site.path}; "
                   "'heat stop' goes ahead (--force)"]


def test_force_and_by_heat_flags() -> None:
    parser = build_parser()
    for argv in (["site", "destroy"], ["site", "down"], ["heat", "stop"], ["site", "rebuild", "n", "R"]):
        assert parser.parse_args(argv).force is False and parser.parse_args([*argv, "--force"]).force is True
    assert parser.parse_args(["site", "rebuild", "n", "R", "--by-heat"]).by_heat is True
    rebuild_help = next(a for a in parser._actions if a.dest == "command").choices["site"]  # type: ignore[union-attr]
    text = next(a for a in rebuild_help._actions if a.dest == "site_command").choices["rebuild"].format_help()
    assert "--force" in text and "--by-heat" not in text


# the Heat plugin -----------------------------------------------------------------------------------------------


def plugin_function(name: str) -> Any:
    """A function of the Heat plugin, without importing Heat (the plugin runs inside Heat's engine)."""
    tree = ast.parse((heat_templates_dir() / "plugins/imageupdate_local.py").read_text())
    keep = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in (name, "error_document"))
            or (isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id.isupper())]
    scope: dict[str, Any] = {"signal": signal, "json": json}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "imageupdate_local.py", "exec"), scope)  # noqa: S102
    return scope[name]


def test_plugin_passes_by_heat() -> None:
    text = (heat_templates_dir() / "plugins/imageupdate_local.py").read_text()
    assert '"--by-heat"' in text


def test_plugin_says_a_killed_rebuild_was_killed_and_how_to_recover() -> None:
    failure = plugin_function("rebuild_failure")
    said = failure(-9, "node0", "R1", "/s", [])
    assert said == ("rebuild of node0 to R1 was killed (SIGKILL); 'imageupdate site recover --site /s' finishes "
                    "the node on one release")
    # the child said nothing after the plugin's own header (exit status without a word)
    said = failure(1, "node0", "R1", "/s", ["--- rebuild node0 to R1 (heat resource server_node0)"])
    assert "node0 to R1" in said and "imageupdate site recover --site /s" in said and not said.startswith("---")
    # it died before its error document: the log's last line is all there is
    assert failure(1, "node0", "R1", "/s", ["boom"]) == "rebuild of node0 to R1 failed: boom"


def test_plugin_reads_the_json_error_document_not_the_cli_wording() -> None:
    failure = plugin_function("rebuild_failure")
    message = "site /s was destroyed while the rebuild of node0 to R1 waited for it; nothing was changed"
    doc = json.dumps({"error": "SiteNotFound", "message": message, "exit_code": 2, "node": "node0",
                      "release": "R1", "step": None})
    # the document wins over whatever the log says, wording and all
    assert failure(2, "node0", "R1", "/s", ["imageupdate: error: something else"], doc) == message
    doc = json.dumps({"error": "OperationError", "message": "no space left", "exit_code": 1})
    assert failure(1, "node0", "R1", "/s", [], doc) == "rebuild of node0 to R1 failed: no space left"
    # not a document (a traceback, half a line): the log's last line, then
    assert failure(1, "node0", "R1", "/s", ["Traceback: boom"], "{\"err") == \
        "rebuild of node0 to R1 failed: Traceback: boom"
    assert failure(1, "node0", "R1", "/s", ["boom"], json.dumps({"address": "10.0.0.2"})) == \
        "rebuild of node0 to R1 failed: boom"


def test_what_the_plugin_reads_is_what_a_failing_rebuild_writes(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    """The contract end to end: `site rebuild --json` failing writes the document the plugin reads."""
    rc = main(["site", "rebuild", "node0", "R1", "--site", str(tmp_path / "none"), "--json", "--by-heat"])
    out = capsys.readouterr().out
    doc = plugin_function("error_document")(out)
    assert rc != 0 and doc is not None and doc["exit_code"] == rc
    said = plugin_function("rebuild_failure")(rc, "node0", "R1", "/s", [], out)
    assert doc["message"] in said


def test_guard_reads_the_history_only_where_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    monkeypatch.setattr(guard, "History", opened.append)
    assert open_operation(tmp_path) is None and opened == []
