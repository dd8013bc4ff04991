"""A booted machine's own migrations (node-migrate, shipped by imageupdate-node, run by vm-init before the
services): the host migrator's rules and journal, on a state directory and a release tree made here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imageupdate.upgrade import state as host_state
from tests.scripts import load_script

nm = load_script("imageupdate-node/static/usr/lib/imageupdate/node-migrate", "node_migrate")


def release(tmp_path: Path, name: str, version: int, *steps: tuple[str, int, str, str]) -> Path:
    """A release tree: its stamp, upgrade.json and migrations (each a shell script run on $IMAGEUPDATE_STATE)."""
    root = tmp_path / f"root-{name}"
    if root.exists():
        return root
    (root / "etc/imageupdate").mkdir(parents=True)
    (root / "etc/imageupdate/release.json").write_text(json.dumps({"release": name}))
    (root / nm.MIGRATIONS).mkdir(parents=True)
    for mig, _sv, _kind, body in steps:
        script = root / nm.MIGRATIONS / mig
        script.write_text(f"#!/bin/sh\nset -e\ncd \"$IMAGEUPDATE_STATE\"\n{body}\n")
        script.chmod(0o755)
    (root / nm.UPGRADE).write_text(json.dumps({"state_version": version, "migrations": [
        {"name": m, "state_version": sv, "kind": k} for m, sv, k, _ in steps]}))
    return root


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "state"
    (s / "data").mkdir(parents=True)
    (s / "data/kv.json").write_text('{"owner": "me"}')
    return s


def journal(state: Path) -> host_state.StateRecord:
    return host_state.read(state)  # the host's own parser: the journal is the contract with the orchestrator


V1 = ("r1", 1)
TO_SQL = ("0002-to-sql", 2, "contract", 'mv data/kv.json data/kv.old && echo sql > data/kv.db && rm data/kv.old')


def test_a_new_state_is_seeded_at_the_release_version(tmp_path: Path, state: Path) -> None:
    assert nm.migrate(release(tmp_path, *V1), state) == "seeded the state at version 1"
    rec = journal(state)
    assert rec.version == 1 and rec.events[0]["event"] == "seeded"
    assert nm.migrate(release(tmp_path, "r1b", 1), state) == "the state is at version 1: nothing to do"


def test_forward_takes_a_snapshot_then_runs_the_steps_journalled(tmp_path: Path, state: Path) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    said = nm.migrate(release(tmp_path, "r2", 2, TO_SQL), state)
    assert said == "migrated the state from version 1 to 2"
    assert (state / "data/kv.db").read_text() == "sql\n" and not (state / "data/kv.json").exists()
    rec = journal(state)
    assert rec.version == 2 and [(s.migration, s.ok) for s in rec.steps] == [("0002-to-sql", True)]
    snap = [e for e in rec.events if e["event"] == "snapshot"]
    assert snap and snap[0]["version"] == 1 and (state / nm.SNAPSHOTS / "v1.tar").is_file()
    assert {"seconds", "verify_seconds"} <= set(snap[0])  # what the orchestrator records


def test_a_failed_step_blocks_and_the_state_stays_at_its_last_version(tmp_path: Path, state: Path) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    bad = release(tmp_path, "r2", 2, ("0002-bad", 2, "contract", "echo half way >&2; exit 3"))
    blocked = tmp_path / "run/blocked"
    assert nm.main(["node-migrate", str(bad), str(state), str(blocked)]) == 1
    assert blocked.read_text() == ("migration 0002-bad of r2 (contract) failed: half way; the state stays at "
                                   "version 1\n")
    rec = journal(state)
    assert rec.version == 1 and rec.steps[0].ok is False and "half way" in rec.steps[0].output
    assert host_state.incompatible(rec, "r2", None) is None  # (the host holds it to r2's meta in its gate)


def test_an_interrupted_step_runs_again_without_a_second_snapshot(tmp_path: Path, state: Path) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    j = nm.Journal(state)
    j.load()
    j.data["steps"].append({"release": "r2", "migration": "0002-to-sql", "state_version": 2, "kind": "contract",
                            "started": 5.0, "finished": None, "ok": None, "output": ""})
    j.save()
    assert nm.migrate(release(tmp_path, "r2", 2, TO_SQL), state) == "migrated the state from version 1 to 2"
    rec = journal(state)
    assert not rec.interrupted() and rec.version == 2
    assert not [e for e in rec.events if e["event"] == "snapshot"] and not (state / nm.SNAPSHOTS).exists()


def test_back_after_expand_only_the_state_is_kept(tmp_path: Path, state: Path) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    nm.migrate(release(tmp_path, "r2", 2, ("0002-add", 2, "expand", "echo new > data/col")), state)
    said = nm.migrate(release(tmp_path, *V1), state)
    assert said.startswith("kept the state at version 2") and (state / "data/col").exists()


def test_back_after_a_contract_step_restores_the_snapshot(tmp_path: Path, state: Path) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    nm.migrate(release(tmp_path, "r2", 2, TO_SQL), state)
    (state / "data/written-on-r2").write_text("lost")
    said = nm.migrate(release(tmp_path, *V1), state)
    assert said == "restored the snapshot at version 1 because contract migration 0002-to-sql of r2 ran"
    assert (state / "data/kv.json").read_text() == '{"owner": "me"}'
    assert not (state / "data/kv.db").exists() and not (state / "data/written-on-r2").exists()
    rec = journal(state)
    assert rec.version == 1 and rec.events[-1]["event"] == "restored" and rec.events[-1]["version"] == 1
    assert (state / nm.SNAPSHOTS / "v1.tar").is_file()  # kept: the way back stays open


def test_a_restore_cut_short_is_finished_at_the_next_boot(tmp_path: Path, state: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    nm.migrate(release(tmp_path, "r2", 2, TO_SQL), state)
    real_run = nm.subprocess.run

    def dies_at_extract(args: list[str], **kw: object) -> object:
        if args[0] == "tar" and "-xpf" in args:
            raise KeyboardInterrupt  # the power goes after the old state was removed
        return real_run(args, **kw)

    monkeypatch.setattr(nm.subprocess, "run", dies_at_extract)
    with pytest.raises(KeyboardInterrupt):
        nm.migrate(release(tmp_path, *V1), state)
    monkeypatch.setattr(nm.subprocess, "run", real_run)
    assert (state / nm.RESTORING).is_file() and not (state / "data").exists()
    nm.migrate(release(tmp_path, *V1), state)
    assert (state / "data/kv.json").read_text() == '{"owner": "me"}' and not (state / nm.RESTORING).exists()
    assert journal(state).version == 1


def test_no_snapshot_to_go_back_to_blocks(tmp_path: Path, state: Path) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    nm.migrate(release(tmp_path, "r2", 2, TO_SQL), state)
    for p in (state / nm.SNAPSHOTS).iterdir():
        p.unlink()
    with pytest.raises(nm.Blocked, match="holds no snapshot at version 1 or below"):
        nm.migrate(release(tmp_path, *V1), state)


def test_a_skip_level_path_is_refused_here(tmp_path: Path, state: Path) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    r3 = release(tmp_path, "r3", 3, ("0003-add", 3, "expand", "true"))
    with pytest.raises(nm.Blocked, match="carries no migration to version 2: roll out the releases in between"):
        nm.migrate(r3, state)
    assert journal(state).version == 1 and not (state / nm.SNAPSHOTS).exists()  # refused before anything


@pytest.mark.parametrize("upgrade", ['{"state_version": "2", "migrations": []}',
                                     '{"state_version": 2, "migrations": [{"name": "../../bin/sh", '
                                     '"state_version": 2, "kind": "expand"}]}', "[1]"])
def test_metadata_the_runner_cannot_trust_blocks(tmp_path: Path, state: Path, upgrade: str) -> None:
    root = release(tmp_path, *V1)
    (root / nm.UPGRADE).write_text(upgrade)
    with pytest.raises(nm.Blocked):
        nm.migrate(root, state)


@pytest.mark.parametrize("journal_text", ['{"version": -100000000000, "steps": []}',
                                          '{"version": 1, "steps": [], "events": null}',
                                          '{"version": 2, "steps": [{"state_version": "2", "finished": null}]}'])
def test_a_journal_shaped_oddly_blocks_the_services_it_never_crashes_past_them(tmp_path: Path, state: Path,
                                                                               journal_text: str) -> None:
    """Whatever the state disk holds, node-migrate ends in 'migrated' or 'blocked': an exception escaping it
    would let vm-init start every service on a state nobody migrated."""
    (state / nm.STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    (state / nm.STATE_FILE).write_text(journal_text)
    blocked = tmp_path / "run/blocked"
    assert nm.main(["node-migrate", str(release(tmp_path, "r2", 2, TO_SQL)), str(state), str(blocked)]) == 1
    assert blocked.read_text().strip()


def test_a_restore_marker_naming_a_path_outside_the_snapshots_blocks(tmp_path: Path, state: Path) -> None:
    nm.migrate(release(tmp_path, *V1), state)
    outside = tmp_path / "x.tar"
    outside.write_bytes(b"")
    (state / nm.RESTORING).write_text("../../x.tar")
    with pytest.raises(nm.Blocked, match="snapshot '../../x.tar' is gone"):
        nm.migrate(release(tmp_path, *V1), state)
    assert (state / "data/kv.json").read_text() == '{"owner": "me"}'  # nothing emptied
