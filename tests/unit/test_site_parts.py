"""Units of the local site that need no root: unpack checks, addressing, records, procs."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from imageupdate.base import procs
from imageupdate.base.errors import InputError, IntegrityError
from imageupdate.images.store import ImageStore
from imageupdate.images.unpack import Member, check_archive, parse_listing, unsafe_member
from imageupdate.site.network import MAX_NODES, SiteNet
from imageupdate.site.node import Node, NodeRecord
from imageupdate.site.site import LocalSite


def member(name: str, kind: str = "file", link: str = "", mode: str = "rw-r--r--") -> Member:
    return Member(kind, mode, name, link)


@pytest.mark.parametrize("m, seen, links, why", [
    (member("/etc/passwd"), set(), set(), "absolute path"),
    (member("usr/../../etc/shadow"), set(), set(), "'..'"),
    (member("var/log/x"), set(), {("var", "log")}, "below the symlink"),
    (member("etc/./x/pwned"), set(), {("etc", "x")}, "below the symlink"),  # normalised before the check
    (member("etc//x/pwned"), set(), {("etc", "x")}, "below the symlink"),
    (member("./etc/x/pwned"), set(), {("etc", "x")}, "below the symlink"),
    (member("dev/sda", "b"), set(), set(), "device node"),
    (member("dev/null", "c"), set(), set(), "device node"),
    (member("run/sock", "s"), set(), set(), "of type 's'"),
    (member("usr/lib/evil", "symlink", "../../../root"), set(), set(), "leaves the tree"),
    (member("usr/./lib/evil", "symlink", "../../../root"), set(), set(), "leaves the tree"),
    (member("usr/bin/x", "hard link", "/etc/shadow"), set(), set(), "outside the archive"),
    (member("usr/bin/x", "hard link", "usr/bin/y"), set(), set(), "outside the archive"),
    (member(".", "file"), set(), set(), "names the tree itself"),
])
def test_unsafe_members_are_named(m: Member, seen: set[tuple[str, ...]], links: set[tuple[str, ...]],
                                  why: str) -> None:
    reason = unsafe_member(m, links, seen)
    assert reason is not None and why in reason


@pytest.mark.parametrize("m, seen", [
    (member("usr/bin/python3"), set()),
    (member("./", "directory"), set()),
    (member("usr/bin/su", mode="rwsr-xr-x"), set()),  # setuid files are a root image's own (su, passwd)
    (member("etc/machine-id", "symlink", "/mnt/state/identity/machine-id"), set()),  # resolved in the node
    (member("usr/bin/python3", "symlink", "python3.11"), set()),
    (member("usr/lib/os-release", "symlink", "../../etc/os-release"), set()),
    (member("usr/bin/b", "hard link", "./usr/bin/a"), {("usr", "bin", "a")}),
    (member("run/initctl", "fifo"), set()),
])
def test_normal_root_members_pass(m: Member, seen: set[tuple[str, ...]]) -> None:
    assert unsafe_member(m, set(), seen) is None


@pytest.mark.parametrize("line, want", [
    (b'-rw-r--r-- 0/0               2 1970-01-01 00:00 "etc/a"', Member("file", "rw-r--r--", "etc/a")),
    (b'hrwsr-xr-x 0/0               0 2026-11-30 23:16 "./hard" link to "./f"',
     Member("hard link", "rwsr-xr-x", "./hard", "./f")),
    (b'lrwxrwxrwx 0/0               0 2026-11-30 23:16 "./d/sym" -> "../f"',
     Member("symlink", "rwxrwxrwx", "./d/sym", "../f")),
    (b'-rw-r--r-- 0/0               0 2026-11-30 23:16 "./we ird -> x"', Member("file", "rw-r--r--", "./we ird -> x")),
    (b'-rw-r--r-- 0/0               1 2026-11-30 23:16 "./new\\nline \\"q\\" \\303\\251"',
     Member("file", "rw-r--r--", './new\nline "q" \u00e9')),
    (b'crw-rw-rw- 0/0             1,1 1970-01-01 00:00 "dev/mem"', Member("c", "rw-rw-rw-", "dev/mem")),
])
def test_gnu_tar_listing_lines_are_read_exactly(line: bytes, want: Member) -> None:
    assert parse_listing(line) == want


def test_an_unreadable_listing_line_is_refused() -> None:
    with pytest.raises(ValueError, match="unreadable listing line"):
        parse_listing(b"garbage")


def _crafted(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes], garbage_devmajor: int | None = None) -> Path:
    """A root.tar.zst of ``members``; ``garbage_devmajor``: the index of a member whose header gets a
    non-octal devmajor field (Python's tarfile then ends the archive there; GNU tar reads on)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        offsets = []
        for ti, data in members:
            offsets.append(tf.offset)
            ti.size = len(data) if ti.isreg() else 0
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    raw = bytearray(buf.getvalue())
    if garbage_devmajor is not None:
        at = offsets[garbage_devmajor]
        hdr = raw[at:at + 512]
        hdr[329:337] = b"zzzzzzz\0"
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        raw[at:at + 512] = hdr
    out = tmp_path / "root.tar.zst"
    out.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=bytes(raw), capture_output=True, check=True).stdout)
    return out


