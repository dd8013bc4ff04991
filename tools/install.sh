#!/usr/bin/env bash
# Set up everything imageupdate needs on a Debian 12 host, as root:
# the Debian packages it drives and a virtualenv with imageupdate in .venv.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tools/install.sh: run as root (apt-get, and DIB needs root to build images)" >&2
    exit 2
fi

# sudo: DIB calls it even as root. debootstrap: the OS element. zstd: the
# store's image compression. util-linux: unshare for builds and nodes.
APT_PACKAGES=(sudo debootstrap squashfs-tools qemu-utils zstd util-linux
              iproute2 openssh-client git python3-venv ca-certificates)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
# pbr takes the version from git; a tarball without .git still installs.
if [ ! -d .git ]; then export PBR_VERSION=${PBR_VERSION:-0.0.0}; fi
.venv/bin/pip install -q -r requirements.txt -r test-requirements.txt
.venv/bin/pip install -q --no-deps -e .
echo "imageupdate installed: $(.venv/bin/imageupdate --version)"
# The second front door: 'openstack imageupdate ...' (the entry points the editable install registered).
if ! .venv/bin/openstack imageupdate rollout --help >/dev/null 2>&1; then
    echo "tools/install.sh: 'openstack imageupdate' does not load; see '.venv/bin/openstack imageupdate --help'" >&2
    exit 1
fi
echo "openstack plugin installed: .venv/bin/openstack imageupdate --help"
