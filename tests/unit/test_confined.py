"""Host-side access to a node-controlled tree: links a node planted are refused, never followed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageupdate.base import confined
from imageupdate.base.confined import Escape
from imageupdate.base.errors import OperationError
from imageupdate.upgrade import state


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A state partition beside a host directory holding a secret."""
    (tmp_path / "host").mkdir()
    (tmp_path / "host/shadow").write_text("[db]\npassword = hunter2\n")
    root = tmp_path / "state"
    (root / "app").mkdir(parents=True)
    (root / "app/app.conf").write_text("[main]\nport = 8080\n")
    return root


def test_a_file_inside_is_read(tree: Path) -> None:
    assert confined.read_text(tree, "app/app.conf") == "[main]\nport = 8080\n"
    assert confined.read_text(tree, "./app//app.conf").startswith("[main]")
    assert confined.is_file(tree, "app/app.conf")


def test_a_missing_file_is_file_not_found(tree: Path) -> None:
    with pytest.raises(FileNotFoundError):
        confined.read_text(tree, "app/nope.conf")
    with pytest.raises(FileNotFoundError):
        confined.read_text(tree, "nope/app.conf")


def test_a_planted_file_link_is_refused(tree: Path) -> None:
    """Seen: root on a node replaced its config by a link to a host file; check-config printed that file."""
    (tree / "app/app.conf").unlink()
    (tree / "app/app.conf").symlink_to(tree.parent / "host/shadow")
    with pytest.raises(Escape, match="is a symlink"):
        confined.read_text(tree, "app/app.conf")
    assert not confined.is_file(tree, "app/app.conf")


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_a_planted_directory_link_is_refused(tree: Path, link: str) -> None:
    target = tree.parent / "host" if link == "absolute" else Path("../host")
    os.symlink(target, tree / "etc")
    with pytest.raises(Escape, match="etc is a symlink"):
        confined.read_text(tree, "etc/shadow")


@pytest.mark.parametrize("rel, said", [("../host/shadow", "climbs out"), ("/etc/passwd", "absolute"),
                                       ("app/../../host/shadow", "climbs out"), ("", "names the tree")])
def test_paths_that_climb_out_are_refused_before_any_lookup(tree: Path, rel: str, said: str) -> None:
    with pytest.raises(Escape, match=said):
        confined.read_text(tree, rel)


def test_a_fifo_does_not_hang_the_host(tree: Path) -> None:
    os.mkfifo(tree / "app/pipe")
    with pytest.raises(Escape, match="not a regular file"):
        confined.read_text(tree, "app/pipe")


def test_reads_are_bounded(tree: Path) -> None:
    (tree / "app/big").write_bytes(b"x" * 2048)
    with pytest.raises(OperationError, match="larger than 1024 bytes"):
        confined.read_bytes(tree, "app/big", limit=1024)


def test_a_write_replaces_a_planted_link_instead_of_writing_through_it(tree: Path) -> None:
    (tree / "app/app.conf").unlink()
    (tree / "app/app.conf").symlink_to(tree.parent / "host/shadow")
    confined.write_bytes(tree, "app/app.conf", b"new\n")
    assert (tree.parent / "host/shadow").read_text().startswith("[db]")
    assert not (tree / "app/app.conf").is_symlink() and (tree / "app/app.conf").read_text() == "new\n"
    assert sorted(p.name for p in (tree / "app").iterdir()) == ["app.conf"]  # no temporary left


def test_a_write_below_a_planted_directory_link_is_refused(tree: Path) -> None:
    os.symlink(tree.parent / "host", tree / "imageupdate")
    with pytest.raises(Escape):
        confined.write_bytes(tree, "imageupdate/state.json", b"{}")
    assert sorted(p.name for p in (tree.parent / "host").iterdir()) == ["shadow"]


def test_a_write_makes_missing_directories_private(tree: Path) -> None:
    confined.write_bytes(tree, "imageupdate/state.json", b"{}\n")
    assert (tree / "imageupdate/state.json").read_text() == "{}\n"
    assert (tree / "imageupdate").stat().st_mode & 0o777 == 0o700
    assert (tree / "imageupdate/state.json").stat().st_mode & 0o777 == 0o600


def test_the_state_journal_is_read_and_written_inside_the_tree(tree: Path) -> None:
    state.write(tree, state.StateRecord(3, [], []))
    assert state.read(tree).version == 3
    os.replace(tree / "imageupdate", tree / "elsewhere")
    os.symlink(tree.parent / "host", tree / "imageupdate")
    with pytest.raises(Escape):
        state.read(tree)
    with pytest.raises(Escape):
        state.event(tree, "snapshot")
    assert sorted(p.name for p in (tree.parent / "host").iterdir()) == ["shadow"]