def _ti(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, link, mode
    if kind == tarfile.CHRTYPE:
        ti.devmajor, ti.devminor = 1, 1
    return ti


def test_a_parser_differential_cannot_hide_a_device_node(tmp_path: Path) -> None:
    """Seen: a regular file with a garbage devmajor field ended the archive for Python's tarfile, and GNU tar
    then extracted a world-writable /dev/mem after it. The check reads what GNU tar reads."""
    image = _crafted(tmp_path, (_ti("etc/ok"), b"ok"), (_ti("etc/a"), b"hi"),
                     (_ti("dev/mem", tarfile.CHRTYPE, mode=0o666), b""), garbage_devmajor=1)
    with tarfile.open(fileobj=io.BytesIO(subprocess.run(["zstd", "-dc", str(image)], capture_output=True,
                                                        check=True).stdout)) as tf:
        assert [m.name for m in tf] == ["etc/ok"]  # what the old check saw
    with pytest.raises(IntegrityError, match="device node 'dev/mem'"):
        check_archive(image)


def test_normalised_paths_below_a_symlink_are_refused_by_the_check(tmp_path: Path) -> None:
    image = _crafted(tmp_path, (_ti("etc", tarfile.DIRTYPE, mode=0o755), b""),
                     (_ti("etc/x", tarfile.SYMTYPE, "/etc"), b""), (_ti("etc/./x/pwned"), b"owned"))
    with pytest.raises(IntegrityError, match="below the symlink 'etc/x'"):
        check_archive(image)


def test_an_archive_gnu_tar_cannot_read_is_one_error(tmp_path: Path) -> None:
    image = tmp_path / "root.tar.zst"
    image.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=b"not a tar" * 100, capture_output=True,
                                     check=True).stdout)
    with pytest.raises(IntegrityError, match="GNU tar could not read it"):
        check_archive(image)


def test_a_sound_archive_counts_its_members(tmp_path: Path) -> None:
    image = _crafted(tmp_path, (_ti("etc", tarfile.DIRTYPE, mode=0o755), b""), (_ti("etc/a"), b"a"),
                     (_ti("etc/b", tarfile.LNKTYPE, "etc/a"), b""), (_ti("usr/bin/su", mode=0o4755), b"su"))
    assert check_archive(image) == 4


def test_addresses_and_names() -> None:
    net = SiteNet("a1b2c3", "10.231.7.0/24")
    assert net.gateway == "10.231.7.1"
    assert net.address(0) == "10.231.7.10" and net.address(MAX_NODES - 1) == "10.231.7.249"
    assert net.bridge == "iub-a1b2c3" and len(net.veth(239)) <= 15
    with pytest.raises(InputError):
        net.address(MAX_NODES)


def test_recover_drops_a_rebuild_that_never_switched(tmp_path: Path) -> None:
    node = Node(tmp_path, SiteNet("a1b2c3", "10.231.7.0/24"), tmp_path / "releases", "node0", 0)
    node._save(NodeRecord("node0", 0, current="R1", pending="R2", wanted="stopped", pid=2**22 + 7))
    said = node.recover()
    rec = node.record()
    assert said is not None and "stays on R1" in said
    assert (rec.current, rec.pending, rec.pid) == ("R1", None, None)
    assert node.recover() is None  # nothing left to do


def test_procs_stop_a_process_that_ignores_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                             "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    slept: list[float] = []


    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    how = procs.stop(proc.pid, grace=0.2, sleep=sleep)
    proc.wait()
    assert how == "killed" and slept
    assert not procs.alive(proc.pid) and procs.stop(proc.pid, 1) == "not running"


