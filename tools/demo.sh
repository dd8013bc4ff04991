#!/usr/bin/env bash
# The main job on one machine: build two releases of the sample workload and
# the broken one with the real disk-image-create, then show what changes
# between them. (The local site and the Heat rollout extend this demo as
# they land.) Run tools/install.sh first, or use the README's command.
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
