"""The root a release runs in: a read-only bind of its unpacked tree with the state partition at
``/mnt/state``, fresh proc/sys, tmpfs ``/run`` ``/tmp`` ``/dev`` with the few devices a program needs.

One script for both users: a node (``BOOT ... NAME /usr/lib/imageupdate/init``, inside the node's network
namespace) and a throwaway run of a release on a node's state (a migration step). It must run as PID 1 of
new mount, PID and UTS namespaces (``unshare --mount --pid --uts --fork``): everything it mounts dies with
them.

Nothing it mounts from the release or the state honours device nodes (``nodev``): a device file a crafted
image or a node's root left there opens nothing. ``/run``, ``/tmp`` and ``/dev/shm`` are also ``nosuid``.

The root is entered with ``pivot_root``, not ``chroot``: the host's root is detached from the node's
mount namespace, so root in a node cannot climb out with a second chroot; the capabilities that mount,
create devices, load modules or do raw I/O are out of the bounding set of everything the node runs.

``boot()`` gives the command: ROOT (an empty mount point), TREE (the unpacked release), STATE (the state
directory), NAME (the hostname), then the command to run in the root.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Capabilities no service needs and a root that escaped would: taken out of the bounding set of everything
# the node runs (numbers from linux/capability.h). dac_read_search: open_by_handle_at() reaches the host
# filesystem under /mnt/state ("shocker"); net_admin and net_raw: taking another node's address on the
# bridge and answering its checks; linux_immutable: files the host could not delete. Kept: chown,
# setuid/setgid, net_bind_service, sys_chroot (sshd's privilege separation), sys_ptrace (the verifier reads
# other users' /proc/PID/maps), kill, audit_write, ...
DROPPED_CAPABILITIES = {
    "dac_read_search": 2, "linux_immutable": 9, "net_admin": 12, "net_raw": 13, "sys_module": 16,
    "sys_rawio": 17, "sys_pacct": 20, "sys_admin": 21, "sys_boot": 22, "sys_time": 25, "mknod": 27,
    "audit_control": 30, "mac_override": 32, "mac_admin": 33, "syslog": 34, "wake_alarm": 35,
    "block_suspend": 36, "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}
PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

# The last step, run by the host's Python (nothing of the release runs before it): clear the login uid
# (pam_loginuid in the node's sshd could not set it without audit_control), make ROOT the root of the
# mount namespace with pivot_root(".", ".") and detach the host's root beneath it, so no chroot or ``..``
# leads back to the host; drop DROPPED_CAPABILITIES from the bounding set (those this kernel knows), clear
# the inheritable and ambient sets; exec the command there.
ENTER = r"""
import ctypes, os, sys, warnings  # os.execvp imports warnings: after the pivot the host's library is gone
root, argv = sys.argv[1], sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise SystemExit(f"node-boot: {what}: {os.strerror(e)}")
try:
    with open("/proc/self/loginuid", "w") as f:
        f.write("4294967295")
except OSError:
    pass  # no audit support in this kernel: nothing to clear
machine = os.uname().machine
if machine not in PIVOT:
    raise SystemExit(f"node-boot: no pivot_root syscall number known for {machine}")
with open("/proc/sys/kernel/cap_last_cap") as f:
    last = int(f.read())
os.chdir(root)
check(libc.syscall(PIVOT[machine], b".", b"."), "pivot_root")
check(libc.umount2(b".", 2), "detaching the host's root")  # MNT_DETACH
os.chdir("/")
for cap in CAPS:
    if cap <= last:
        check(libc.prctl(24, cap, 0, 0, 0), f"dropping capability {cap}")  # PR_CAPBSET_DROP
check(libc.prctl(47, 4, 0, 0, 0), "clearing the ambient capabilities")  # PR_CAP_AMBIENT, CLEAR_ALL
header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; twice (capabilities 0-31, 32-63)
check(libc.capget(header, data), "reading the capabilities")
data[2] = data[5] = 0
check(libc.capset(header, data), "clearing the inheritable capabilities")
os.execvp(argv[0], argv)
""".replace("CAPS", repr(sorted(DROPPED_CAPABILITIES.values()))).replace("PIVOT", repr(PIVOT_ROOT_SYSCALL))

BOOT = r"""
set -eu
root=$1 tree=$2 state=$3 name=$4 python=$5 enter=$6
shift 6
mount --bind "$tree" "$root"
mount -o remount,bind,ro,nodev "$root"
mount --bind "$state" "$root/mnt/state"
mount -o remount,bind,nodev "$root/mnt/state"
mount -t proc proc "$root/proc"
# what root may write in /proc without any capability (core_pattern, modprobe, sysrq) or read of the host
for p in sys sysrq-trigger irq bus fs; do
    if [ -e "$root/proc/$p" ]; then
        mount --bind "$root/proc/$p" "$root/proc/$p"
        mount -o remount,bind,ro "$root/proc/$p"
    fi
done
for p in kcore keys timer_list; do
    if [ -e "$root/proc/$p" ]; then mount --bind /dev/null "$root/proc/$p"; fi
done
mount -t sysfs -o ro sysfs "$root/sys"
mount -t tmpfs -o mode=0755,size=64m,nodev,nosuid tmpfs "$root/run"
mount -t tmpfs -o mode=1777,size=256m,nodev,nosuid tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,size=1m tmpfs "$root/dev"
for d in null zero full random urandom tty; do
    touch "$root/dev/$d"
    mount --bind "/dev/$d" "$root/dev/$d"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,size=16m,nodev,nosuid tmpfs "$root/dev/shm"
hostname "$name"
exec "$python" -I -S -c "$enter" "$root" "$@"
"""


def boot(label: str, root: Path, tree: Path, state: Path, name: str, argv: list[str]) -> list[str]:
    """The command that boots ``argv`` in ``tree`` (``label`` names the process in ``ps``)."""
    return ["sh", "-c", BOOT, label, str(root), str(tree), str(state), name, sys.executable, ENTER, *argv]
