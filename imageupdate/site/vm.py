"""A machine node's virtual machine: QEMU booting a release's kernel, initrd and read-only root image, with
the node's own state disk (issue 16; the node API in ``node.py`` drives it).

What QEMU gets, and why (measured on these machines, see elements/imageupdate-debian-machine):

* direct kernel boot of the release's ``vmlinuz``/``initrd``; ``root=LABEL=`` (the filesystem UUID changes
  with every build), ``ro``; ``init=`` the release's vm-init; the node's address from ``ip=`` (Debian's
  initramfs ignores it for a local root: vm-init applies it); ``net.ifnames=0`` so the NIC is ``eth0``;
* the root image ``readonly=on`` (several nodes share one file); the state disk, a raw ext4 image labelled
  ``iu-state``, read-write;
* a tap in the node's network namespace, on the site's bridge: the VM reaches only what a namespace node
  reaches;
* the serial console to ``console.log``; QMP on a unix socket: ``system_powerdown`` (vm-init syncs,
  unmounts the state and powers off), then ``quit``, then SIGKILL, each after a bound;
* TCG unless KVM is asked for (``IMAGEUPDATE_VM_ACCEL=kvm``): KVM does not run Linux guests on these
  machines. ``tb-size=64`` keeps TCG's translation cache, and with it QEMU's RSS, near 290 MB.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base.errors import InputError, OperationError
from imageupdate.base.text import tail_of
from imageupdate.images.manifest import STATE_LABEL, boot_command_line

STATE_SIZE = 1 << 30  # bytes: a sparse raw image; what the node writes is what it takes
MEMORY_MB = 512
POWERDOWN_GRACE = 30.0  # seconds vm-init gets to stop the services, sync and power off
QMP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Boot:
    """What a release boots with (its manifest's artifacts and ``boot`` section)."""

    kernel: Path
    initrd: Path
    root: Path  # root.qcow2
    root_label: str
    init: str


@dataclass(frozen=True)
class VmSpec:
    name: str
    boot: Boot
    state_disk: Path
    tap: str
    mac: str
    address: str
    gateway: str
    prefix: int
    run_dir: Path  # console.log, qmp.sock, qemu.pid
    memory_mb: int = MEMORY_MB
    accel: str = "tcg"
    cmdline: str | None = None  # the kernel command line as given (a cloud image's os_command_line); None: ip=
    extra_drives: tuple[str, ...] = ()  # more -drive values: a cloud's config drive

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"


def accel() -> str:
    wanted = os.environ.get("IMAGEUPDATE_VM_ACCEL", "tcg")
    if wanted not in ("tcg", "kvm"):
        raise InputError(f"IMAGEUPDATE_VM_ACCEL={wanted!r}: use tcg or kvm")
    return wanted


def netmask(prefix: int) -> str:
    bits = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    return ".".join(str((bits >> s) & 0xFF) for s in (24, 16, 8, 0))


def mac_for(index: int) -> str:
    """A stable, locally administered MAC per node index."""
    return f"52:54:00:1e:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


def command_line(spec: VmSpec) -> str:
    ip = f"{spec.address}::{spec.gateway}:{netmask(spec.prefix)}:{spec.name}:eth0:off"
    return f"{boot_command_line(spec.boot.root_label, spec.boot.init)} ip={ip}"


def console_tail(path: Path, lines: int = 3, width: int = 160) -> str:
    """The last ``lines`` non-empty lines of a guest's console file, as one line (see ``tail_of``)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            raw = f.read(8192)
    except OSError:
        return ""
    return tail_of(raw.decode("utf-8", "replace"), lines, width)


def qemu_command(spec: VmSpec) -> list[str]:
    accel_opt = "tcg,tb-size=64" if spec.accel == "tcg" else "kvm"  # one -accel: a second one is ignored
    return [
        "qemu-system-x86_64", "-name", spec.name, "-accel", accel_opt, "-m", f"{spec.memory_mb}M", "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(spec.boot.kernel), "-initrd", str(spec.boot.initrd),
        "-append", spec.cmdline if spec.cmdline is not None else command_line(spec),
        "-drive", f"file={spec.boot.root},if=virtio,format=qcow2,readonly=on",
        "-drive", f"file={spec.state_disk},if=virtio,format=raw,cache=writeback",
        *(arg for drive in spec.extra_drives for arg in ("-drive", drive)),
        "-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={spec.mac}",
        "-serial", f"file:{spec.console}",
        "-qmp", f"unix:{spec.qmp.name},server=on,wait=off",  # in its run directory, QEMU's cwd (see Qmp)
        "-pidfile", str(spec.pidfile),
    ]  # fmt: skip


def launch(spec: VmSpec, netns: str, log: Path, wait: float = 30.0) -> int:
    """Start QEMU for ``spec`` inside the network namespace ``netns`` (its tap is there), detached, output to
    ``log``; its pid (``ip netns exec`` execs QEMU: the same process) once its monitor answers."""
    spec.pidfile.unlink(missing_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *qemu_command(spec)], stdout=out, cwd=spec.run_dir,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + wait
    # QEMU writes its pid file before it opens the kernel, the drives and the tap, and removes it when one of
    # them fails: started means its monitor answers, which it does once the machine is made
    qmp = Qmp(spec.qmp, timeout=min(QMP_TIMEOUT, wait))
    while proc.poll() is None:
        if spec.pidfile.is_file():
            try:
                if "return" in qmp.command("query-status"):  # not {}: the end of a QEMU that just exited
                    return proc.pid
            except (OSError, ValueError, OperationError):
                pass  # not listening yet, or its greeting not sent yet
        if time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            raise OperationError(f"the VM {spec.name} did not start within {wait:.0f} s (see {log})", step="start")
        time.sleep(0.05)
    said = console_tail(log, lines=1, width=200)  # QEMU's own reason, bounded
    raise OperationError(f"QEMU exited at once for {spec.name}" + (f": {said}" if said else "") + f" (see {log})",
                         step="start")


def make_state_disk(path: Path, seed: Path | None = None, size: int = STATE_SIZE) -> None:
    """A new state disk: a sparse raw ext4 image labelled ``iu-state``, filled from ``seed`` (a directory:
    the node's authorized key under identity/) without a loop device or a mount."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
    args = ["mkfs.ext4", "-F", "-q", "-L", STATE_LABEL, *(["-d", str(seed)] if seed else []), str(tmp)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OperationError(f"mkfs.ext4 could not make the state disk {path}: "
                             f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}", step="state-disk")
    os.replace(tmp, path)


class Qmp:
    """The few QMP commands a node needs, over the VM's unix socket (one command per connection).

    A unix socket's path holds at most 107 bytes, and a run directory can be deeper than that (a site or a
    Nova instances path under a long directory). QEMU binds the socket by its name in its working directory,
    the run directory; the host connects through the directory's descriptor (``/proc/self/fd/N/qmp.sock``),
    whose path is short whatever the directory's."""

    def __init__(self, path: Path, timeout: float = QMP_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def command(self, name: str) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            directory = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY)
            try:
                s.connect(f"/proc/self/fd/{directory}/{self.path.name}")
            finally:
                os.close(directory)
            f = s.makefile("rwb")
            greeting = json.loads(f.readline())
            if "QMP" not in greeting:
                raise OperationError(f"{self.path} is not a QMP socket", step="qmp")
            for cmd in ("qmp_capabilities", name):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:  # events (SHUTDOWN, POWERDOWN...) may come before the answer
                    answer: dict[str, object] = json.loads(f.readline() or b"{}")
                    if "return" in answer or "error" in answer or not answer:
                        break
                if "error" in answer:
                    raise OperationError(f"QMP {cmd}: {answer['error']}", step="qmp")
            return answer


def stop(pid: int, qmp: Qmp, alive: Callable[[int], bool], grace: float = POWERDOWN_GRACE,
         sleep: Callable[[float], None] = time.sleep, quit_grace: float = 5.0) -> str:
    """Power the VM down cleanly (vm-init syncs and unmounts the state), else ``quit``, else SIGKILL."""
    def gone_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while alive(pid):
            if time.monotonic() >= deadline:
                return False
            sleep(0.1)
        return True

    for how, bound in (("system_powerdown", grace), ("quit", quit_grace)):
        try:
            qmp.command(how)
        except (OSError, ValueError, OperationError):
            continue
        if gone_within(bound):
            return "powered off" if how == "system_powerdown" else f"quit (did not power off within {grace:.0f} s)"
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return "already gone"
    gone_within(quit_grace)
    return "killed (QMP did not stop it)"
