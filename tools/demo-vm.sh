#!/usr/bin/env bash
# An optional demo on VM nodes: machines that boot their release's own kernel (QEMU; TCG unless
# IMAGEUPDATE_VM_ACCEL=kvm). Builds M1 and M2 as machine images (root.qcow2, vmlinuz, initrd beside the
# tree; M2 boots Debian's cloud kernel, M1 the generic one), shows that the pair needs a reboot, brings up
# 2 VM nodes on M1, writes data, rolls M2 node by node through the site's Heat (powerdown, M2's migration on
# the state disk, boot of the new kernel, gate), and reads the data back. About 6 minutes on 2 cores with TCG.
# Run tools/install.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export IMAGEUPDATE_STORE=${IMAGEUPDATE_STORE:-/var/lib/imageupdate/images}
iu=.venv/bin/imageupdate
SITE=${IMAGEUPDATE_DEMO_SITE:-/var/lib/imageupdate/demo-vm-site}
if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "installing Debian packages for VM nodes: qemu-system-x86"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null; }
fi

build() {  # build RELEASE ELEMENT..., reusing a release already in the store
    local release=$1; shift
    if $iu images show "$release" --json >/dev/null 2>&1; then
        echo "== $release is already in $IMAGEUPDATE_STORE (imageupdate images delete $release to rebuild)"
    else
        echo "== building $release as a machine image from $*"
        $iu build "$release" --os imageupdate-debian-machine $(printf -- '--element %s ' "$@")
    fi
}
build M1 sample-workload-v1
build M2 sample-workload-v2 imageupdate-kernel-cloud

echo
echo "== M1 -> M2: the kernel changes, so the nodes must boot again (the 'reboot' verdict)"
$iu images diff M1 M2 | grep -iE "kernel|action|reboot" || true

echo
echo "== a local site of 2 VM nodes on M1"
$iu site destroy --force --site "$SITE" >/dev/null
$iu site up --kind vm --nodes 2 --release M1 --site "$SITE"
addrs=$($iu site status --site "$SITE" --json | python3 -c \
    'import json,sys; print(" ".join(n["address"] for n in json.load(sys.stdin)["nodes"]))')
key="$SITE/key"
kernel() { ssh -i "$key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
    "root@$1" uname -r; }
for a in $addrs; do
    python3 -c "import sys, urllib.request as u; u.urlopen(u.Request(f'http://{sys.argv[1]}:8080/kv/owner', data=f'data of {sys.argv[1]}'.encode(), method='PUT'))" "$a"
    echo "   $a boots $(kernel "$a"), wrote its data"
done

echo
echo "== rollout M2, node by node through Heat"
$iu rollout M2 --site "$SITE"
for a in $addrs; do
    echo "   $a boots $(kernel "$a"), reads back: $(python3 -c "import sys, urllib.request as u; print(u.urlopen(f'http://{sys.argv[1]}:8080/kv/owner').read().decode())" "$a")"
done
echo
$iu status --site "$SITE"
echo "consoles: $SITE/nodes/*/console.log; ssh into a node: ssh -i $key root@${addrs%% *}"
$iu site down --site "$SITE" >/dev/null
echo "site is down (state disks and history kept); 'imageupdate site destroy --site $SITE' removes it"
