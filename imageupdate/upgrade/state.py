"""The state version, kept with the state: ``imageupdate/state.json`` on the node's state partition.

It records the version the state is at and a journal of every migration step (started, finished, ok)
and every snapshot restore, so a step knows where it starts, a resumed run skips what is done, and a
node refuses to start code that cannot run on its state. Written atomically (write, fsync, rename),
read and written inside the state tree only (``imageupdate.base.confined``: the node controls that tree).
A state without the file is at the version of the release that seeded it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageupdate.base import confined
from imageupdate.images.upgrade_meta import ReleaseMeta

STATE_FILE = "imageupdate/state.json"


@dataclass
class StepRecord:
    release: str
    migration: str
    state_version: int
    kind: str
    started: float
    finished: float | None = None
    ok: bool | None = None
    output: str = ""


@dataclass
class StateRecord:
    version: int | None = None
    steps: list[StepRecord] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # restores, seeds: what happened to the state

    def done(self, release: str, migration: str) -> bool:
        return any(s.release == release and s.migration == migration and s.ok for s in self.steps)

    def interrupted(self) -> list[StepRecord]:
        return [s for s in self.steps if s.finished is None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read(state_dir: Path) -> StateRecord:
    """The record on a node's state partition (a node controls that tree: read inside it, bounded)."""
    try:
        return loads(confined.read_text(state_dir, STATE_FILE))
    except FileNotFoundError:
        return StateRecord()


MAX_VERSION = 1_000_000  # a state version beyond it is a corrupt record, not a plan


def _version(v: Any, what: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_VERSION:
        return v
    raise ValueError(f"{what} is out of range (0 to {MAX_VERSION}): {v!r}"[:200])


def _number(v: Any, what: str, optional: bool = False) -> Any:
    if (v is None and optional) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return v
    raise ValueError(f"{what} is not a number: {v!r}"[:200])


def _step(s: Any) -> StepRecord:
    if not isinstance(s, dict):
        raise ValueError(f"a step is not an object: {s!r}"[:200])
    v = _version(s.get("state_version"), "a step's state_version")
    ok = s.get("ok")
    text = {k: s.get(k, "") for k in ("release", "migration", "kind", "output")}
    if not all(isinstance(x, str) for x in text.values()) or ok not in (None, True, False):
        raise ValueError(f"a step is shaped oddly: {s!r}"[:200])
    return StepRecord(text["release"], text["migration"], v, text["kind"], _number(s.get("started"), "started"),
                      _number(s.get("finished"), "finished", optional=True), ok, text["output"])


def loads(text: str) -> StateRecord:
    """A state record from its JSON (as read on the host, over SSH, or in a node's facts): hostile input,
    so any shape but the journal's own is a ValueError."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the state record is not an object")
    version = data.get("version")
    if version is not None:
        _version(version, "the state version")
    steps, events = data.get("steps", []), data.get("events", [])
    if not isinstance(steps, list) or not isinstance(events, list) or \
            not all(isinstance(e, dict) for e in events):
        raise ValueError("the state record's steps or events are not lists of objects")
    return StateRecord(version, [_step(s) for s in steps], list(events))


def write(state_dir: Path, record: StateRecord) -> None:
    confined.write_bytes(state_dir, STATE_FILE, (json.dumps(record.to_dict(), indent=1) + "\n").encode())


def seed(state_dir: Path, meta: ReleaseMeta | None, release: str) -> None:
    """A new node's state starts at its release's state version."""
    if meta is None or confined.is_file(state_dir, STATE_FILE):
        return
    write(state_dir, StateRecord(meta.state_version, [],
                                 [{"at": time.time(), "event": "seeded", "release": release,
                                   "version": meta.state_version}]))


def event(state_dir: Path, what: str, **data: Any) -> None:
    rec = read(state_dir)
    rec.events.append({"at": time.time(), "event": what, **data})
    write(state_dir, rec)


def contract_after(record: StateRecord, version: int) -> StepRecord | None:
    """The first contract step beyond ``version`` that ran or began on this state (None: only expand)."""
    for s in record.steps:
        if s.state_version > version and s.kind == "contract":
            return s
    return None


def incompatible(record: StateRecord, release: str, meta: ReleaseMeta | None) -> str | None:
    """Why ``release``'s code must not run on this state (None: it may)."""
    if meta is None or record.version is None:
        return None
    if record.interrupted():
        s = record.interrupted()[0]
        return (f"migration {s.migration} of {s.release} was interrupted on this state; finish it with "
                f"'imageupdate resume' (or roll back, which restores the snapshot)")
    if record.version < meta.state_version:
        return (f"the state is at version {record.version} and {release} needs {meta.state_version}: "
                f"its migrations have not run")
    step = contract_after(record, meta.state_version)
    if step is not None:
        return (f"the state is at version {record.version}: contract migration {step.migration} of "
                f"{step.release} ran on it and {release}'s code (state version {meta.state_version}) cannot "
                f"work on it; rolling back restores the snapshot taken before it")
    return None
