"""While an operation is open nothing else changes the site; a destroyed site stays destroyed (needs root).

One 2-node site holds a paused rollout while every command that would change it under the rollout is
refused; a 1-node site has a rebuild run by Heat killed (the reason says so and names ``site recover``),
then is destroyed while an operator's rebuild waits for its lock: the rebuild gives up, nothing stays.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageupdate.base import procs
from imageupdate.site import lifecycle
from imageupdate.site.site import LocalSite
from tests.functional.conftest import imageupdate, live_processes_mentioning
from tests.functional.test_site import leftovers

pytestmark = pytest.mark.functional


def cli(site: Path, store: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return imageupdate(*args, "--site", str(site), "--store", str(store), "--json", env=env)


def site_status(site: Path, store: Path) -> dict[str, Any]:
    proc = cli(site, store, "site", "status")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def nodes_of(site: Path, store: Path) -> dict[str, tuple[str, bool]]:
    return {n["name"]: (n["current"], n["running"]) for n in site_status(site, store)["nodes"]}


def rollout_rows(site: Path) -> list[tuple[int, str, str]]:
    db = sqlite3.connect(f"file:{site / 'history.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT id, kind, status FROM rollouts ORDER BY id").fetchall()
    finally:
        db.close()


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (a rebuild waiting for the site lock holds it open)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def make_site(path: Path, store: Path, nodes: int) -> Iterator[Path]:
    imageupdate("site", "up", "--nodes", str(nodes), "--release", "R1", "--site", str(path), "--store", str(store),
                check=True)
    site_id = json.loads((path / "site.json").read_text())["id"]
    try:
        yield path
    finally:
        if path.exists():  # whatever a failed test left open: this is the operator who means it
            imageupdate("site", "destroy", "--force", "--site", str(path), "--store", str(store))
        assert not leftovers(site_id, path)
        assert not live_processes_mentioning(f"{path}/heat")


@pytest.fixture
def two_nodes(releases: dict, store_dir: Path, tmp_path: Path) -> Iterator[Path]:  # type: ignore[type-arg]
    yield from make_site(tmp_path / "site", store_dir, 2)


@pytest.fixture
def one_node(releases: dict, store_dir: Path, tmp_path: Path) -> Iterator[Path]:  # type: ignore[type-arg]
    yield from make_site(tmp_path / "site", store_dir, 1)


def test_an_open_rollout_is_left_alone_until_it_ends(two_nodes: Path, store_dir: Path) -> None:
    site = two_nodes
    site_id = json.loads((site / "site.json").read_text())["id"]
    proc = cli(site, store_dir, "rollout", "R2", "--pause-between-batches")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "paused"
    rid = json.loads(proc.stdout)["rollout"]["id"]
    paused = {"node0": ("R2", True), "node1": ("R1", True)}
    assert nodes_of(site, store_dir) == paused
    heat = json.loads(cli(site, store_dir, "heat", "status").stdout)
    assert heat["running"]

    for args in (("site", "destroy"), ("site", "down"), ("heat", "stop"), ("site", "rebuild", "node1", "R2")):
        proc = cli(site, store_dir, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = proc.stderr.strip().splitlines()
        assert len(errors) == 1, (args, proc.stderr)
        assert errors[0].startswith(f"imageupdate: error: rollout {rid} to R2 is paused on site {site}: "
                                    f"'{' '.join(args)}' would "), errors[0]
        assert errors[0].endswith("finish it ('imageupdate resume') or stop it ('imageupdate cancel') first, "
                                  "or pass --force"), errors[0]
        assert json.loads(proc.stdout)["error"] == "OperationOpen"

    # nothing changed: the nodes run what they ran, Heat still runs, the history and the pause are there
    assert nodes_of(site, store_dir) == paused
    again = json.loads(cli(site, store_dir, "heat", "status").stdout)
    assert again["running"] and again["pid"] == heat["pid"]
    assert (rid, "rollout", "paused") in rollout_rows(site)

    proc = cli(site, store_dir, "cancel")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # cancelled, rolled back
    assert json.loads(proc.stdout).get("status") == "cancelled", proc.stdout + proc.stderr
    assert nodes_of(site, store_dir) == {"node0": ("R1", True), "node1": ("R1", True)}

    proc = cli(site, store_dir, "site", "destroy")
    assert proc.returncode == 0, proc.stderr
    assert not site.exists()
    assert not leftovers(site_id, site)  # no namespace, veth, bridge, mount or process of the site
    assert not live_processes_mentioning(f"{site}/heat")


def test_killed_heat_rebuild_then_a_rebuild_waiting_while_the_site_is_destroyed(one_node: Path,
                                                                                store_dir: Path) -> None:
    site = one_node
    site_id = json.loads((site / "site.json").read_text())["id"]

    # the rebuild Heat runs is SIGKILLed after it stopped the node (the rollout starts Heat: it inherits the break)
    proc = cli(site, store_dir, "rollout", "R2", "--no-rollback", "--no-rehearse", "--no-probe",
               env={"IMAGEUPDATE_BREAK": "after-stop"})
    assert proc.returncode == 1, proc.stderr
    said = proc.stdout + proc.stderr
    assert "rebuild of node0 to R2 was killed (SIGKILL)" in said, said
    assert f"'imageupdate site recover --site {site}'" in said, said
    assert "--- rebuild" not in said
    recovered = cli(site, store_dir, "site", "recover")
    assert recovered.returncode == 0, recovered.stderr
    assert nodes_of(site, store_dir) == {"node0": ("R1", True)}

    # an operator's rebuild waits for the site lock while the site is destroyed under it
    lib = LocalSite.open(site, store_dir)
    lock = site / ".lock"
    with lib.locked():
        child = subprocess.Popen([sys.executable, "-m", "imageupdate", "site", "rebuild", "node0", "R2",
                                  "--site", str(site), "--store", str(store_dir), "--wait-lock", "120"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "IMAGEUPDATE_BREAK"})
        try:
            assert procs.wait_until(lambda: has_open(child.pid, lock), 60, interval=0.1), child.communicate(timeout=5)
            lifecycle.destroy_locked(lib, force=True)  # what 'site destroy' does once it holds the lock
            assert not site.exists()
        except BaseException:
            child.kill()
            raise
    _out, err = child.communicate(timeout=60)
    assert child.returncode == 2, err
    errors = err.strip().splitlines()
    assert len(errors) == 1 and "was destroyed while the rebuild of node0 to R2 waited" in errors[0], err
    assert not site.exists()  # the rebuild made nothing again: no directory, no lock, no node
    assert not leftovers(site_id, site)