def test_wait_until_never_sleeps_with_an_injected_sleep() -> None:
    calls = iter([False, False, True])
    slept: list[float] = []
    assert procs.wait_until(lambda: next(calls), timeout=60, interval=5, sleep=slept.append)
    assert slept == [5, 5]


def test_site_needs_root_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imageupdate.site.site import LocalSite

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(InputError) as exc:
        LocalSite(tmp_path / "site").up(3, "R1")
    assert exc.value.exit_code == 2 and "root" in str(exc.value) and "namespaces" in str(exc.value)
    assert not (tmp_path / "site").exists()


def test_too_many_nodes_for_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store, publish) -> None:  # type: ignore[no-untyped-def]
    from imageupdate.site import lifecycle
    from imageupdate.site.site import LocalSite

    publish("R1", extra={"./usr/lib/imageupdate/init": b"#!/usr/bin/python3\n"})
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(lifecycle, "require", lambda tools: {})
    monkeypatch.setattr(lifecycle, "_available_memory_mb", lambda: 200)
    with pytest.raises(InputError) as exc:
        LocalSite(tmp_path / "site", store).up(10, "R1")
    assert "only 200 MiB are available" in str(exc.value)
    assert not (tmp_path / "site").exists()


def test_a_release_without_the_node_init_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     store, publish) -> None:  # type: ignore[no-untyped-def]
    from imageupdate.site import lifecycle
    from imageupdate.site.site import LocalSite

    publish("R1")  # the synthetic root has no /usr/lib/imageupdate/init
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(lifecycle, "require", lambda tools: {})
    with pytest.raises(InputError) as exc:
        LocalSite(tmp_path / "site", store).up(1, "R1")
    assert "has no /usr/lib/imageupdate/init" in str(exc.value) and "--force" in str(exc.value)
    assert not (tmp_path / "site").exists()


def test_a_site_remembers_its_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEUPDATE_STORE", raising=False)
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "site.json").write_text(json.dumps({"id": "x", "store": str(tmp_path / "recorded")}))
    assert LocalSite.open(site_dir).store.root == tmp_path / "recorded"
    assert LocalSite.open(site_dir, tmp_path / "given").store.root == tmp_path / "given"
    monkeypatch.setenv("IMAGEUPDATE_STORE", str(tmp_path / "env"))
    assert LocalSite.open(site_dir).store.root == tmp_path / "env"
    monkeypatch.delenv("IMAGEUPDATE_STORE")
    assert LocalSite.open(tmp_path / "no-site").store.root == ImageStore().root


def test_listening_ports_sees_loopback_listeners_of_a_process_namespace() -> None:
    import os
    import socket

    from imageupdate.site.node import listening_ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port in listening_ports(os.getpid())
    assert port not in listening_ports(os.getpid())
    assert listening_ports(2 ** 22 + 12345) == set()  # no such process: nothing listens


def test_declared_services_ports_and_stop_grace(tmp_path: Path) -> None:
    from imageupdate.site.node import STOP_GRACE, declared_ports, declared_services, stop_grace
    d = tmp_path / "usr/share/imageupdate/services"
    d.mkdir(parents=True)
    (d / "db.json").write_text(json.dumps({"name": "db", "ports": [5432], "stop_timeout": 30}))
    (d / "web.json").write_text(json.dumps({"name": "web", "ports": [80, 5432, "x", 70000]}))
    (d / "bad.json").write_text("{not json")
    (d / "list.json").write_text("[1, 2]")
    services = declared_services(tmp_path)
    assert [s["name"] for s in services] == ["db", "web"]
    assert declared_ports(services) == [80, 5432]
    assert stop_grace(services) == 35.0
    assert stop_grace([{"stop_timeout": 10 ** 9}]) == 65.0  # bounded
    assert stop_grace([{"stop_timeout": True}, {}]) == STOP_GRACE
    assert declared_services(tmp_path / "missing") == []


