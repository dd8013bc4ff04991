"""A store is input like any other: damaged manifests and file indexes give one line, exit 1, and never
break the other releases (trust boundary: what was seen, point 4)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imageupdate.cli.main import main
from imageupdate.images.manifest import FILE_INDEX, MANIFEST
from imageupdate.images.store import ImageStore


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _edit(store: ImageStore, release: str, change: Any) -> None:
    path = store.path(release) / MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


DAMAGE = {
    "truncated": lambda p: p.write_text(p.read_text()[:100]),
    "not an object": lambda p: p.write_text("[1, 2]"),
    "built_at null": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "built_at": None})),
    "packages a list": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "packages": []})),
    "services without names": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "services": [{}]})),
    "bad artifact digest": lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "artifacts": {"root.tar.zst": {"sha256": "x", "size": 1, "format": "t"}}})),
    "boot not a map of strings": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "boot": {"x": 1}})),
    "another release's": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "release": "R1"})),
    "deeply nested": lambda p: p.write_text("[" * 100000 + "]" * 100000),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_manifest_is_one_line_and_breaks_no_other_release(
        how: str, store: ImageStore, publish: Any, capsys: pytest.CaptureFixture[str]) -> None:
    publish("R1")
    publish("R2")
    DAMAGE[how](store.path("R2") / MANIFEST)
    root = ["--store", str(store.root)]
    rc, out, err = run(capsys, "images", "list", *root, "--json")
    assert rc == 0, err
    listed = json.loads(out)
    assert [r["release"] for r in listed["releases"]] == ["R1"]
    assert [d["release"] for d in listed["damaged"]] == ["R2"]
    for argv in (["images", "show", "R2"], ["images", "verify", "R2"], ["images", "diff", "R1", "R2"]):
        rc, out, err = run(capsys, *argv, *root)
        assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "R2" in err and ("manifest" in err or "release" in err), err
    rc, out, err = run(capsys, "images", "show", "R1", *root)
    assert rc == 0, err


def test_a_garbage_file_index_fails_verify_and_diff(store: ImageStore, publish: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    publish("R1")
    publish("R2")
    (store.path("R2") / FILE_INDEX).write_text('{"path": 1}\nnot json\n')
    root = ["--store", str(store.root)]
    result = store.verify("R2")
    assert not result.ok and any(FILE_INDEX in p and "line 1" in p for p in result.problems)
    rc, out, err = run(capsys, "images", "diff", "R1", "R2", *root)
    assert rc == 1 and "files.jsonl of release 'R2' is unreadable" in err and "Traceback" not in err


def test_manifest_checks_name_the_field(store: ImageStore, publish: Any) -> None:
    publish("R1")
    _edit(store, "R1", lambda d: d.update(build_seconds="fast"))
    with pytest.raises(Exception, match="field 'build_seconds' is not a number of seconds"):
        store.manifest("R1")
    _edit(store, "R1", lambda d: (d.update(build_seconds=1.0), d.pop("elements")))
    with pytest.raises(Exception, match="field 'elements' is missing"):
        store.manifest("R1")


def test_a_store_listing_survives_an_unreadable_manifest_file(store: ImageStore, publish: Any,
                                                              tmp_path: Path) -> None:
    publish("R1")
    publish("R2")
    (store.path("R2") / MANIFEST).write_bytes(b"\xff\xfe garbage")
    assert store.releases() == ["R1"] and list(store.damaged()) == ["R2"]


def test_a_store_that_cannot_be_written_refuses_delete_in_one_line(store: ImageStore, publish: Any,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Seen: 'images delete' on a read-only store gave a traceback. (A file where the store's staging
    directory goes fails even for root, as a read-only store does for anyone else.)"""
    import shutil

    from imageupdate.images.publishing import STAGING
    publish("R1")
    shutil.rmtree(store.root / STAGING, ignore_errors=True)
    (store.root / STAGING).write_text("")
    rc, out, err = run(capsys, "images", "delete", "R1", "--store", str(store.root))
    assert rc == 2 and "is not writable" in err and "Traceback" not in err, err
    assert store.releases() == ["R1"]


@pytest.mark.parametrize("text, said", [("clouds: [1, 2\n", "does not parse at line 2"),
                                        ("clouds:\n  x: [1]\n", "cloud 'x' is a list"),
                                        ("- 1\n", "no 'clouds:' mapping")])
def test_a_malformed_clouds_yaml_is_one_line_naming_it(text: str, said: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "clouds.yaml").write_text(text)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "status", "--cloud", "x", "--site", str(tmp_path / "site"))
    assert rc == 2 and said in err and str(tmp_path / "clouds.yaml") in err and "Traceback" not in err, err
