"""Build the suite's releases ahead of the tests, one after another, into the run's store.

tools/test.sh starts this in the background when it runs the whole suite (no arguments), beside the first
phase. A test still asks for its releases through the session fixtures (``build_all`` in conftest.py): a
release already built here is taken as it is, one not yet built is built by whichever process gets the build
lock first, so a test never waits behind this script for more than the build under way. Without it, builds
ran only when a test asked: a worker waited minutes for releases another could have had built while it ran
its tests, and the VM phase began with four minutes of machine builds.

Usage (tools/test.sh does this): ``IMAGEUPDATE_TEST_RUN=DIR .venv/bin/python -m tests.prebuild``. A build
that fails is reported and skipped: the test that needs the release builds it again and fails with DIB's own
error, where the test log shows it.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from tests.conftest import AHEAD, RUN_ENV, build_all


def main() -> int:
    run = os.environ.get(RUN_ENV)
    if not run:
        print(f"prebuild: {RUN_ENV} is not set: name the test run's directory (tools/test.sh does)",
              file=sys.stderr)
        return 2
    # tools/test.sh stops this when the tests end with a SIGTERM to its whole process group: the build under
    # way gets its own, cleans its staging up and exits; this waits for it, then stops
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    store = Path(run) / "store"
    store.mkdir(parents=True, exist_ok=True)
    for builds, os_element in AHEAD:
        for build in builds:
            if stopping:
                print("prebuild: stopped", flush=True)
                return 130
            started = time.monotonic()
            try:
                build_all(store, build, os_element=os_element)
            except AssertionError as exc:  # conftest.imageupdate(check=True): the build's exit and stderr
                if stopping:
                    print(f"prebuild: stopped during {build[0]}", flush=True)
                    return 130
                print(f"prebuild: {exc}\nprebuild: the test that needs {build[0]} builds it again and shows why",
                      flush=True)
                continue
            print(f"prebuild: {build[0]} ready after {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