def test_a_site_whose_node_does_not_boot_is_kept_with_its_logs(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed ``site up`` takes the nodes and network down but keeps what explains it, and says where."""
    from imageupdate.base.errors import OperationError
    from imageupdate.heat.service import HeatService
    from imageupdate.site import lifecycle, sitedir

    def no_boot(node: Node, release: str, key: str) -> None:
        node.dir.mkdir(parents=True)
        (node.dir / "console.log").write_text("init: cannot start web\n")
        raise OperationError(f"node {node.name} exited at boot", node=node.name, release=release, step="start")

    monkeypatch.setattr(sitedir, "ensure_release", lambda *a: None)
    for name in ("create_bridge", "delete_bridge", "delete_node"):
        monkeypatch.setattr(SiteNet, name, lambda *a: None)
    monkeypatch.setattr(Node, "create", no_boot)
    monkeypatch.setattr(HeatService, "stop", lambda self: "not running")
    site = LocalSite(tmp_path / "site", ImageStore(tmp_path / "store"))
    with pytest.raises(OperationError) as e:
        lifecycle.create(site, 2, "R1")
    assert (tmp_path / "site/site.json").is_file()
    assert (tmp_path / "site/nodes/node0/console.log").read_text() == "init: cannot start web\n"
    assert "kept for inspection" in e.value.message and f"site destroy --site {tmp_path / 'site'}" in e.value.message
    assert e.value.node == "node0" and e.value.step == "start"


def test_a_site_interrupted_while_created_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imageupdate.heat.service import HeatService
    from imageupdate.site import lifecycle, sitedir

    def interrupted(*a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sitedir, "ensure_release", interrupted)
    for name in ("create_bridge", "delete_bridge", "delete_node"):
        monkeypatch.setattr(SiteNet, name, lambda *a: None)
    monkeypatch.setattr(HeatService, "stop", lambda self: "not running")
    with pytest.raises(KeyboardInterrupt):
        lifecycle.create(LocalSite(tmp_path / "site", ImageStore(tmp_path / "store")), 1, "R1")
    assert not (tmp_path / "site").exists()


def test_a_site_path_that_is_not_a_site_directory_is_bad_input(tmp_path: Path) -> None:
    from imageupdate.site.site import LocalSite
    from imageupdate.site.sitedir import SiteNotFound

    for path in (Path("/dev/null"), tmp_path / "garbage"):
        if path != Path("/dev/null"):
            path.mkdir()
            (path / "site.json").write_text("[1, 2]")
        with pytest.raises(SiteNotFound) as exc:
            LocalSite(path).config()
        assert exc.value.exit_code == 2 and "--site" in str(exc.value)


def test_subnet_picking_is_one_site_at_a_time(tmp_path: Path) -> None:
    """Two 'site up' at once: the second picks only after the first's bridge holds its subnet."""
    import threading

    from imageupdate.site.network import picking

    lock, order = tmp_path / "subnets.lock", []

    def second() -> None:
        with picking(lock):
            order.append("second")

    with picking(lock):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)  # the second had time to pick, were it not held
        order.append("first done")
    t.join(5)
    assert order == ["first done", "second"]


def test_a_hard_link_to_a_symlink_is_refused(tmp_path: Path) -> None:
    """A link d/e/a -> ../../etc stays in the tree where it is; a hard link to it at the top leaves it."""
    image = _crafted(tmp_path, (_ti("d/e", tarfile.DIRTYPE, mode=0o755), b""),
                     (_ti("d/e/a", tarfile.SYMTYPE, "../../etc"), b""), (_ti("h", tarfile.LNKTYPE, "d/e/a"), b""))
    with pytest.raises(IntegrityError, match="links a symlink"):
        check_archive(image)


def test_the_listing_is_read_in_the_c_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A translated 'link to' must not turn a hard link's target into its name."""
    monkeypatch.setenv("LANGUAGE", "de")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    image = _crafted(tmp_path, (_ti("f"), b"x"), (_ti("s", tarfile.SYMTYPE, "/etc"), b""),
                     (_ti("s/evil", tarfile.LNKTYPE, "f"), b""))
    with pytest.raises(IntegrityError, match="below the symlink 's'"):
        check_archive(image)


def test_a_member_warning_per_member_does_not_hang_the_check(tmp_path: Path) -> None:
    """GNU tar warns once per member about an unknown pax keyword: that must not fill a pipe and hang."""
    members = []
    for i in range(3000):
        ti = _ti(f"d{i}")
        ti.pax_headers = {"LIBARCHIVE.creationtime": "1700000000"}
        members.append((ti, b""))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data))
    image = tmp_path / "root.tar.zst"
    image.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=buf.getvalue(), capture_output=True,
                                     check=True).stdout)
    assert check_archive(image) == 3000


def test_a_site_configuration_without_its_network_is_one_line_not_a_traceback() -> None:
    from imageupdate.site.sitedir import SiteDir, SiteNotFound
    with pytest.raises(SiteNotFound, match="names no subnet"):
        SiteDir.net_of({"id": "x", "store": "/s"})
