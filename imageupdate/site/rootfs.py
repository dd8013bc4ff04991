"""The root a release runs in: a read-only bind of its unpacked tree with the state partition at
``/mnt/state``, fresh proc/sys, tmpfs ``/run`` ``/tmp`` ``/dev`` with the few devices a program needs.

One script for both users: a node (``BOOT ... NAME /usr/lib/imageupdate/init``, inside the node's network
namespace) and a throwaway run of a release on a node's state (a migration step). It must run as PID 1 of
new mount, PID and UTS namespaces (``unshare --mount --pid --uts --fork``): everything it mounts dies with
them.

Nothing it mounts from the release or the state honours device nodes (``nodev``): a device file a crafted
image or a node's root left there opens nothing. ``/run``, ``/tmp`` and ``/dev/shm`` are also ``nosuid``.

Arguments: ROOT (an empty mount point), TREE (the unpacked release), STATE (the state directory), NAME
(the hostname), then the command to run in the root.
"""

BOOT = r"""
set -eu
root=$1 tree=$2 state=$3 name=$4
shift 4
mount --bind "$tree" "$root"
mount -o remount,bind,ro,nodev "$root"
mount --bind "$state" "$root/mnt/state"
mount -o remount,bind,nodev "$root/mnt/state"
mount -t proc proc "$root/proc"
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
exec chroot "$root" "$@"
"""
