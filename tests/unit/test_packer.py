from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from imageupdate.images import packer
from imageupdate.images.fileindex import read_index
from imageupdate.images.services import InvalidServiceDeclaration
from tests.fakeroot_tar import make_root_tar

EPOCH = 1_700_000_000


def _members(zst: Path) -> list[tarfile.TarInfo]:
    raw = subprocess.run(["zstd", "-dc", str(zst)], capture_output=True, check=True).stdout
    tar = zst.with_suffix("")
    tar.write_bytes(raw)
    with tarfile.open(tar) as tf:
        return tf.getmembers()


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, packer.TreeFacts]:
    raw = make_root_tar(tmp_path / "dib.tar", kernel="6.1.0-28-amd64")
    out = tmp_path / "out"
    out.mkdir()
    return out, packer.pack(raw, out, EPOCH)


def test_members_sorted_clamped_and_root_dirs_added(packed: tuple[Path, packer.TreeFacts]) -> None:
    out, _ = packed
    members = _members(out / "root.tar.zst")
    names = [m.name for m in members]
    assert names[0] == "."
    body = [n for n in names if n not in packer.ROOT_DIRS and n != "."]
    assert body == sorted(body)
    assert all(m.mtime <= EPOCH for m in members)
    assert all(m.uname == "" and m.gname == "" for m in members)
    for d in packer.ROOT_DIRS:
        assert d in names
    assert not [n for n in names if n.startswith("dev/")], "device nodes belong to the node, not the image"


def test_hardlinks_point_to_an_earlier_member(packed: tuple[Path, packer.TreeFacts], tmp_path: Path) -> None:
    out, _ = packed
    members = _members(out / "root.tar.zst")
    seen: set[str] = set()
    for m in members:
        if m.islnk():
            assert m.linkname in seen, f"{m.name} links to {m.linkname} which comes later"
        seen.add(m.name)
    dest = tmp_path / "extract"
    with tarfile.open(out / "root.tar") as tf:
        tf.extractall(dest, filter="fully_trusted")
    a = dest / "usr/bin/a-hardlink"
    assert a.read_bytes() == b"\x7fELF python"
    assert a.stat().st_ino == (dest / "usr/bin/python3.11").stat().st_ino
    assert a.stat().st_ino == (dest / "usr/bin/z-hardlink").stat().st_ino


def test_facts_read_from_the_tree(packed: tuple[Path, packer.TreeFacts]) -> None:
    _, facts = packed
    assert facts.release_stamp == {"release": "R1"}
    assert set(facts.packages) == {"base-files", "python3"}  # config-files only is not installed
    assert facts.packages["python3"] == {"version": "3.11.2-1+b1", "arch": "amd64"}
    assert facts.state_paths == ["/var/log", "/var/lib/app"]
    assert [s["name"] for s in facts.services] == ["app"]
    assert facts.tests[0]["name"] == "10-health" and facts.tests[0]["executable"] is True
    assert facts.tests[0]["sha256"] == hashlib.sha256(b"#!/bin/sh\nexit 0\n").hexdigest()
    assert facts.kernel == "6.1.0-28-amd64"


def test_file_index_hashes_and_owners(packed: tuple[Path, packer.TreeFacts]) -> None:
    out, _ = packed
    index = read_index(out / "files.jsonl")
    py = index["usr/bin/python3.11"]
    assert py.sha256 == hashlib.sha256(b"\x7fELF python").hexdigest()
    assert py.package == "python3"
    assert index["etc/os-release"].package == "base-files"
    assert index["usr/bin/python3"].type == "symlink" and index["usr/bin/python3"].link == "python3.11"
    assert index["usr/bin/a-hardlink"].type == "file"  # sorts first, carries the data
    assert index["usr/bin/python3.11"].type == "hardlink"
    assert index["usr/bin/python3.11"].link == "usr/bin/a-hardlink"
    assert "." not in index


