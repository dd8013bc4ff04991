"""Run a release's sample service and its shipped tests from its root image.

A test helper, not the product's node: the local site (its own issue) owns
real nodes. This proves what an image build must deliver: the tree boots its
service on a read-only root with state on /mnt/state, and the release's own
post-deploy tests pass (or, for the broken release, fail).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = r"""
set -eu
tree=$1; state=$2; shift 2
ip link set lo up
mount --bind "$tree" "$tree"
mount -o remount,bind,ro "$tree"
mount --bind "$state" "$tree/mnt/state"
mount -t proc proc "$tree/proc"
mount -t tmpfs tmpfs "$tree/run"
mount -t tmpfs tmpfs "$tree/tmp"
chroot "$tree" /usr/lib/imageupdate/node-firstboot
chroot "$tree" env PYTHONPATH=/usr/lib/sample-workload python3 -m sample_workload \
    > "$state/service.log" 2>&1 &
chroot "$tree" python3 - <<'PY'
import socket, sys, time
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", 8080), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("service did not listen on :8080")
PY
for cmd in "$@"; do
    chroot "$tree" python3 -c "$cmd"
done
rc=0
for t in "$tree"/usr/share/imageupdate/tests/*; do
    name=${t##*/}
    if out=$(chroot "$tree" "/usr/share/imageupdate/tests/$name" 2>&1); then
        echo "PASS $name: $out"
    else
        echo "FAIL $name: $out"
        rc=1
    fi
done
exit $rc
"""


def extract(image: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    zstd = subprocess.Popen(["zstd", "-dc", str(image)], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "--numeric-owner", "-C", str(dest)], stdin=zstd.stdout, check=True)
    assert zstd.wait() == 0
    return dest


def run_release(tree: Path, state: Path, *python: str) -> subprocess.CompletedProcess[str]:
    """Boot the service from ``tree`` with ``state``, run snippets, then the shipped tests."""
    state.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["unshare", "--mount", "--net", "--pid", "--fork", "--propagation", "private",
         "sh", "-c", SCRIPT, "sh", str(tree), str(state), *python],
        capture_output=True, text=True, timeout=120, check=False,
    )
