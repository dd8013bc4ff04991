"""Turn DIB's raw tar into the store's reproducible root image, in one pass.

DIB's ``-t tar`` output lists members in directory order with build-time
dates, so two builds of the same content differ everywhere. The packer writes
``root.tar.zst``: members sorted by path, dates clamped to a fixed epoch, no
user or group names, no device nodes (a node brings its own /dev), hard links
pointing at the first member of their group
in sorted order, and the directories a root needs but DIB leaves out
(``/proc``, ``/sys``, ``/dev``, ``/run``, ``/tmp``). While it copies, it
hashes every file and reads what the manifest needs from the tree itself:
the dpkg database, file ownership, the release stamp, declared services,
shipped tests and migrations, the state path registry and the kernel.

Declared services are checked here (:mod:`imageupdate.images.services`,
users and groups against the image's own ``/etc/passwd`` and ``/etc/group``):
a release with a bad declaration is refused before anything reaches the
store, the way the builder refuses bad upgrade metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from imageupdate.images import services as service_decl
from imageupdate.images import upgrade_meta
from imageupdate.images.fileindex import FileEntry, write_index

DPKG_STATUS = "var/lib/dpkg/status"
DPKG_INFO = "var/lib/dpkg/info/"
RELEASE_STAMP = "etc/imageupdate/release.json"
STATE_PATHS = "etc/imageupdate/state-paths"
SERVICES_DIR = "usr/share/imageupdate/services/"
TESTS_DIR = "usr/share/imageupdate/tests/"
MIGRATIONS_DIR = "usr/share/imageupdate/migrations/"
UPGRADE_FILE = upgrade_meta.UPGRADE_FILE
PASSWD = "etc/passwd"
GROUP = "etc/group"

# Directories a root filesystem needs that DIB's tar output does not carry.
ROOT_DIRS = {"proc": 0o555, "sys": 0o555, "dev": 0o755, "run": 0o755, "tmp": 0o1777}


@dataclass
class TreeFacts:
    """What the packer learned about the tree while copying it."""

    packages: dict[str, dict[str, str]] = field(default_factory=dict)
    release_stamp: dict[str, object] | None = None
    services: list[dict[str, object]] = field(default_factory=list)  # normalised declarations
    service_problems: list[str] = field(default_factory=list)
    tests: list[dict[str, object]] = field(default_factory=list)
    migrations: list[dict[str, object]] = field(default_factory=list)
    state_paths: list[str] = field(default_factory=list)
    upgrade: dict[str, object] | None = None  # upgrade.json as shipped, when it is valid
    upgrade_problems: list[str] = field(default_factory=list)
    kernel: str | None = None
    file_count: int = 0
    total_size: int = 0
    uncompressed_size: int = 0


def _norm(name: str) -> str:
    """Member path relative to the root: no leading ``/`` or ``./``; root is ``""``."""
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    return "" if name == "." else name


def _wanted_content(path: str) -> bool:
    return (
        path in (DPKG_STATUS, RELEASE_STAMP, STATE_PATHS, UPGRADE_FILE, PASSWD, GROUP)
        or (path.startswith(DPKG_INFO) and path.endswith(".list"))
        or (path.startswith(SERVICES_DIR) and path.endswith(".json"))
        or (path.startswith(TESTS_DIR) and "/" not in path[len(TESTS_DIR):])  # to see each test can run
    )


class _HashingReader:
    """File-like reader that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.sha.update(data)
        return data


class _CountingWriter:
    """File-like writer that counts what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.count = 0

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        self.count += len(data)
        return len(data)


def parse_dpkg_status(text: str) -> dict[str, dict[str, str]]:
    """Installed packages from a dpkg status file: name -> version, arch."""
    packages: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        name = fields.get("Package")
        if name and fields.get("Status", "").endswith(" installed"):
            packages[name] = {
                "version": fields.get("Version", ""),
                "arch": fields.get("Architecture", ""),
            }
    return dict(sorted(packages.items()))


def _package_owners(lists: dict[str, bytes]) -> dict[str, str]:
    owners: dict[str, str] = {}
    for listname, content in sorted(lists.items()):
        pkg = listname[len(DPKG_INFO) : -len(".list")].split(":")[0]
        for line in content.decode("utf-8", "replace").splitlines():
            path = _norm(line)
            if path and path not in owners:
                owners[path] = pkg
    return owners


def _sorted_members(src: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Members by path; device nodes dropped (debootstrap's /dev): a node brings its own /dev."""
    members: dict[str, tarfile.TarInfo] = {}
    for m in src.getmembers():
        path = _norm(m.name)
        if path and not (m.ischr() or m.isblk()) and not path.startswith("dev/"):
            members[path] = m
    return [members[p] for p in sorted(members)]


