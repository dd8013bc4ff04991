"""Fixtures and helpers shared by every test directory.

The releases built with the real disk-image-create are session fixtures here (not in a subdirectory's
conftest) so that every directory that needs them (``functional``, ``faults``) shares one store built once
per session; a unit test never asks for them, so ``pytest tests/unit`` builds nothing.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageupdate.base import locks, procs
from imageupdate.images import packer, signing
from imageupdate.images.manifest import (
    FILE_INDEX,
    MANIFEST,
    ROOT_IMAGE,
    Manifest,
    describe_artifact,
    write_checksums,
)
from imageupdate.images.store import ImageStore
from tests.fakeroot_tar import make_root_tar

# the run's directory, shared by both phases of tools/test.sh and every process they start: the signing key,
# the store of built releases and their build results
RUN_ENV = "IMAGEUPDATE_TEST_RUN"


def _test_signing_key() -> Path:
    """One release key per test run, as the operator's key: every build and every synthetic release is
    signed with it, and every site a test makes trusts it (never the host's own /etc/imageupdate key).
    tools/test.sh names the run's directory (``IMAGEUPDATE_TEST_RUN``): the key lives there, made by the first
    process to load this file, so both phases, their xdist workers and the builder ahead of the tests
    (tests/prebuild.py) sign and trust one key. Without it, an xdist worker takes its controller's (made when
    the controller loaded this file, before it started the workers, and removed when it exits)."""
    run = os.environ.get(RUN_ENV)
    if run:
        key = Path(run) / "keys" / "release_ed25519"
        key.parent.mkdir(parents=True, exist_ok=True)
        with locks.held(Path(run) / "keys.lock"):
            if not key.is_file():
                signing.create_key(key, "imageupdate tests")
        os.environ["IMAGEUPDATE_SIGNING_KEY"] = str(key)
        return key
    inherited = os.environ.get("IMAGEUPDATE_SIGNING_KEY")
    if os.environ.get("PYTEST_XDIST_WORKER") and inherited and Path(inherited).is_file():
        return Path(inherited)
    home = Path(tempfile.mkdtemp(prefix="imageupdate-test-keys-"))
    atexit.register(shutil.rmtree, home, True)
    key = home / "release_ed25519"
    os.environ["IMAGEUPDATE_SIGNING_KEY"] = str(key)
    signing.create_key(key, "imageupdate tests")
    return key


SIGNING_KEY = _test_signing_key()


def staged_release(directory: Path, release: str, **tar_args: object) -> Manifest:
    """Pack a synthetic root into ``directory`` as a complete release directory."""
    directory.mkdir(parents=True)
    raw = make_root_tar(directory.parent / f"{directory.name}.dib.tar", release, **tar_args)  # type: ignore[arg-type]
    facts = packer.pack(raw, directory, 1_700_000_000)
    raw.unlink()
    m = Manifest(
        release=release, built_at=f"2026-01-01T00:00:{len(release):02d}Z", build_seconds=1.0,
        elements=["x"], expanded_elements=["x"], dib_version="test", imageupdate_version="test",
        source_date_epoch=1_700_000_000, environment={}, packages=facts.packages,
        kernel=facts.kernel, services=facts.services, tests=facts.tests,
        migrations=facts.migrations, state_paths=facts.state_paths,
        files={"count": facts.file_count},
    )
    m.artifacts = {
        ROOT_IMAGE: describe_artifact(directory / ROOT_IMAGE, "tar+zstd"),
        FILE_INDEX: describe_artifact(directory / FILE_INDEX, "jsonl"),
    }
    m.write(directory)
    write_checksums(directory, [ROOT_IMAGE, FILE_INDEX, MANIFEST])
    signing.sign(directory, SIGNING_KEY)
    return m


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def publish(store: ImageStore, tmp_path: Path):  # type: ignore[no-untyped-def]
    def _publish(release: str, **tar_args: object) -> Manifest:
        with store.staging(release) as stage:
            m = staged_release(stage / "release", release, **tar_args)
            store.publish(stage / "release", release)
        return m

    return _publish


def needs_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# running the CLI, and what a test leaves behind ---------------------------------------------------------

def imageupdate(*args: str, env: dict[str, str] | None = None, check: bool = False,
                timeout: int = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "imageupdate", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"imageupdate {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def live_processes_mentioning(*needles: str) -> list[str]:
    """Live (non-zombie) processes whose command line contains any of ``needles``."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles) and procs.alive(int(p.name)):
            found.append(f"process {p.name}: {cmd[:120]}")
    return found


