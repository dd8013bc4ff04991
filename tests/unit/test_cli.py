"""The CLI's contract: exit codes, one-line errors, --json, nothing written on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imageupdate.cli.main import main
from imageupdate.images.manifest import ROOT_IMAGE
from imageupdate.images.publishing import STAGING
from imageupdate.images.store import ImageStore


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _nothing_written(store: ImageStore) -> bool:
    staging = store.root / STAGING
    return store.releases() == [] and (not staging.exists() or not any(staging.iterdir()))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["build", "../evil"], "release id '../evil' is not allowed"),
        (["build", "R1", "-e", "no-such-element"], "unknown element 'no-such-element'"),
        (["build", "R1", "--elements-path", "/nonexistent-dir"], "elements path /nonexistent-dir does not exist"),
        (["build", "R1", "--os", "nope-os"], "unknown element 'nope-os'"),
        (["images", "show", "R9"], "release 'R9' is not in the store"),
        (["images", "diff", "R1", "R9"], "is not in the store"),
        (["images", "delete", "R9"], "is not in the store"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    capsys: pytest.CaptureFixture[str], store: ImageStore, args: list[str], needle: str
) -> None:
    rc, _out, err = run(capsys, *args, "--store", str(store.root))
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("imageupdate: error: ")
    assert _nothing_written(store)


def test_existing_release_is_refused_without_force(
    capsys: pytest.CaptureFixture[str], store: ImageStore, publish  # type: ignore[no-untyped-def]
) -> None:
    publish("R1")
    before = (store.path("R1") / ROOT_IMAGE).read_bytes()
    rc, _, err = run(capsys, "build", "R1", "-e", "sample-workload-v1", "--store", str(store.root))
    assert rc == 2 and "already exists" in err and "--force" in err
    assert (store.path("R1") / ROOT_IMAGE).read_bytes() == before


def test_store_not_writable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    rc, _, err = run(capsys, "build", "R1", "--store", str(tmp_path / "file" / "store"))
    assert rc == 2 and "is not writable" in err


def test_missing_host_dependency(
    capsys: pytest.CaptureFixture[str], store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing but the venv's own scripts
    rc, _, err = run(capsys, "build", "R1", "--store", str(store.root))
    assert rc == 2
    assert "missing host dependency" in err and "apt-get install" in err
    assert _nothing_written(store)


def test_json_error_document(capsys: pytest.CaptureFixture[str], store: ImageStore) -> None:
    rc, out, _ = run(capsys, "images", "show", "R9", "--json", "--store", str(store.root))
    doc = json.loads(out)
    assert rc == 2 and doc["error"] == "ReleaseNotFound" and doc["release"] == "R9" and doc["exit_code"] == 2


def test_list_show_diff_json(capsys: pytest.CaptureFixture[str], store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    publish("R2", extra={"./usr/lib/app/server.py": b"print('v2')\n"})
    rc, out, _ = run(capsys, "--json", "images", "list", "--store", str(store.root))
    assert rc == 0 and [r["release"] for r in json.loads(out)["releases"]] == ["R1", "R2"]
    rc, out, _ = run(capsys, "images", "show", "R2", "--json", "--store", str(store.root))
    assert rc == 0 and json.loads(out)["release"] == "R2"
    rc, out, _ = run(capsys, "images", "diff", "R1", "R2", "--json", "--store", str(store.root))
    doc = json.loads(out)
    changed = [p for g in doc["files"] for p in g["changed"]]
    assert rc == 0 and doc["action"] == "restart"
    assert sorted(changed) == ["etc/imageupdate/release.json", "usr/lib/app/server.py"]
    rc, out, _ = run(capsys, "images", "diff", "R1", "R2", "--store", str(store.root))
    assert rc == 0 and "after the swap a node needs: restart" in out


def test_verify_exit_codes(capsys: pytest.CaptureFixture[str], store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    rc, out, _ = run(capsys, "images", "verify", "R1", "--store", str(store.root))
    assert rc == 0 and "R1: ok" in out
    (store.path("R1") / ROOT_IMAGE).write_bytes(b"corrupt")
    rc, out, err = run(capsys, "images", "verify", "R1", "--json", "--store", str(store.root))
    assert rc == 1 and json.loads(out)["ok"] is False and "failed verification" in err


def test_delete(capsys: pytest.CaptureFixture[str], store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    rc, _, _ = run(capsys, "images", "delete", "R1", "--store", str(store.root))
    assert rc == 0 and store.releases() == []


def test_an_interrupted_command_still_prints_its_json_document(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               store: ImageStore) -> None:
    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt  # what SIGTERM becomes in main()

    monkeypatch.setattr(ImageStore, "releases", interrupted)
    rc, out, err = run(capsys, "images", "list", "--store", str(store.root), "--json")
    doc = json.loads(out)
    assert rc == 130 and doc["error"] == "Interrupted" and doc["exit_code"] == 130  # not 1: not a failure
    assert err.startswith("imageupdate: error: interrupted") and err.count("\n") == 1
