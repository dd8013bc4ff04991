"""Drive ``disk-image-create`` as a subprocess and follow its phases.

DIB runs in its own mount and PID namespaces (``unshare``) and in its own
session: when imageupdate dies, however it dies, the kernel kills DIB's
whole process tree and drops every mount it made (its tmpfs, the chroot's
/proc, /sys, /dev), so an interrupted build leaves nothing mounted. DIB's
temporary directories live inside the build's staging directory, which the
store removes.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from imageupdate.base.errors import BuildFailed
from imageupdate.base.hostdeps import search_path
from imageupdate.build.elements import ElementSelection
from imageupdate.images.manifest import INITRD, KERNEL, ROOT_QCOW2

_RUN_PARTS = re.compile(r"dib-run-parts Running \S*/([a-z0-9-]+\.d)/([^/\s]+)\s*$")
_EXPANDED = re.compile(r"Expanded element dependencies to: (.*)$")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \| ")
_COMPLETED = re.compile(r"^dib-run-parts \S+ completed\s*$")
# DIB's own words once a script failed: its xtrace (DIB_DEBUG_TRACE), its
# unmounts, its Python block-device logging, its cleanup errors.
_DIB_OWN = re.compile(
    r"^(\++ \S*diskimage_builder/"
    r"|Unmount /"
    r"|(DEBUG|INFO|WARNING|ERROR|CRITICAL) diskimage_builder[.\s]"
    r"|ERROR: (unable to cleanly remove|failed to umount)"
    r"|dib-run-parts )"
)


@dataclass
class DibEvent:
    """One step of DIB's progress: a phase's script starting."""

    phase: str
    script: str
    elapsed: float


@dataclass
class DibResult:
    tar: Path
    expanded_elements: list[str]
    seconds: float
    environment: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Path] | None = None  # a machine build: MACHINE_OUTPUTS name -> the file DIB wrote


# what a machine build (-t qcow2,tar with the baremetal element) writes beside the tar: store name -> suffix
MACHINE_OUTPUTS = {ROOT_QCOW2: ".qcow2", KERNEL: ".vmlinuz", INITRD: ".initrd"}


def host_mirrors(sources: Iterable[Path] | None = None) -> tuple[str | None, str | None]:
    """The host's Debian mirror and security mirror, from its apt sources."""
    if sources is None:
        base = Path("/etc/apt")
        sources = [base / "sources.list", *sorted((base / "sources.list.d").glob("*"))]
    main = security = None
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suites in _apt_entries(text, deb822=path.suffix == ".sources"):
            if any(s.endswith("-security") for s in suites):
                security = security or uri
            elif "debian" in uri:
                main = main or uri
    return main, security


def _apt_entries(text: str, deb822: bool) -> list[tuple[str, list[str]]]:
    entries: list[tuple[str, list[str]]] = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in stanza.splitlines())
                if not k.startswith("#") and v
            }
            types = fields.get("types", "").split()
            if "deb" in types and fields.get("uris"):
                entries.append((fields["uris"].split()[0], fields.get("suites", "").split()))
    else:
        for line in text.splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 3 and parts[0] == "deb":
                args = [p for p in parts[1:] if not p.startswith("[")]
                if len(args) >= 2:
                    entries.append((args[0], [args[1]]))
    return entries


class FailureWitness:
    """Follows DIB's output to say, when the build fails, what the failing script itself said.

    DIB prints ``dib-run-parts Running .../PHASE.d/SCRIPT``, then the script's
    output; when the script exits non-zero DIB's trap runs its cleanup, whose
    chatter ("Unmount ...", "INFO diskimage_builder.block_device... State
    already cleaned - no way to do anything here", its own ``+``/``++`` trace)
    ends the log. The witness keeps the last lines the running script printed
    before DIB's own words began, skipping the script's ``+`` trace lines but
    remembering the last traced command (``set -x`` with DIB_DEBUG_TRACE) for a
    script that failed without a word. Bounded memory: a few dozen lines.
    """

    KEEP = 50

    def __init__(self) -> None:
        self.in_script = False
        self.ended = False  # DIB's own output began after the script's
        self.said: list[str] = []  # the running script's own output lines
        self.last_command = ""  # the running script's last traced command
        self.outside: list[str] = []  # meaningful lines outside any script (start-up, DIB itself)

    def feed(self, text: str) -> None:
        """One line of DIB's output, timestamp already stripped."""
        line = text.strip()
        if _RUN_PARTS.search(text):
            self.in_script, self.ended, self.said, self.last_command = True, False, [], ""
            return
        if _COMPLETED.match(line):
            self.in_script = False
            return
        if not line:
            return
        if self.in_script and not self.ended:
            if _DIB_OWN.match(line):
                self.ended = True
            elif line.startswith("+"):
                self.last_command = line
            else:
                self.said = (self.said + [line])[-self.KEEP :]
            return
        if not line.startswith("+") and not _DIB_OWN.match(line):
            self.outside = (self.outside + [line])[-self.KEEP :]

    def hint(self) -> str:
        """The failing script's last line of output; else its last command; else DIB's last word."""
        if self.in_script:
            if self.said:
                return self.said[-1]
            if self.last_command:
                return f"(no message; last command: {self.last_command.lstrip('+ ')})"
            return "(the script printed nothing)"
        return self.outside[-1] if self.outside else ""


