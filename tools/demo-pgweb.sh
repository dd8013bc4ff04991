#!/usr/bin/env bash
# A second demo, on software we did not write: PostgreSQL 15 from Debian with its data on the state
# partition and an HTTP app on loopback behind nginx (elements/pgweb*). Builds PG1..PG3 with the real
# disk-image-create, brings up 3 nodes on PG1 (each initdb's its own cluster and makes its own snakeoil
# key at first boot), writes rows, rehearses PG2's SQL expand migration on a copy of a node's state
# (judged by the release's state digest), catches a migration that inserts on every run, then rolls
# PG1 -> PG2 -> PG3 (a contract migration) node by node with every built-in check, and reads the rows back.
# Run tools/install.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export IMAGEUPDATE_STORE=${IMAGEUPDATE_STORE:-/var/lib/imageupdate/images}
iu=.venv/bin/imageupdate
SITE=${IMAGEUPDATE_DEMO_SITE:-/var/lib/imageupdate/demo-pgweb-site}

build() {  # build RELEASE ELEMENT, reusing a release already in the store
    if $iu images show "$1" --json >/dev/null 2>&1; then
        echo "== $1 is already in $IMAGEUPDATE_STORE (imageupdate images delete $1 to rebuild)"
    else
        echo "== building $1 from $2"
        $iu build "$1" --element "$2"
    fi
}
build PG1 pgweb-v1
build PG2 pgweb-v2
build PG3 pgweb-v3
build PG2-rerun pgweb-rerun-insert

echo
echo "== a local site: 3 nodes on PG1"
$iu site destroy --force --site "$SITE" >/dev/null
$iu site up --nodes 3 --release PG1 --site "$SITE"
addrs=$($iu site status --site "$SITE" --json | python3 -c \
    'import json,sys; print(" ".join(n["address"] for n in json.load(sys.stdin)["nodes"]))')
for a in $addrs; do
    for i in 1 2 3; do
        python3 -c "import json, sys, urllib.request as u; u.urlopen(u.Request(f'http://{sys.argv[1]}/items', data=json.dumps({'name': f'row {sys.argv[2]} written on PG1'}).encode(), headers={'Content-Type': 'application/json'}))" "$a" "$i"
    done
done
show() {
    for a in $addrs; do
        python3 -c "import json, sys, urllib.request as u; h = json.load(u.urlopen(f'http://{sys.argv[1]}/health')); items = json.load(u.urlopen(f'http://{sys.argv[1]}/items'))['items']; print('  ', sys.argv[1], h.get('release'), len(items), 'rows:', items[0])" "$a"
    done
}
echo "wrote 3 rows on every node, through nginx"
show
echo
echo "== every built-in check on every node: PostgreSQL's shared memory and renamed processes are not stale"
$iu check --site "$SITE"
echo
echo "== rehearsal of PG2 on a copy of node0's state: its SQL migration run twice, judged by the state digest"
$iu rehearse --to PG2 --site "$SITE"
echo
echo "== a migration that inserts a row on every run (PG2-rerun): the rehearsal stops it (exit 1 expected)"
if $iu rehearse --to PG2-rerun --site "$SITE"; then
    echo "the rehearsal passed a migration that is not idempotent: that is a bug" >&2
    exit 1
fi
echo
echo "== rollout PG2 (expand: ALTER TABLE ... ADD COLUMN IF NOT EXISTS), node by node through Heat"
$iu rollout PG2 --site "$SITE"
show
echo
echo "== rollout PG3 (contract: the column 'name' becomes 'title')"
$iu rollout PG3 --site "$SITE"
show
echo
$iu status --site "$SITE"
echo "ssh into a node: ssh -i $SITE/key root@${addrs%% *}"
$iu site down --site "$SITE" >/dev/null
echo "site is down (state and history kept); 'imageupdate site destroy --site $SITE' removes it"
