"""Units of the build step: elements, DIB's log, host mirrors, the cache guard."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageupdate.build import cache
from imageupdate.build.builder import source_date_epoch
from imageupdate.build.dib import _EXPANDED, _RUN_PARTS, DibBuild, host_mirrors
from imageupdate.build.elements import NODE_ELEMENT, select
from imageupdate.errors import ElementsPathMissing, MissingHostDependency, UnknownElement
from imageupdate.hostdeps import require
from imageupdate.resources import elements_dir


def test_selection_order_and_node_element_always_in(tmp_path: Path) -> None:
    (tmp_path / "my-element").mkdir()
    sel = select(["my-element", "sample-workload-v1"], [tmp_path])
    assert sel.requested == ["imageupdate-debian-slim", NODE_ELEMENT, "my-element", "sample-workload-v1"]
    assert sel.search_path == (elements_dir(), tmp_path.resolve())
    assert sel.elements_path == f"{elements_dir()}:{tmp_path.resolve()}"


def test_dib_bundled_elements_are_known() -> None:
    assert "debian-minimal" in select([], [], os_element="debian-minimal").requested


def test_unknown_element_names_where_it_looked() -> None:
    with pytest.raises(UnknownElement) as exc:
        select(["no-such-element"], [])
    assert exc.value.exit_code == 2
    assert "no-such-element" in str(exc.value) and "--elements-path" in str(exc.value)


def test_missing_elements_path(tmp_path: Path) -> None:
    with pytest.raises(ElementsPathMissing):
        select([], [tmp_path / "nope"])


def test_missing_host_dependency_names_the_package() -> None:
    with pytest.raises(MissingHostDependency) as exc:
        require({"imageupdate-no-such-tool": "apt-get install no-such-package"})
    assert "apt-get install no-such-package" in str(exc.value)
    assert exc.value.exit_code == 2


LOG = """\
2026-11-22 03:08:15.072 | Expanded element dependencies to: sysprep install-bin imageupdate-node dpkg
2026-11-22 03:08:17.097 | dib-run-parts Running /tmp/dib_build.jRAqgLU8/hooks/root.d/08-debootstrap
2026-11-22 03:09:02.600 | dib-run-parts Running /tmp/in_target.d/install.d/50-imageupdate-node
2026-11-22 03:09:02.601 | dib-run-parts 08-debootstrap completed
"""


def test_dib_log_parsing() -> None:
    lines = [line.split(" | ", 1)[1] for line in LOG.splitlines()]
    m = _EXPANDED.search(lines[0])
    assert m and m.group(1).split() == ["sysprep", "install-bin", "imageupdate-node", "dpkg"]
    steps = [m.groups() for line in lines if (m := _RUN_PARTS.search(line))]
    assert steps == [("root.d", "08-debootstrap"), ("install.d", "50-imageupdate-node")]


def test_host_mirrors_deb822_and_one_line(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\n# comment: x\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert host_mirrors([deb822]) == ("http://mirror.example/debian", "http://mirror.example/debian-security")
    one = tmp_path / "sources.list"
    one.write_text("deb [arch=amd64] http://m.example/debian bookworm main\n"
                   "deb http://m.example/debian-security bookworm-security main\n")
    assert host_mirrors([one]) == ("http://m.example/debian", "http://m.example/debian-security")


def test_dib_runs_in_its_own_namespaces_with_our_env(tmp_path: Path) -> None:
    sel = select(["sample-workload-v1"], [])
    dib = DibBuild(sel, "R1", tmp_path / "w", tmp_path / "cache", tmp_path / "log",
                   base_env={"PATH": "/usr/bin", "DIB_RELEASE": "trixie"})
    cmd = dib.command()
    assert cmd[:4] == ["setpriv", "--pdeathsig", "KILL", "--"]
    assert cmd[4] == "unshare" and "--pid" in cmd and "--mount" in cmd and "--kill-child" in cmd
    assert cmd[cmd.index("disk-image-create"):][-3:] == ["imageupdate-debian-slim", NODE_ELEMENT, "sample-workload-v1"]
    env = dib.environment()
    assert env["DIB_RELEASE"] == "trixie"  # the operator's choice wins
    assert env["DIB_IMAGEUPDATE_RELEASE"] == "R1"
    assert env["TMP_DIR"].startswith(str(tmp_path / "w"))
    assert env["DIB_IMAGE_CACHE"] == str(tmp_path / "cache")
    assert env["ELEMENTS_PATH"] == sel.elements_path


def test_cache_guard_drops_an_unconfirmed_tarball(tmp_path: Path) -> None:
    tarball = tmp_path / "debootstrap-debian-bookworm-amd64.tar.gz"
    tarball.write_bytes(b"complete")
    cache.confirm(tmp_path)
    assert cache.drop_unconfirmed(tmp_path) == []
    tarball.write_bytes(b"trunc")  # a later build died while rewriting it
    assert cache.drop_unconfirmed(tmp_path) == [tarball]
    assert not tarball.exists()
    other = tmp_path / "debootstrap-debian-trixie-amd64.tar.gz"
    other.write_bytes(b"never confirmed")
    assert cache.drop_unconfirmed(tmp_path) == [other]


def test_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "e" / "x"
    f.parent.mkdir()
    f.write_text("")
    os.utime(f, (1_650_000_000, 1_650_000_000))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert source_date_epoch((tmp_path / "e",)) == 1_650_000_000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1600000000")
    assert source_date_epoch((tmp_path / "e",)) == 1_600_000_000
