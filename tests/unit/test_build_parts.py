"""Units of the build step: elements, DIB's log, host mirrors, the cache guard."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageupdate.base.datadirs import elements_dir
from imageupdate.base.errors import BuildFailed, ElementsPathMissing, MissingHostDependency, UnknownElement
from imageupdate.base.hostdeps import require
from imageupdate.build import cache
from imageupdate.build.builder import source_date_epoch
from imageupdate.build.dib import _EXPANDED, _RUN_PARTS, DibBuild, FailureWitness, host_mirrors
from imageupdate.build.elements import MACHINE_MARKER, MACHINE_OS_ELEMENT, NODE_ELEMENT, select


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


# Captured from real failing builds (disk-image-create 3.x; timestamps stripped as run() does, paths
# shortened): an element whose install.d script says why and exits 1, and one run with DIB_DEBUG_TRACE=1
# where a command fails.
FAILED_QUIET = """\
dib-run-parts Running /tmp/in_target.d/install.d/50-imageupdate-node
dib-run-parts 50-imageupdate-node completed
dib-run-parts Running /tmp/in_target.d/install.d/60-failing-el
preparing failing-el
need FOO
Unmount /tmp/store/.staging/RTEST.5856/dib/tmp/dib_build.EK2wVXao/mnt/var/cache/apt/archives
Unmount /tmp/store/.staging/RTEST.5856/dib/tmp/dib_build.EK2wVXao/mnt/dev
INFO diskimage_builder.block_device.blockdevice [-] State already cleaned - no way to do anything here
"""
FAILED_TRACED = """\
dib-run-parts 50-imageupdate-node completed
dib-run-parts Running /tmp/in_target.d/install.d/60-failing-cmd
+ set -eu
+ echo 'installing config'
installing config
+ install -m 0644 /nonexistent/foo.conf /etc/foo.conf
install: cannot stat '/nonexistent/foo.conf': No such file or directory
++ diskimage_builder/lib/img-functions:run_in_target:58     :   check_break after-error run_in_target bash
+ diskimage_builder/lib/img-functions:run_in_target:1      :   trap_cleanup
+ diskimage_builder/lib/common-functions:unmount_dir:457     :   echo 'Unmount /tmp/b/mnt/sys'
Unmount /tmp/b/mnt/sys
DEBUG diskimage_builder.block_device.blockdevice [-] Creating BlockDevice object __init__
INFO diskimage_builder.block_device.blockdevice [-] State already cleaned - no way to do anything here
+ diskimage_builder/lib/img-functions:cleanup:43          :   cleanup_build_dir
+ diskimage_builder/lib/common-functions:cleanup_build_dir:220   :   sudo rm -rf /tmp/b/mnt
"""


def _witness(log: str) -> FailureWitness:
    w = FailureWitness()
    for line in log.splitlines():
        w.feed(line)
    return w


@pytest.mark.parametrize("log, said", [
    (FAILED_QUIET, "need FOO"),
    (FAILED_TRACED, "install: cannot stat '/nonexistent/foo.conf': No such file or directory"),
])
def test_failure_quotes_the_script_not_dib_cleanup(log: str, said: str) -> None:
    assert _witness(log).hint() == said


def test_silent_failure_names_the_last_traced_command() -> None:
    log = "\n".join(line for line in FAILED_TRACED.splitlines()
                    if "cannot stat" not in line and line != "installing config")
    assert _witness(log).hint() == "(no message; last command: install -m 0644 /nonexistent/foo.conf /etc/foo.conf)"


def test_failure_outside_a_script_quotes_dib_not_its_cleanup() -> None:
    log = (FAILED_QUIET.splitlines()[1] + "\n"  # the last script completed
           "ERROR: element-info failed to expand elements.\n"
           + "\n".join(FAILED_QUIET.splitlines()[-3:]))
    assert _witness(log).hint() == "ERROR: element-info failed to expand elements."


def test_build_failed_message_quotes_the_element(tmp_path: Path) -> None:
    captured = tmp_path / "dib-output"
    captured.write_text(FAILED_QUIET)

    class FailingDib(DibBuild):
        def command(self) -> list[str]:
            return ["sh", "-c", f"cat {captured}; exit 1"]

    dib = FailingDib(select([], []), "R1", tmp_path / "w", tmp_path / "cache", tmp_path / "log",
                     base_env={"PATH": "/usr/bin:/bin", "DIB_DISTRIBUTION_MIRROR": "x",
                               "DIB_DEBIAN_SECURITY_MIRROR": "y"})
    with pytest.raises(BuildFailed) as exc:
        dib.run()
    assert "failed in install.d/60-failing-el (exit 1): need FOO; full log:" in str(exc.value)
    assert exc.value.step == "dib:install.d/60-failing-el"


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


def test_a_machine_os_element_asks_dib_for_the_qcow2_and_the_kernel(tmp_path: Path) -> None:
    """Issue 16: one DIB run gives the tree (namespace nodes) and TripleO's trio (root.qcow2, vmlinuz, initrd)."""
    tree = select(["sample-workload-v1"], [])
    assert not tree.machine
    assert DibBuild(tree, "R1", tmp_path, tmp_path, tmp_path / "log").command().count("tar") == 1
    machine = select(["sample-workload-v1"], [], os_element=MACHINE_OS_ELEMENT)
    assert machine.machine
    cmd = DibBuild(machine, "R1", tmp_path, tmp_path, tmp_path / "log").command()
    dib = cmd[cmd.index("disk-image-create"):]
    assert dib[dib.index("-t") + 1] == "qcow2,tar" and "-u" in dib
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / MACHINE_MARKER).touch()  # an operator's element can carry the marker too
    assert select(["mine"], [tmp_path]).machine


def test_a_machine_build_that_wrote_no_kernel_fails_naming_what_is_missing(tmp_path: Path) -> None:
    sel = select([], [], os_element=MACHINE_OS_ELEMENT)
    dib = DibBuild(sel, "R1", tmp_path, tmp_path / "cache", tmp_path / "log")
    dib.output_base.with_suffix(".tar").write_bytes(b"")
    dib.output_base.with_suffix(".qcow2").write_bytes(b"")
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("setpriv", "unshare", "disk-image-create"):
        (fake / tool).write_text("#!/bin/sh\nexit 0\n")
        (fake / tool).chmod(0o755)
    dib.command = lambda: [str(fake / "disk-image-create")]  # type: ignore[method-assign]
    with pytest.raises(BuildFailed, match="wrote no image.vmlinuz, image.initrd for a machine image"):
        dib.run()