def _root_dir_entries(present: set[str], epoch: int) -> Iterator[tarfile.TarInfo]:
    for name, mode in ROOT_DIRS.items():
        if name not in present:
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.DIRTYPE
            ti.mode = mode
            ti.mtime = epoch
            yield ti


def pack(raw_tar: Path, out_dir: Path, epoch: int, zstd_level: int = 3) -> TreeFacts:
    """Write ``root.tar.zst`` and ``files.jsonl`` into ``out_dir``.

    Raises ``OSError`` (disk full, ...), ``subprocess.CalledProcessError``, or
    :class:`~imageupdate.images.services.InvalidServiceDeclaration` (exit 2) when a declared
    service has problems; the caller owns ``out_dir`` and removes it on failure.
    """
    facts = TreeFacts()
    out_path = out_dir / "root.tar.zst"
    with open(out_path, "wb") as out_file:
        zstd = subprocess.Popen(
            ["zstd", "-q", "-T0", f"-{zstd_level}", "-c"],
            stdin=subprocess.PIPE,
            stdout=out_file,
        )
        assert zstd.stdin is not None
        counter = _CountingWriter(zstd.stdin)
        try:
            with tarfile.open(raw_tar, "r:") as src, tarfile.open(
                fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT  # type: ignore[call-overload]
            ) as dst:
                members = _sorted_members(src)
                present = {_norm(m.name) for m in members}
                root = tarfile.TarInfo(".")
                root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, epoch
                for ti in [root, *_root_dir_entries(present, epoch)]:
                    dst.addfile(ti)
                copier = _Copier(src, dst, epoch)
                entries = [copier.copy(m) for m in members]
                contents = copier.contents
        finally:
            zstd.stdin.close()
            rc = zstd.wait()
        if rc != 0:
            raise subprocess.CalledProcessError(rc, "zstd")
    facts.uncompressed_size = counter.count
    owners = _package_owners({k: v for k, v in contents.items() if k.startswith(DPKG_INFO)})
    for e in entries:
        e.package = owners.get(e.path)
    _collect_facts(facts, entries, contents)
    if facts.service_problems:
        stamped = (facts.release_stamp or {}).get("release")
        raise service_decl.refusal(stamped if isinstance(stamped, str) else None, facts.service_problems)
    write_index(out_dir / "files.jsonl", entries)
    return facts


class _Copier:
    """Copies members into the normalised tar, tracking hard link groups."""

    def __init__(self, src: tarfile.TarFile, dst: tarfile.TarFile, epoch: int) -> None:
        self.src, self.dst, self.epoch = src, dst, epoch
        self.head_of: dict[str, str] = {}  # original link target -> first path in sorted order
        self.heads: dict[str, FileEntry] = {}  # head path -> its entry
        self.contents: dict[str, bytes] = {}

    def copy(self, m: tarfile.TarInfo) -> FileEntry:
        path = _norm(m.name)
        ti = m  # rewritten in place: the source's member list is not read by name again
        ti.name = path
        ti.mtime = min(int(m.mtime), self.epoch)
        ti.uname = ti.gname = ""
        ti.pax_headers = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        entry = FileEntry(path=path, type="other", mode=m.mode, uid=m.uid, gid=m.gid)
        if m.islnk() or m.isreg():
            # Hard link groups: the first member in sorted order holds the
            # data; DIB's tar may name a target that now sorts after the link.
            target = _norm(m.linkname) if m.islnk() else path
            head = self.head_of.setdefault(target, path)
            if head == path:
                data_member = self.src.getmember(m.linkname) if m.islnk() else m
                ti.type, ti.linkname, ti.size = tarfile.REGTYPE, "", data_member.size
                self._copy_data(ti, data_member, entry)
                self.heads[path] = entry
                return entry
            ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, head, 0
            self.dst.addfile(ti)
            entry.type, entry.link = "hardlink", head
            entry.size, entry.sha256 = self.heads[head].size, self.heads[head].sha256
            return entry
        if m.issym():
            entry.type, entry.link = "symlink", m.linkname
        elif m.isdir():
            entry.type = "dir"
        elif m.ischr() or m.isblk():
            entry.type = "device"
        elif m.isfifo():
            entry.type = "fifo"
        self.dst.addfile(ti)
        return entry

    def _copy_data(self, ti: tarfile.TarInfo, data_member: tarfile.TarInfo, entry: FileEntry) -> None:
        fobj = self.src.extractfile(data_member)
        assert fobj is not None
        entry.type, entry.size = "file", ti.size
        if _wanted_content(entry.path):
            data = fobj.read()
            self.contents[entry.path] = data
            entry.sha256 = hashlib.sha256(data).hexdigest()
            self.dst.addfile(ti, io.BytesIO(data))
        else:
            reader = _HashingReader(fobj)
            self.dst.addfile(ti, reader)
            entry.sha256 = reader.sha.hexdigest()