def mounts_mentioning(path: Path) -> list[str]:
    return [f"mount {m}" for m in Path("/proc/mounts").read_text().splitlines() if str(path) in m]


# the releases, built once per session with the real disk-image-create (root only) -------------------------

def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's directory: the one tools/test.sh names (both phases share it), else the one every pytest-xdist
    worker shares (each worker's own temporary directory is one level below it), else pytest's own."""
    if os.environ.get(RUN_ENV):
        return Path(os.environ[RUN_ENV])
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the whole run, whichever worker builds into it."""
    path = shared_dir(tmp_path_factory) / "store"
    path.mkdir(exist_ok=True)
    return path


Builds = tuple[tuple[str, ...], ...]  # (release, element, ...) each
RELEASES: Builds = (("R1", "sample-workload-v1"), ("R2", "sample-workload-v2"), ("R-broken", "sample-workload-broken"))
UPGRADE_RELEASES: Builds = (("R3", "sample-workload-v3"), ("R4", "sample-workload-v4"),
                            ("R4-badmig", "sample-workload-broken-migration"))
GATE_RELEASES: Builds = (("R-500", "sample-workload-http500"), ("R-stale", "sample-workload-stale"))
PG_RELEASES: Builds = (("PG1", "pgweb-v1"), ("PG2", "pgweb-v2"), ("PG3", "pgweb-v3"),
                       ("PG2-rerun", "pgweb-rerun-insert"))
MACHINE_RELEASES: Builds = (("M1", "sample-workload-v1"), ("M2", "sample-workload-v2", "imageupdate-kernel-cloud"),
                            ("M-broken", "sample-workload-broken"))
MACHINE_OS = "imageupdate-debian-machine"
# What tests/prebuild.py builds ahead of the tests for the whole suite, in the order the test groups first need
# them (LONGEST_FIRST below): the first tree releases, the database workload's, the upgrade path's, the gates',
# then the machine releases, ready before the VM phase starts.
AHEAD: tuple[tuple[Builds, str | None], ...] = ((RELEASES, None), (PG_RELEASES, None), (UPGRADE_RELEASES, None),
                                               (GATE_RELEASES, None), (MACHINE_RELEASES, MACHINE_OS))


def build_all(store_dir: Path, *builds: tuple[str, ...], os_element: str | None = None) -> dict[str, dict]:  # type: ignore[type-arg]
    """Build each (release, element, ...) with the real disk-image-create, once per run: the first process to
    ask builds it (under a lock, one release at a time, that the others wait on) and leaves its JSON result
    beside the store; each build's JSON result by release."""
    os_args = ["--os", os_element] if os_element else []
    built = store_dir.parent / "built"
    built.mkdir(exist_ok=True)
    results = {}
    for release, *elements in builds:
        result = built / f"{release}.json"
        with locks.held(store_dir.parent / "builds.lock"):
            if not result.exists():
                proc = imageupdate("build", release, *(a for e in elements for a in ("-e", e)), *os_args,
                                   "--store", str(store_dir), "--json", check=True)
                result.write_text(proc.stdout)
        results[release] = json.loads(result.read_text())
    return results


@pytest.fixture(scope="session")
def releases(store_dir: Path) -> Iterator[dict[str, dict]]:  # type: ignore[type-arg]
    """R1, R2 and the broken release, built once with the real disk-image-create."""
    yield build_all(store_dir, *RELEASES)


@pytest.fixture(scope="session")
def upgrade_releases(releases: dict, store_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """R3, R4 and R4-badmig (R4 with a contract migration that fails half way) on top of R1 and R2."""
    return build_all(store_dir, *UPGRADE_RELEASES)


@pytest.fixture(scope="session")
def gate_releases(releases: dict, store_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """Releases the built-in checks alone must stop (both at R2's state version): R-500 answers HTTP 500
    to everything and ships no tests; R-stale runs code from /tmp, /mnt/state and a deleted /dev/shm library."""
    return build_all(store_dir, *GATE_RELEASES)


@pytest.fixture(scope="session")
def pg_releases(store_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """The database workload (PostgreSQL 15 from Debian, an app behind nginx): PG1, PG2 (expand migration),
    PG3 (contract migration) and PG2-rerun (PG2 whose migration inserts a row on every run)."""
    return build_all(store_dir, *PG_RELEASES)


@pytest.fixture(scope="session")
def machine_releases(store_dir: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    """M1 and M2: the sample workload's v1 and v2 as machine images (root.qcow2, vmlinuz, initrd beside the
    tree), for VM nodes. M2 boots Debian's cloud kernel, M1 the generic one: the pair whose kernel differs.
    M-broken: sample-workload-broken (M2's code with a bug its own test 20-data-roundtrip finds)."""
    return build_all(store_dir, *MACHINE_RELEASES, os_element=MACHINE_OS)


# two workers (tools/test.sh runs pytest-xdist with -n 2 --dist loadgroup --no-loadscope-reorder) ------------

# Each test file is one group, run whole on one worker, so its module fixtures (a fault site, a control plane)
# are set up once; the benchmarks' smoke runs share nothing and are a group each. The tests whose VM guests run
# under TCG are one group, marked vm: tools/test.sh runs them alone, after the rest (beside another worker a
# guest was too slow to pass a healthy gate). Groups go out in this order, so that both workers end together:
# the unit tests first, beside the first builds rather than beside a worker running rollouts (a loaded machine
# stretched their few waits past their bounds); then the longest groups, those that need only the first
# releases (R1, R2, R-broken) before those that need later builds (AHEAD's order), the shortest last.
SAME_GROUP = {"functional/test_cloud_vm": "vm", "functional/test_vm": "vm",
              "functional/test_bench::test_bench_vm_runs": "vm"}
EACH_ITS_OWN = {"functional/test_bench"}
LONGEST_FIRST = ["vm", "unit", "faults/test_faults", "functional/test_cloud", "functional/test_rollout",
                 "functional/test_workloads", "functional/test_bench::test_bench_cloud_runs", "functional/test_upgrade",
                 "functional/test_bench::test_bench_build_runs", "functional/test_bench::test_bench_upgrade_runs",
                 "functional/test_verify", "functional/test_build", "functional/test_bench::test_bench_soak_runs",
                 "functional/test_guard", "functional/test_site", "functional/test_front_doors"]


def _group(item: pytest.Item) -> str:
    if item.path.parent.name == "unit":
        return "unit"
    module = f"{item.path.parent.name}/{item.path.stem}"
    test = f"{module}::{item.name}"
    return SAME_GROUP.get(test, SAME_GROUP.get(module, test if module in EACH_ITS_OWN else module))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    for item in items:
        group = _group(item)
        item.add_marker(pytest.mark.xdist_group(group))
        if group == "vm":  # tools/test.sh runs these alone, after the rest (-m vm)
            item.add_marker(pytest.mark.vm)
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: a file's tests keep their order


# what is printed after the run (CI logs keep it): the fault matrix, the benchmarks' tables ----------------

SUMMARY: list[tuple[str, str]] = []  # (title, text), in the order they were added


def after_the_run(title: str, text: str) -> None:
    """Print ``text`` under ``title`` after the run, from whichever xdist worker (or the one process) ran it."""
    SUMMARY.append((title, text))


@pytest.hookimpl(trylast=True)  # after a directory's own conftest added its part
def pytest_sessionfinish(session: pytest.Session) -> None:
    out = getattr(session.config, "workeroutput", None)  # an xdist worker: the controller prints
    if out is not None:
        out["summary"] = [list(part) for part in SUMMARY]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """An xdist worker ended: what it added comes back to be printed here (xdist's controller collects
    nothing, so it loads no conftest below this one)."""
    SUMMARY.extend((title, text) for title, text in getattr(node, "workeroutput", {}).get("summary", []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for title, text in SUMMARY:
        terminalreporter.write_sep("=", title)
        for line in text.splitlines():
            terminalreporter.write_line(line)
