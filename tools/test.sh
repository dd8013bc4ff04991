#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, types, unit tests,
# then functional tests that build real images with disk-image-create, run
# local sites and a real OpenStack control plane (root needed). Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
# the cloud path's tests start a real OpenStack control plane: MariaDB, RabbitMQ, keystone, glance, nova,
# placement (heat is already in the venv)
bash tools/openstack/install.sh
# chromium: the functional test that renders the HTML report in a headless browser; qemu-system-x86: the VM
# nodes' tests (tests/functional/test_vm.py; sites of --kind vm need it, namespace sites do not).
for pkg in chromium qemu-system-x86; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
        echo "installing Debian packages for the tests: $pkg"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null; }
    fi
done
.venv/bin/ruff check imageupdate tests bench tools/openstack
.venv/bin/mypy
# the package layers (.importlinter): an upward import fails here
.venv/bin/lint-imports
# --durations: the slowest tests in every CI log (CI stops at 90 minutes; the aim is under 60).
# Two phases. First everything but the VM guests, on two workers (pytest-xdist): most of a functional test is
# waiting (a gate's probe window, Heat's polling, a node starting), so two at once on 2 cores take little
# more than one. Each test file runs whole on one worker, in the order tests/conftest.py gives; each release
# is built once per run (see the run's directory below). Then the tests that boot TCG guests (marker vm),
# alone: beside another worker's rollouts and builds a guest took minutes to open a port and failed healthy
# gates. Pass -n 0 to run the first phase in one process.
# pytest exits 5 when it collects nothing: a phase that collects nothing is fine (tests/unit has no VM test),
# both collecting nothing fails here, as it should.
# The run's directory (tests/conftest.py, RUN_ENV): one signing key and one store of built releases for both
# phases and every process in them. For the whole suite (no arguments), tests/prebuild.py builds every release
# in it ahead of the tests, in the order the test groups first need them, so that builds run back to back and
# the VM phase finds its machine releases built; a test asks for its releases as before and takes them built.
run=$(mktemp -d /tmp/imageupdate-tests.XXXXXX)
export IMAGEUPDATE_TEST_RUN="$run"
prebuild=""
stop_prebuild() {
    [ -n "$prebuild" ] || return 0
    # its own process group (setsid): the build under way gets the SIGTERM too, and cleans its staging up
    kill -TERM -- "-$prebuild" 2>/dev/null || true
    for _ in $(seq 180); do kill -0 -- "-$prebuild" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$prebuild" 2>/dev/null || true
    echo "builds ahead of the tests ($run/prebuild.log):"
    cat "$run/prebuild.log" || true
    prebuild=""
}
trap 'stop_prebuild; rm -rf "$run" || true' EXIT
trap 'exit 130' INT TERM
if [ "$#" -eq 0 ]; then
    setsid .venv/bin/python -m tests.prebuild >"$run/prebuild.log" 2>&1 &
    prebuild=$!
fi
status=0
.venv/bin/python -m pytest -v -ra --durations=25 -n 2 --dist loadgroup --no-loadscope-reorder -m "not vm" \
    tests "$@" || status=$?
guests=0
.venv/bin/python -m pytest -v -ra --durations=25 -m vm tests "$@" || guests=$?
if [ "$status" -eq 5 ] && [ "$guests" -eq 5 ]; then exit 5; fi
[ "$status" -eq 5 ] && status=0
[ "$guests" -eq 5 ] && guests=0
[ "$status" -ne 0 ] && exit "$status"
exit "$guests"
