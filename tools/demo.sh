#!/usr/bin/env bash
# The main job on one machine: build four releases of the sample workload and
# a broken one with the real disk-image-create, show what changes between R1
# and R2, bring up a local site of 3 nodes on R1, roll the broken release and
# watch it fail its first gate and roll back (its state snapshot restored),
# then upgrade R1 straight to R4: plan, config check, rehearsal, and a rollout
# through Heat that runs every intermediate release's migrations node by node.
# Run tools/install.sh first, or use the README's command.
set -euo pipefail
cd "$(dirname "$0")/.."
export IMAGEUPDATE_STORE=${IMAGEUPDATE_STORE:-/var/lib/imageupdate/images}
iu=.venv/bin/imageupdate

signed_here() {  # RELEASE: signed by this host's release key, the one the demo site trusts (OpenSSH alone)
    local key=${IMAGEUPDATE_SIGNING_KEY:-/etc/imageupdate/release_ed25519}.pub dir=$IMAGEUPDATE_STORE/$1
    [ -f "$key" ] && [ -f "$dir/manifest.json.sig" ] || return 1
    ssh-keygen -Y verify -f <(printf 'operator namespaces="imageupdate-release" %s\n' "$(cut -d' ' -f1,2 "$key")") \
        -I operator -n imageupdate-release -s "$dir/manifest.json.sig" < "$dir/manifest.json" >/dev/null 2>&1
}

build() {  # build RELEASE ELEMENT, reusing a release already in the store (signed here, with upgrade metadata)
    if signed_here "$1" && $iu images show "$1" --json 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("upgrade") else 1)'; then
        echo "== $1 is already in $IMAGEUPDATE_STORE (imageupdate images delete $1 to rebuild)"
    else
        echo "== building $1 from $2"
        $iu build "$1" --element "$2" --force
    fi
}

build R1 sample-workload-v1
build R2 sample-workload-v2
build R2-broken sample-workload-broken
build R3 sample-workload-v3
build R4 sample-workload-v4
echo
$iu images list
echo
echo "== what changes from R1 to R2"
$iu images diff R1 R2

echo
echo "== a local site: 3 nodes on R1 (namespaces on the read-only R1 tree)"
SITE=${IMAGEUPDATE_DEMO_SITE:-/var/lib/imageupdate/demo-site}
$iu site destroy --force --site "$SITE" >/dev/null
$iu site up --nodes 3 --release R1 --site "$SITE"
echo "== the site accepts releases signed by: $($iu keys list --site "$SITE" --json | python3 -c \
    'import json,sys; print(", ".join(k["name"] + " " + k["fingerprint"] for k in json.load(sys.stdin)["trusted"]))')"
$iu images verify R4 --site "$SITE"
addrs=$($iu site status --site "$SITE" --json | python3 -c \
    'import json,sys; print(" ".join(n["address"] for n in json.load(sys.stdin)["nodes"]))')
on_node() {  # on_node ADDRESS COMMAND...: what an operator does over SSH
    local a=$1; shift
    ssh -q -i "$SITE/key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes "root@$a" "$@"
}
for a in $addrs; do
    python3 -c "import sys, urllib.request as u; u.urlopen(u.Request(f'http://{sys.argv[1]}:8080/kv/greeting', data=b'written on R1', method='PUT'))" "$a"
    # the operator's config, written for R1: [storage] fsync (deprecated in R2, removed in R4)
    on_node "$a" "printf '[storage]\nfsync = true\n' > /etc/sample-workload/sample-workload.conf"
done
echo "wrote a value and R1's config on every node"
show() {
    for a in $addrs; do
        python3 -c "import sys, urllib.request as u; print('  ', sys.argv[1], u.urlopen(f'http://{sys.argv[1]}:8080/health').read().decode(), u.urlopen(f'http://{sys.argv[1]}:8080/kv/greeting').read().decode())" "$a"
    done
}

echo
echo "== rollout of the broken release R2-broken through the site's Heat: node0 gets R2's contract migration"
echo "== (0002-json-to-sqlite, after a verified snapshot), fails its gate (the release's own roundtrip test),"
echo "== nothing else is touched, and node0 goes back to R1 with its snapshot restored (exit status 1 is expected)"
if $iu rollout R2-broken --site "$SITE" --resources tools/resources.d; then
    echo "the broken release passed its gates: that is a bug" >&2
    exit 1
fi
show

echo
echo "== skip-level upgrade R1 -> R4: the path runs R2's, R3's and R4's migrations, each from its own image"
$iu plan --to R4 --site "$SITE"
echo
echo "== the config written for R1 is checked against R4 and every release before it (exit status 1 expected)"
if $iu check-config --to R4 --site "$SITE"; then
    echo "R4 accepted [storage] fsync, which it removed: that is a bug" >&2
    exit 1
fi
for a in $addrs; do
    on_node "$a" "printf '[storage]\nsync = true\n' > /etc/sample-workload/sample-workload.conf"
done
echo "replaced [storage] fsync with [storage] sync on every node"
$iu check-config --to R4 --site "$SITE"
echo
echo "== rehearsal: the whole path on a copy of node0's state; nothing on the fleet changes"
$iu rehearse --to R4 --site "$SITE"
echo
echo "== rollout R4: rehearsal, then node by node: snapshot, 0002, 0003, 0004, R4, gate"
$iu rollout R4 --site "$SITE" --resources tools/resources.d
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