def test_same_content_packs_to_identical_bytes(tmp_path: Path) -> None:
    """Member order and build dates of DIB's tar do not leak into the image."""
    outs = []
    for i, (reverse, mtime) in enumerate(((False, 1_800_000_000), (True, 1_900_000_000))):
        raw = make_root_tar(tmp_path / f"dib{i}.tar", reverse=reverse, mtime=mtime)
        out = tmp_path / f"out{i}"
        out.mkdir()
        packer.pack(raw, out, EPOCH)
        outs.append(out)
    for name in ("root.tar.zst", "files.jsonl"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_parse_dpkg_status_ignores_continuation_lines() -> None:
    pk = packer.parse_dpkg_status("Package: a\nStatus: install ok installed\nVersion: 1\nDescription: x\n Foo: bar\n")
    assert pk == {"a": {"version": "1", "arch": ""}}


UPGRADE = {"version": "2", "state_version": 2,
           "migrations": [{"name": "0002-convert", "state_version": 2, "kind": "contract"}]}


def _pack_with(tmp_path: Path, extra: dict[str, bytes]) -> packer.TreeFacts:
    out = tmp_path / "out"
    out.mkdir()
    return packer.pack(make_root_tar(tmp_path / "dib.tar", extra=extra), out, EPOCH)


def test_upgrade_metadata_is_read_and_checked_against_the_shipped_migrations(tmp_path: Path) -> None:
    facts = _pack_with(tmp_path, {"./usr/share/imageupdate/upgrade.json": json.dumps(UPGRADE).encode(),
                                  "./usr/share/imageupdate/migrations/0002-convert": b"#!/bin/sh\n"})
    assert facts.upgrade_problems == [] and facts.upgrade == UPGRADE
    assert [m["name"] for m in facts.migrations] == ["0002-convert"]


@pytest.mark.parametrize("extra, problem", [
    ({"./usr/share/imageupdate/upgrade.json": b"{not json"}, "is not valid JSON"),
    ({"./usr/share/imageupdate/upgrade.json": json.dumps(UPGRADE).encode()}, "0002-convert is not shipped"),
    ({"./usr/share/imageupdate/upgrade.json": json.dumps({**UPGRADE, "migrations": []}).encode(),
      "./usr/share/imageupdate/migrations/0002-convert": b"#!/bin/sh\n"}, "is shipped but not listed"),
])
def test_invalid_upgrade_metadata_is_a_problem_not_a_manifest(tmp_path: Path, extra: dict[str, bytes],
                                                              problem: str) -> None:
    facts = _pack_with(tmp_path, extra)
    assert facts.upgrade is None and any(problem in p for p in facts.upgrade_problems), facts.upgrade_problems


def test_services_are_kept_normalised(tmp_path: Path) -> None:
    facts = _pack_with(tmp_path, {})
    assert facts.services[0]["stop_signal"] == "SIGTERM" and facts.services[0]["probe"] is True
    assert facts.service_problems == []


@pytest.mark.parametrize("decl, problem", [
    (b'{"name": "app", "command": ["/usr/bin/app"], "stop_sigal": "SIGINT"}',
     "/usr/share/imageupdate/services/app.json: unknown key 'stop_sigal'"),
    (b'{"name": "app", "command": ["/usr/bin/app"], "ports": [0]}',
     "/usr/share/imageupdate/services/app.json: 'ports' must be a list of integers 1..65535"),
    (b'{"name": "app", ', "/usr/share/imageupdate/services/app.json: not valid JSON"),
    (b'{"name": "app", "command": ["/usr/bin/app"], "user": "postgres", "supplementary_groups": ["ssl-cert"]}',
     "'supplementary_groups' names group 'ssl-cert', which the image's /etc/group does not define"),
])
def test_bad_service_declarations_refuse_the_build(tmp_path: Path, decl: bytes, problem: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    extra = {"./usr/share/imageupdate/services/app.json": decl,
             "./etc/passwd": b"root:x:0:0:root:/root:/bin/bash\npostgres:x:104:110::/var/lib/postgresql:/bin/sh\n",
             "./etc/group": b"root:x:0:\npostgres:x:110:\n"}
    with pytest.raises(InvalidServiceDeclaration) as exc:
        packer.pack(make_root_tar(tmp_path / "dib.tar", extra=extra), out, EPOCH)
    assert exc.value.exit_code == 2 and exc.value.release == "R1"
    assert str(exc.value).startswith("release R1 ships an invalid service declaration: ")
    assert problem in str(exc.value)
    assert not (out / "files.jsonl").exists()


def test_accounts_are_not_checked_without_the_image_files(tmp_path: Path) -> None:
    decl = b'{"name": "app", "command": ["/usr/bin/app"], "user": "postgres"}'
    facts = _pack_with(tmp_path, {"./usr/share/imageupdate/services/app.json": decl})
    assert facts.service_problems == [] and facts.services[0]["user"] == "postgres"
