#!/usr/bin/env bash
# What the test control plane (tools/openstack/controlplane.py) needs on top of tools/install.sh: MariaDB and
# RabbitMQ from Debian (started by the fixture itself: no service manager here), genisoimage (Nova's config
# drives, for the plane's VM servers), and the 2026.2 services that
# match openstack-heat 27.0.1 in imageupdate's venv (a dry run showed they change no installed package).
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive
PKGS=(mariadb-server rabbitmq-server genisoimage)
for pkg in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
        apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null; }
        break
    fi
done
.venv/bin/pip install -q keystone==30.0.0 glance==33.0.0 nova==34.0.0 openstack-placement==16.0.0 PyMySQL gunicorn
