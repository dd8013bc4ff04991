"""The report from a real history file: which rollout, what it gathers, what the page shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageupdate.history.db import History
from imageupdate.report.data import UnknownRollout, collect
from imageupdate.report.html import render_page, write_page


def failed_rollout_with_rollback(h: History) -> tuple[int, int]:
    plan = {"batches": [["node0"], ["node1"]], "before": {"node0": "R1", "node1": "R1"},
            "after": {"node0": "R2", "node1": "R2"}}
    ro = h.start("rollout", "R2", {"batch_size": 1}, plan)
    h.step(ro.id, "node0", "rebuild", "succeeded", batch=0, from_release="R1", to_release="R2", started=100.0,
           finished=101.0, data={"phases": {"begun": 100.1, "stopped": 100.2, "switched": 100.25, "ready": 100.9}})
    h.step(ro.id, "node0", "gate", "failed", started=101.2, finished=102.5, reason="check test:20-data failed",
           data={"ok": False, "reason": "node0 on R2: check test:20-data failed: <corrupt> & gone",
                 "started": 101.3, "finished": 102.0})
    h.check(ro.id, "node0", "release", True, 0.01, "runs R2")
    h.check(ro.id, "node0", "test:20-data", False, 0.2, "wrote 1\n<corrupt> & gone")
    h.hook(ro.id, "survival", "create", None, True, 99.0, 0.1, "made id-1")
    h.probe(ro.id, {"node": "node0", "target": "http://n0:8080/health", "requests": 40, "failures": 3,
                    "downtime": 0.15, "outages": [[100.2, 100.35]]}, 99.5, 103.0)
    h.probe(ro.id, {"node": "node0", "target": "http://n0:8080/health", "requests": 10, "failures": 1,
                    "downtime": 0.05, "outages": [[104.0, 104.05]]}, 103.5, 105.0)  # a resumed watch
    h.finish(ro.id, "rolled-back", "node0 on R2: check test:20-data failed")
    rb = h.start("rollback", None, {}, {"batches": [["node0"]], "before": {"node0": "R2", "node1": "R1"},
                                        "after": {"node0": "R1", "node1": "R1"}}, parent=ro.id)
    h.step(rb.id, "node0", "rebuild", "succeeded", started=103.0, finished=103.5)
    h.step(rb.id, "node0", "gate", "succeeded", started=103.6, finished=104.0)
    h.check(rb.id, "node0", "release", True, 0.01, "runs R1")
    h.finish(rb.id, "succeeded")
    return ro.id, rb.id


def test_a_report_gathers_the_rollout_and_its_rollback(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    ro, rb = failed_rollout_with_rollback(h)
    doc = collect(h, None, site="/s")
    assert doc["rollout"]["id"] == ro  # the newest operation is the rollback: its rollout tells the story
    n0, n1 = doc["nodes"]
    assert n0["rebuild"]["phases"]["switched"] == 100.25 and n0["gate"]["status"] == "failed"
    assert n0["probe"]["downtime"] == 0.2 and n0["probe"]["requests"] == 50 and len(n0["probe"]["outages"]) == 2
    assert n1["rebuild"] is None and n1["checks"] == []
    assert doc["summary"]["failed_checks"] == [{"node": "node0", "name": "test:20-data",
                                                "output": "wrote 1\n<corrupt> & gone"}]
    assert doc["summary"]["downtime_total"] == 0.2
    assert doc["rollback"]["rollout"]["id"] == rb and doc["hooks"][0]["phase"] == "create"
    assert collect(h, rb)["rollout"]["id"] == rb and collect(h, rb)["rollback"] is None


def test_the_page_shows_the_failing_check_escaped(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    failed_rollout_with_rollback(h)
    page = render_page(collect(h, None))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert '<li class="failed-check"><b>node0</b>: test:20-data: &lt;corrupt&gt; &amp; gone</li>' in page
    assert "<corrupt>" not in page
    assert 'class="seg stop"' in page and 'class="seg boot"' in page and 'class="seg down"' in page
    assert "Rollback: rollback 2" in page
    path = write_page(tmp_path / "out" / "r.html", page)
    assert path.read_text() == page and [p.name for p in path.parent.iterdir()] == ["r.html"]


def test_unknown_rollouts_are_bad_input(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    with pytest.raises(UnknownRollout, match="no rollout in .* yet"):
        collect(h, None)
    failed_rollout_with_rollback(h)
    with pytest.raises(UnknownRollout) as exc:
        collect(h, 42)
    assert "no rollout 42 in" in str(exc.value) and "the newest is 2" in str(exc.value)
    assert exc.value.exit_code == 2


def test_state_migrations_are_shown_with_their_own_timeline_segment(tmp_path: Path) -> None:
    h = History(tmp_path / "history.sqlite")
    ro, rb = failed_rollout_with_rollback(h)
    h.step(ro, "node1", "rebuild", "failed", started=110.0, finished=111.0,
           data={"phases": {"begun": 110.0, "stopped": 110.1, "migrated": 110.6, "switched": 110.6,
                            "ready": 110.9}})
    h.migration(ro, "node1", "snapshot", 110.1, state_version=1, ok=True, seconds=0.05)
    h.migration(ro, "node1", "migration", 110.2, release="R2", migration="0002-<x>", kind="contract",
                state_version=2, ok=False, seconds=0.3, output="cannot convert <kv>")
    assert not h.migration(ro, "node1", "snapshot", 110.1, state_version=1, ok=True)  # recorded once
    h.migration(rb, "node1", "restore", 112.0, state_version=1, ok=True, seconds=0.1)
    doc = collect(h, ro)
    assert [(m["phase"], m["ok"]) for m in doc["migrations"]] == [("snapshot", True), ("migration", False)]
    assert [m["phase"] for m in doc["rollback"]["migrations"]] == ["restore"]
    page = render_page(doc)
    assert 'class="seg migrate"' in page and "0002-&lt;x&gt;" in page and "cannot convert &lt;kv&gt;" in page
    assert "<h3>State migrations</h3>" in page