class DibBuild:
    """One run of disk-image-create producing a tar of the release's root."""

    def __init__(
        self,
        selection: ElementSelection,
        release: str,
        work_dir: Path,
        cache_dir: Path,
        log_path: Path,
        base_env: dict[str, str] | None = None,
    ) -> None:
        self.selection = selection
        self.release = release
        self.work_dir = work_dir
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.output_base = work_dir / "image"

    @property
    def tar_path(self) -> Path:
        return self.output_base.with_suffix(".tar")

    def environment(self) -> dict[str, str]:
        env = dict(self.base_env)
        env["PATH"] = search_path()
        env["ELEMENTS_PATH"] = self.selection.elements_path
        env["DIB_IMAGEUPDATE_RELEASE"] = self.release
        env["TMP_DIR"] = str(self.work_dir / "tmp")
        env.setdefault("DIB_IMAGE_CACHE", str(self.cache_dir))
        env.setdefault("DIB_RELEASE", "bookworm")
        env.setdefault("DIB_DEBOOTSTRAP_CACHE", "1")
        env.setdefault("DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE", "1")
        if "DIB_DISTRIBUTION_MIRROR" not in env or "DIB_DEBIAN_SECURITY_MIRROR" not in env:
            main, security = host_mirrors()
            if main:
                env.setdefault("DIB_DISTRIBUTION_MIRROR", main)
            if security:
                env.setdefault("DIB_DEBIAN_SECURITY_MIRROR", security)
        return env

    def command(self) -> list[str]:
        return [
            # setpriv: DIB's namespace root dies with imageupdate (SIGKILL included).
            "setpriv", "--pdeathsig", "KILL", "--",
            "unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private", "--",
            # a machine build: one run, the same tree twice (-u: an uncompressed qcow2 boots without inflating)
            "disk-image-create", "-n", *(["-u", "-t", "qcow2,tar"] if self.selection.machine else ["-t", "tar"]),
            "-o", str(self.output_base), *self.selection.requested,
        ]  # fmt: skip

    def recorded_environment(self, env: dict[str, str]) -> dict[str, str]:
        """The build inputs worth keeping in the manifest."""
        keep = {k: v for k, v in env.items() if k.startswith("DIB_")}
        keep["ELEMENTS_PATH"] = env["ELEMENTS_PATH"]
        return dict(sorted(keep.items()))

    def run(self, on_event: Callable[[DibEvent], None] | None = None) -> DibResult:
        (self.work_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        expanded: list[str] = []
        last_script = ("", "")
        witness = FailureWitness()
        start = time.monotonic()
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            log.write(f"# imageupdate: {' '.join(self.command())}\n")
            log.flush()
            proc = subprocess.Popen(
                self.command(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.work_dir,
                start_new_session=True,
            )
            assert proc.stdout is not None
            try:
                for raw in proc.stdout:
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    log.write(line + "\n")
                    text = _TIMESTAMP.sub("", line)
                    witness.feed(text)
                    if m := _EXPANDED.search(text):
                        expanded = m.group(1).split()
                    elif m := _RUN_PARTS.search(text):
                        last_script = (m.group(1), m.group(2))
                        if on_event is not None:
                            on_event(DibEvent(m.group(1), m.group(2), time.monotonic() - start))
                rc = proc.wait()
            except BaseException:
                # SIGINT/SIGTERM in imageupdate: kill the namespace's root; the
                # kernel takes the rest of DIB's tree and its mounts with it.
                proc.kill()
                proc.wait()
                log.write("# imageupdate: build interrupted, disk-image-create killed\n")
                raise
        seconds = time.monotonic() - start
        if rc != 0:
            where = "/".join(p for p in last_script if p) or "start-up"
            raise BuildFailed(
                f"disk-image-create failed in {where} (exit {rc}): {witness.hint()[:200]}; "
                f"full log: {self.log_path}",
                release=self.release,
                step=f"dib:{where}",
            )
        if not self.tar_path.is_file():
            raise BuildFailed(
                f"disk-image-create finished but wrote no {self.tar_path.name}; full log: {self.log_path}",
                release=self.release,
                step="dib",
            )
        machine = None
        if self.selection.machine:
            machine = {name: self.output_base.with_suffix(suffix) for name, suffix in MACHINE_OUTPUTS.items()}
            missing = [p.name for p in machine.values() if not p.is_file()]
            if missing:
                raise BuildFailed(
                    f"disk-image-create finished but wrote no {', '.join(missing)} for a machine image (is the "
                    f"'baremetal' element in the build and a kernel installed?); full log: {self.log_path}",
                    release=self.release,
                    step="dib",
                )
        return DibResult(self.tar_path, expanded, seconds, self.recorded_environment(env), machine)


def dib_version() -> str:
    """diskimage-builder's version, from its package metadata (no subprocess)."""
    try:
        return metadata.version("diskimage-builder")
    except metadata.PackageNotFoundError:
        return "unknown"