def _collect_facts(facts: TreeFacts, entries: list[FileEntry], contents: dict[str, bytes]) -> None:
    if DPKG_STATUS in contents:
        facts.packages = parse_dpkg_status(contents[DPKG_STATUS].decode("utf-8", "replace"))
    if RELEASE_STAMP in contents:
        try:
            facts.release_stamp = json.loads(contents[RELEASE_STAMP])
        except ValueError:
            facts.release_stamp = None
    if STATE_PATHS in contents:
        facts.state_paths = [
            line.strip() for line in contents[STATE_PATHS].decode().splitlines() if line.strip()
        ]
    _read_services(facts, contents)
    kernels: set[str] = set()
    for e in entries:
        if e.type == "file":
            facts.file_count += 1
            facts.total_size += e.size
        for prefix, bucket in ((TESTS_DIR, facts.tests), (MIGRATIONS_DIR, facts.migrations)):
            if e.path.startswith(prefix) and e.type == "file" and "/" not in e.path[len(prefix):]:
                bucket.append(
                    {
                        "name": e.path[len(prefix):],
                        "path": "/" + e.path,
                        "sha256": e.sha256,
                        "executable": bool(e.mode & 0o111),
                    }
                )
                if prefix == TESTS_DIR:
                    head = contents.get(e.path, b"")[:4]
                    bucket[-1]["runnable"] = head[:2] == b"#!" or head == b"\x7fELF"
        if e.path.startswith("boot/vmlinuz-"):
            kernels.add(e.path[len("boot/vmlinuz-"):])
        elif e.path.startswith(("lib/modules/", "usr/lib/modules/")) and e.type == "dir":
            rest = e.path.split("modules/", 1)[1]
            if rest and "/" not in rest:
                kernels.add(rest)
    facts.kernel = max(kernels) if kernels else None
    if UPGRADE_FILE in contents:
        _read_upgrade(facts, contents[UPGRADE_FILE])


def _read_services(facts: TreeFacts, contents: dict[str, bytes]) -> None:
    accounts = None
    if PASSWD in contents and GROUP in contents:
        accounts = (contents[PASSWD].decode("utf-8", "replace"), contents[GROUP].decode("utf-8", "replace"))
    for path, data in sorted(contents.items()):
        if not path.startswith(SERVICES_DIR):
            continue
        shown = "/" + path
        try:
            raw = json.loads(data)
        except ValueError as e:
            facts.service_problems.append(f"{shown}: not valid JSON: {e}")
            facts.services.append({"name": Path(path).stem, "invalid": True})
            continue
        decl, problems = service_decl.parse_service(shown, raw)
        if decl is not None and accounts is not None:
            problems += service_decl.account_problems(shown, decl, *accounts)
        facts.service_problems += problems
        facts.services.append(decl if decl is not None else {"name": Path(path).stem, "invalid": True})


def _read_upgrade(facts: TreeFacts, raw: bytes) -> None:
    try:
        data = json.loads(raw)
    except ValueError as e:
        facts.upgrade_problems = [f"/{UPGRADE_FILE} is not valid JSON: {e}"]
        return
    shipped = {str(m["name"]) for m in facts.migrations}
    _, facts.upgrade_problems = upgrade_meta.parse(data, shipped, facts.state_paths)
    for m in facts.migrations:
        if not m["executable"]:
            facts.upgrade_problems.append(f"{m['path']} is not executable (give it mode 0755 in its element)")
    if not facts.upgrade_problems:
        facts.upgrade = data


def shipped_test_problems(tests: list[dict[str, object]]) -> list[str]:
    """Why shipped post-deploy tests could not run on a node: each must be an executable ``#!`` script or
    ELF binary (the format documented in the README)."""
    problems = []
    for t in tests:
        if not t.get("executable"):
            problems.append(f"{t['path']} is not executable (give it mode 0755 in its element)")
        elif t.get("runnable") is False:
            problems.append(f"{t['path']} is neither a #! script nor an ELF binary")
    return problems
