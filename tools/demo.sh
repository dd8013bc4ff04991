#!/usr/bin/env bash
# The main job on one machine: build two releases of the sample workload and
# the broken one with the real disk-image-create, then show what changes
# between them, bring up a local site of 3 nodes on R1, roll R2 onto it through
# Heat node by node, then roll the broken release and watch it fail its first
# gate and roll back. Run tools/install.sh first, or use the README's command.
set -euo pipefail
cd "$(dirname "$0")/.."
export IMAGEUPDATE_STORE=${IMAGEUPDATE_STORE:-/var/lib/imageupdate/images}
iu=.venv/bin/imageupdate

build() {  # build RELEASE ELEMENT, reusing a release already in the store
    if $iu images show "$1" >/dev/null 2>&1; then
        echo "== $1 is already in $IMAGEUPDATE_STORE (imageupdate images delete $1 to rebuild)"
    else
        echo "== building $1 from $2"
        $iu build "$1" --element "$2"
    fi
}

build R1 sample-workload-v1
build R2 sample-workload-v2
build R2-broken sample-workload-broken
echo
$iu images list
echo
$iu images verify R2
echo
echo "== what changes from R1 to R2"
$iu images diff R1 R2

echo
echo "== a local site: 3 nodes on R1 (namespaces on the read-only R1 tree)"
SITE=${IMAGEUPDATE_DEMO_SITE:-/var/lib/imageupdate/demo-site}
$iu site destroy --site "$SITE" >/dev/null
$iu site up --nodes 3 --release R1 --site "$SITE"
addrs=$($iu site status --site "$SITE" --json | python3 -c \
    'import json,sys; print(" ".join(n["address"] for n in json.load(sys.stdin)["nodes"]))')
for a in $addrs; do
    python3 -c "import sys, urllib.request as u; u.urlopen(u.Request(f'http://{sys.argv[1]}:8080/kv/greeting', data=b'written on R1', method='PUT'))" "$a"
done
echo "wrote a value on every node"
show() {
    for a in $addrs; do
        python3 -c "import sys, urllib.request as u; print('  ', sys.argv[1], u.urlopen(f'http://{sys.argv[1]}:8080/health').read().decode(), u.urlopen(f'http://{sys.argv[1]}:8080/kv/greeting').read().decode())" "$a"
    done
}

echo
echo "== rollout R2 through the site's Heat: node by node, each gated on its checks"
echo "== (built-in checks, R2's shipped tests, the resource hooks of tools/resources.d; the probe measures downtime)"
$iu rollout R2 --site "$SITE" --resources tools/resources.d
show

echo
echo "== rollout of the broken release: its first node fails its gate, nothing else is touched,"
echo "== and the node is rolled back to R2 through the same chain (exit status 1 is expected)"
if $iu rollout R2-broken --site "$SITE" --resources tools/resources.d; then
    echo "the broken release passed its gates: that is a bug" >&2
    exit 1
fi
show
echo
$iu status --site "$SITE"
echo
$iu report --site "$SITE"
echo "(open it in a browser: every node's timeline, checks, downtime, and the rollback)"
echo
echo "inspect the stack with the standard client:"
echo "  eval \"\$($iu heat env --site $SITE)\" && .venv/bin/openstack stack event list \$IMAGEUPDATE_STACK"
echo "ssh into a node: ssh -i $SITE/key root@${addrs%% *}"
$iu site down --site "$SITE" >/dev/null
echo "site is down (state and history kept); 'imageupdate site up --site $SITE' brings it back, 'site destroy' removes it"
