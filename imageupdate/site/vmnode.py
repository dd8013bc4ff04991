"""A machine node: the node API of ``node.Node`` on a QEMU virtual machine booting its release's kernel.

The same record (``node.json``), the same intent/stop/switch/start rebuild, the same ``recover``; what
differs is the body:

* the state is a disk image (``NODE/state.img``, ext4 labelled ``iu-state``) that the VM mounts at
  ``/mnt/state``. The host mounts it at ``NODE/state`` (loop, ``nodev,nosuid,noexec``) only while the VM is
  stopped: to seed it, to check it before a start, and around ``prepare`` during a rebuild, so snapshots,
  restores and migrations run on it exactly as on a namespace node's state directory. Never both at once:
  ``start`` unmounts first (a crash mid-rebuild may have left it mounted);
* the root is the release's ``root.qcow2``, read-only, shared by every node on that release; the kernel
  and initrd are the release's own (``SITE/releases/R.machine``, private copies checked against the
  signed manifest);
* the network namespace holds a bridge joining the site's veth and the VM's tap: the guest has the node's
  address, and QEMU, running in that namespace, is found by ``ip netns pids`` like any node process;
* a stop is QMP ``system_powerdown`` (vm-init stops the services, syncs, unmounts the state and powers
  off), then ``quit``, then SIGKILL.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from imageupdate.base import confined, procs
from imageupdate.base.crashpoints import crashpoint
from imageupdate.base.errors import OperationError
from imageupdate.images.manifest import INITRD, KERNEL, ROOT_QCOW2, VM_INIT
from imageupdate.images.unpack import machine_dir
from imageupdate.images.upgrade_meta import from_tree
from imageupdate.site import vm
from imageupdate.site.node import (
    Node,
    NodeRecord,
    NodeStatus,
    declared_ports,
    declared_services,
    listening_in,
    stop_grace,
    tcp_open,
)
from imageupdate.upgrade import state as state_version

# seconds from QEMU's start to ready (TCG boots take 20 to 35 s to sshd on an idle host; with two guests and a
# rollout beside them on 2 cores, a healthy guest's service had not listened after 120 s)
BOOT_TIMEOUT = 300.0
ROOT_LABEL = "cloudimg-rootfs"


def _mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class VmNode(Node):
    kind = "vm"

    @property
    def state_disk(self) -> Path:
        return self.dir / "state.img"

    @contextmanager
    def state_mounted(self) -> Iterator[Path]:
        """The state disk mounted at ``state_dir`` for host-side work; the VM must not be running."""
        rec = self.record() if self.exists() else None
        if (rec is not None and procs.alive(rec.pid)) or self.net.pids(self.name):  # a QEMU no record names too
            raise OperationError(f"node {self.name} is running: its state disk is the VM's", node=self.name,
                                 step="state")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        already = _mounted(self.state_dir)
        if not already:
            done = subprocess.run(["mount", "-o", "loop,nodev,nosuid,noexec", str(self.state_disk),
                                   str(self.state_dir)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise OperationError(f"cannot mount {self.state_disk}: {done.stderr.strip()}", node=self.name,
                                     step="state")
        try:
            yield self.state_dir
        finally:
            if not already:
                self._unmount_state()

    def _unmount_state(self) -> None:
        if _mounted(self.state_dir):
            subprocess.run(["umount", str(self.state_dir)], capture_output=True, check=False)

    # lifecycle -------------------------------------------------------------------------------------------------

    def create(self, release: str, authorized_key: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.state_disk.exists():
            vm.make_state_disk(self.state_disk)
        with self.state_mounted():
            os.chmod(self.state_dir, 0o755)
            confined.write_bytes(self.state_dir, "identity/authorized_keys", authorized_key.encode(), mode=0o600)
            confined.chmod_dir(self.state_dir, "identity", 0o755)
            state_version.seed(self.state_dir, from_tree(self.releases_dir / release), release)
        self._save(NodeRecord(self.name, self.index, current=release), f"created on {release}")
        self.start()

    def spec(self, release: str) -> vm.VmSpec:
        boot = machine_dir(self.releases_dir, release)
        return vm.VmSpec(self.name, vm.Boot(boot / KERNEL, boot / INITRD, boot / ROOT_QCOW2, ROOT_LABEL, VM_INIT),
                         self.state_disk, self.net.tap(), vm.mac_for(self.index), self.address, self.net.gateway,
                         24, self.dir, accel=vm.accel())

    def start(self) -> None:
        rec = self.record()
        if procs.alive(rec.pid):
            return
        tree = self.releases_dir / rec.current
        boot = machine_dir(self.releases_dir, rec.current)
        if not (tree / "etc/imageupdate/release.json").is_file() or not (boot / ROOT_QCOW2).is_file():
            raise OperationError(f"release {rec.current} is not unpacked for a VM in {self.releases_dir}",
                                 node=self.name, release=rec.current, step="start")
        self._kill_strays()  # a QEMU a killed start left unrecorded: gone before the host touches its disk
        self._unmount_state()  # left mounted by a rebuild killed while migrating: the VM's from here on
        with self.state_mounted():  # and unmounted before the VM mounts it
            self._refuse_incompatible_state(rec.current, tree)
        if not self.net.netns_exists(self.name):
            self.net.create_vm_node(self.name, self.index)
        try:
            pid = vm.launch(self.spec(rec.current), self.net.netns(self.name), self.dir / "qemu.log")
        except OperationError as e:
            raise OperationError(f"node {self.name}: {e}", node=self.name, release=rec.current, step="start") from None
        crashpoint("in-start", node=self.name)  # QEMU runs, the record does not say so yet
        rec.pid, rec.wanted = pid, "running"
        self._save(rec, f"started on {rec.current} (VM)")

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> str | None:
        """Wait until SSH answers on the node's address and every declared port listens inside the VM (on any
        address: read from the guest's own /proc/net over SSH, the VM's sockets being in no namespace of the
        host's); None when ready, else what is missing."""
        ports = declared_ports(self.services())
        missing: list[str] = []

        def ready() -> bool:
            if not procs.alive(self.record().pid):
                missing[:] = ["running VM (QEMU exited)"]
                return True
            if not tcp_open(self.address, 22):
                missing[:] = [f"SSH on {self.address}:22"]
                return False
            listening = self._guest_listening()
            missing[:] = [f"port {p}" for p in ports if p not in listening]
            return not missing

        procs.wait_until(ready, timeout, interval=0.5)
        if not missing:
            return None
        tail = vm.console_tail(self.spec(self.record().current).console)
        return ", ".join(missing) + (f" (console ends: {tail})" if tail else "")

    def _guest_listening(self) -> set[int]:
        key = self.dir.parent.parent / "key"  # the site's key (site.lifecycle._ensure_key)
        done = subprocess.run(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
                               "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
                               "-o", "LogLevel=ERROR", f"root@{self.address}", "cat", "/proc/net/tcp",
                               "/proc/net/tcp6"], capture_output=True, text=True, timeout=20, check=False)
        return listening_in(done.stdout) if done.returncode == 0 else set()

    def stop(self, grace: float | None = None, wanted: str = "stopped") -> str:
        rec = self.record()
        if grace is None:
            grace = stop_grace(declared_services(self.releases_dir / rec.current)) + 10.0  # vm-init's sync
        how = vm.stop(rec.pid, vm.Qmp(self.dir / "qmp.sock"), procs.alive, grace) \
            if rec.pid is not None and procs.alive(rec.pid) else "not running"
        strays = self._kill_strays()
        if strays:
            how += f"; killed {strays} stray process{'es' if strays > 1 else ''} in its namespace"
        rec.pid, rec.wanted = None, wanted
        self._save(rec, f"stopped ({how})")
        return how

    def rebuild(self, release: str, prepare: Callable[[str, str], object] | None = None) -> dict[str, float]:
        """As a namespace node's; ``prepare`` (the state's migrations) runs with the state disk mounted."""
        if prepare is None:
            return super().rebuild(release)

        def on_disk(current: str, target: str) -> object:
            with self.state_mounted():
                return prepare(current, target)

        return super().rebuild(release, on_disk)

    def status(self) -> NodeStatus:
        rec = self.record()
        running = procs.alive(rec.pid)
        return NodeStatus(self.name, self.address, rec.current, rec.previous, rec.pending, running,
                          running and tcp_open(self.address, 22), rec.pid if running else None, paused=False)

    def release_host_hold(self) -> None:
        self._unmount_state()

    def destroy(self) -> None:
        if self.exists():
            self.stop()
        self._unmount_state()
        super().destroy()
