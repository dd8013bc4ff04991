"""A build's output in a CI log: a wait for the DIB cache lock is said in plain lines naming the holder and
the release, measured apart from the build; every progress line names its release."""
from __future__ import annotations

import io
import os
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from imageupdate.base import locks
from imageupdate.build import builder
from imageupdate.build.builder import BuildEvent, BuildResult
from imageupdate.commands.output import Progress


def test_a_wait_for_the_dib_cache_lock_is_said_and_measured(tmp_path: Path) -> None:
    held, release = threading.Event(), threading.Event()

    def other_build() -> None:
        with locks.held(tmp_path / ".lock", record_pid=True):
            held.set()
            release.wait(10)

    t = threading.Thread(target=other_build)
    t.start()
    held.wait(10)
    threading.Timer(0.7, release.set).start()
    events: list[BuildEvent] = []
    with builder._cache_lock(tmp_path, events.append) as waited:
        assert locks.recorded_pid(tmp_path / ".lock") == os.getpid()  # now ours, for the next one to name
    t.join()
    assert [e.stage for e in events] == ["wait", "wait"]
    assert events[0].detail.startswith(f"waiting for the DIB cache lock held by another build (pid {os.getpid()})")
    assert events[1].detail.startswith("got the DIB cache lock after ")
    assert waited.seconds >= 0.5


def test_no_wait_no_line(tmp_path: Path) -> None:
    events: list[BuildEvent] = []
    with builder._cache_lock(tmp_path, events.append) as waited:
        pass
    assert events == [] and waited.seconds == 0.0


def test_progress_lines_name_their_release_in_a_log() -> None:
    text = io.StringIO()
    progress = Progress(Console(file=text, force_terminal=False, width=200), None, label="R2")
    progress.say("waiting for the DIB cache lock held by another build (pid 42)")
    progress.update("dib", "10-foo")
    progress.update("dib", "20-bar")  # the same heading: no new line in a log
    progress.update("pack", "writing")
    lines = text.getvalue().splitlines()
    assert len(lines) == 3 and all("] R2: " in line for line in lines), lines
    assert lines[0].endswith("R2: waiting for the DIB cache lock held by another build (pid 42)")


def test_the_build_result_reports_the_wait_apart(tmp_path: Path) -> None:
    manifest: Any = type("M", (), {"to_dict": lambda self: {"release": "R2"}})()
    r = BuildResult("R2", tmp_path, manifest, 80.0, 70.0, 5.0, tmp_path / "log", lock_wait_seconds=12.345)
    doc = r.to_dict()
    assert doc["seconds"] == 80.0 and doc["lock_wait_seconds"] == 12.35 and doc["manifest"] == {"release": "R2"}


class _Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    def staging(self, release: str) -> Any:
        return nullcontext(self.root / "stage")


def test_every_build_event_carries_its_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = builder.Builder(_Store(tmp_path))  # type: ignore[arg-type]
    monkeypatch.setattr(b, "check", lambda request: None)
    monkeypatch.setattr(builder.cache, "default_cache", lambda: tmp_path / "cache")

    def build_in(*args: Any) -> Any:
        args[-1](BuildEvent("dib", "10-foo"))  # notify, as the build's steps call it
        raise RuntimeError("stop here")

    monkeypatch.setattr(b, "_build_in", build_in)
    seen: list[BuildEvent] = []
    with pytest.raises(RuntimeError):
        b.build(builder.BuildRequest("R7"), seen.append)
    assert [(e.stage, e.release) for e in seen] == [("dib", "R7")]
