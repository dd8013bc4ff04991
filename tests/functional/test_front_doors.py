"""The three front doors on one real 2-node site (needs root): a rollout and a rollback driven from Python
through imageupdate.api, events observed; then ``imageupdate rollout R2 --json`` and ``openstack imageupdate
rollout R2 --json`` on the same site (a rollback between them) give the same document, ids and times aside.

The releases come from the session's store (R1, R2, built with the real disk-image-create).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageupdate import api
from imageupdate.api import RolloutEvent, RolloutOptions
from tests.functional.conftest import imageupdate
from tests.functional.test_rollout import three_node_site
from tests.jsondocs import normalised

pytestmark = pytest.mark.functional

NODES = {"node0", "node1"}


@pytest.fixture
def site(releases: dict, store_dir: Path, tmp_path: Path) -> Iterator[Path]:  # type: ignore[type-arg]
    yield from three_node_site(tmp_path / "site", store_dir, nodes=2)


def runs(site: Path, store: Path) -> dict[str, str]:
    return {n.name: n.release for n in api.status(site=site, store=store).nodes}


def from_python(site: Path, store_dir: Path) -> None:
    """A rollout and a rollback through imageupdate.api, their events observed."""
    events: list[RolloutEvent] = []
    outcome = api.rollout("R2", RolloutOptions(probe=False), site=site, store=store_dir, on_event=events.append)
    assert outcome.ok and outcome.status == "succeeded", outcome.reason
    assert outcome.nodes == {"node0": "R2", "node1": "R2"} == runs(site, store_dir)
    assert {e.rollout for e in events} == {outcome.rollout.id}
    passed = [e.node for e in events if e.what == "passed"]
    assert sorted(passed) == sorted(NODES) and events[-1].what == "finished"
    doc = outcome.to_dict()
    assert doc["status"] == "succeeded" and doc["rollout"]["id"] == outcome.rollout.id
    assert api.report(outcome.rollout.id, site=site, store=store_dir).page.is_file()

    events.clear()
    back = api.rollback(site=site, store=store_dir, on_event=events.append)
    assert back.ok and back.rollout.kind == "rollback" and runs(site, store_dir) == {"node0": "R1", "node1": "R1"}
    assert sorted(e.node for e in events if e.what == "passed") == sorted(NODES)


def openstack(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}  # the local site: no cloud
    return subprocess.run([str(Path(sys.executable).parent / "openstack"), "imageupdate", *args],
                          capture_output=True, text=True, env=env, timeout=900, check=False)


def test_the_three_front_doors_on_one_site(site: Path, store_dir: Path) -> None:
    """One site for both parts (a site costs more than an operation on it): Python first, then the two
    command lines, with the rollback between them done from Python."""
    from_python(site, store_dir)
    where = ("--site", str(site), "--store", str(store_dir), "--json")
    mine = imageupdate("rollout", "R2", "--no-probe", *where)
    assert mine.returncode == 0, mine.stderr
    assert api.rollback(site=site, store=store_dir).ok
    theirs = openstack("rollout", "R2", "--no-probe", *where)
    assert theirs.returncode == 0, theirs.stderr
    a, b = json.loads(mine.stdout), json.loads(theirs.stdout)
    assert a["status"] == b["status"] == "succeeded" and a["rollout"]["id"] < b["rollout"]["id"]
    assert normalised(a) == normalised(b)
    # the same failure, the same document and exit code
    mine, theirs = imageupdate("rollout", "R9", *where), openstack("rollout", "R9", *where)
    assert mine.returncode == theirs.returncode == 2 and json.loads(mine.stdout) == json.loads(theirs.stdout)
