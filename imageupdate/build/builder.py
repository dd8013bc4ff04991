"""The build step: elements -> DIB -> reproducible root image -> manifest -> store.

Everything happens in a staging directory of the store; the release appears
only after its checksums were recomputed and matched, by one rename. Any
failure, an interrupt or a kill leaves the store as it was.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from imageupdate import version
from imageupdate.base import locks
from imageupdate.base.errors import (
    BuildFailed,
    BuildInterrupted,
    ImageUpdateError,
    InvalidPostDeployTest,
    InvalidUpgradeMetadata,
    ReleaseExists,
)
from imageupdate.base.hostdeps import BUILD_TOOLS, require, require_root
from imageupdate.build import cache
from imageupdate.build.dib import DibBuild, dib_version
from imageupdate.build.elements import DEFAULT_OS_ELEMENT, ElementSelection, select
from imageupdate.images import packer, signing
from imageupdate.images.manifest import (
    FILE_INDEX,
    MACHINE_ARTIFACTS,
    MANIFEST,
    ROOT_IMAGE,
    STATE_LABEL,
    VM_INIT,
    Manifest,
    describe_artifact,
    write_checksums,
)
from imageupdate.images.store import ImageStore, validate_release_id, verify_directory

# Free space a slim build needs in the store (DIB's tar plus the packed image);
# IMAGEUPDATE_MIN_FREE_MB overrides it for stores known to need less or more.
DEFAULT_MIN_FREE_MB = 768


def min_free_bytes() -> int:
    value = os.environ.get("IMAGEUPDATE_MIN_FREE_MB", "")
    return (int(value) if value.isdigit() else DEFAULT_MIN_FREE_MB) * 2**20


DEFAULT_ROOT_LABEL = "cloudimg-rootfs"  # DIB's default filesystem label for a machine image's root


@dataclass
class BuildRequest:
    release: str
    elements: list[str] = field(default_factory=list)
    elements_paths: list[Path] = field(default_factory=list)
    os_element: str = DEFAULT_OS_ELEMENT
    force: bool = False
    cache_dir: Path | None = None
    signing_key: Path | None = None  # None: the operator's default key, made on first use


@dataclass
class BuildEvent:
    """Progress of a build: ``stage`` is wait (for the DIB cache lock), prepare, dib, pack, verify, sign or
    publish; ``release`` names the build, so that two builds in one log can be told apart."""

    stage: str
    detail: str = ""
    phase: str = ""
    release: str = ""


@dataclass
class BuildResult:
    release: str
    path: Path
    manifest: Manifest
    seconds: float  # the build itself, from the DIB cache lock taken to the release published
    dib_seconds: float
    pack_seconds: float
    log: Path
    lock_wait_seconds: float = 0.0  # waiting for another build's DIB cache lock, before ``seconds`` began

    def to_dict(self) -> dict[str, object]:
        return {"release": self.release, "path": str(self.path), "seconds": round(self.seconds, 2),
                "dib_seconds": round(self.dib_seconds, 2), "pack_seconds": round(self.pack_seconds, 2),
                "lock_wait_seconds": round(self.lock_wait_seconds, 2), "log": str(self.log),
                "manifest": self.manifest.to_dict()}


def source_date_epoch(paths: tuple[Path, ...]) -> int:
    """SOURCE_DATE_EPOCH, or the newest mtime among the element sources."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env and env.isdigit():
        return int(env)
    newest = 0
    for base in paths:
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                try:
                    newest = max(newest, int(os.lstat(os.path.join(dirpath, name)).st_mtime))
                except OSError:
                    continue
    return newest or 0


LOCK_WAIT_SAID = 0.5  # a wait for the DIB cache lock shorter than this is not worth a line


@dataclass
class LockWait:
    seconds: float = 0.0


@contextmanager
def _cache_lock(cache_dir: Path, notify: Callable[[BuildEvent], None]) -> Iterator[LockWait]:
    """The DIB cache is one build's at a time. A wait is said when it begins (naming the holder's pid) and
    when it ends, and measured apart from the build."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / ".lock"
    waited = LockWait()

    blocked = False

    def on_wait() -> None:
        nonlocal blocked
        blocked = True
        pid = locks.recorded_pid(path)
        notify(BuildEvent("wait", "waiting for the DIB cache lock held by another build"
                          + (f" (pid {pid})" if pid else "") + f" ({cache_dir})"))

    began = time.monotonic()
    with locks.held(path, on_wait=on_wait, record_pid=True):
        if blocked:  # a lock taken at once is no wait, however slow a loaded machine was to take it
            waited.seconds = time.monotonic() - began
        if waited.seconds >= LOCK_WAIT_SAID:
            notify(BuildEvent("wait", f"got the DIB cache lock after {waited.seconds:.1f}s"))
        yield waited


class Builder:
    def __init__(self, store: ImageStore) -> None:
        self.store = store

    def log_dir(self) -> Path:
        return self.store.root / ".logs"

    def check(self, request: BuildRequest) -> ElementSelection:
        """Everything that makes a request bad input; raises before any work."""
        validate_release_id(request.release)
        selection = select(request.elements, request.elements_paths, request.os_element)
        self.store.ensure_writable()
        if self.store.exists(request.release) and not request.force:
            raise ReleaseExists(
                f"release {request.release!r} already exists in {self.store.root}; "
                "pass --force to replace it or choose a new release id",
                release=request.release,
            )
        require(BUILD_TOOLS)
        require_root("disk-image-create chroots and mounts")
        if request.signing_key is not None or signing.default_key().exists():  # a key that cannot sign (missing,
            key = request.signing_key or signing.default_key()  # a passphrase): bad input before an hour of DIB
            signing.sign_bytes(b"imageupdate: can this key sign?", signing.require_private_key(key, create=False))
        free, need = shutil.disk_usage(self.store.root).free, min_free_bytes()
        if free < need:
            raise BuildFailed(
                f"only {free // 2**20} MiB free in {self.store.root}; a build needs about "
                f"{need // 2**20} MiB: free some space or use another --store",
                release=request.release,
                step="prepare",
            )
        return selection

    def build(
        self, request: BuildRequest, on_event: Callable[[BuildEvent], None] | None = None
    ) -> BuildResult:
        release = request.release

        def notify(e: BuildEvent) -> None:
            if on_event is not None:
                on_event(replace(e, release=release))

        selection = self.check(request)
        cache_dir = request.cache_dir or cache.default_cache()
        self.log_dir().mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC)
        log = self.log_dir() / f"build-{release}-{stamp:%Y%m%dT%H%M%SZ}.log"
        try:
            with self.store.staging(release) as stage, _cache_lock(cache_dir, notify) as waited:
                result = self._build_in(stage, request, selection, cache_dir, log, stamp, time.monotonic(), notify)
                return replace(result, lock_wait_seconds=waited.seconds)
        except ImageUpdateError:
            raise
        except KeyboardInterrupt as exc:
            raise BuildInterrupted(
                f"build of {release!r} interrupted; nothing was published (log: {log})",
                release=release,
                step="build",
            ) from exc
        except OSError as exc:
            raise BuildFailed(
                f"build of {release!r} failed: {exc.strerror or exc} "
                f"({exc.filename or self.store.root}); nothing was published (log: {log})",
                release=release,
                step="build",
            ) from exc

    def _build_in(
        self,
        stage: Path,
        request: BuildRequest,
        selection: ElementSelection,
        cache_dir: Path,
        log: Path,
        stamp: datetime,
        start: float,
        notify: Callable[[BuildEvent], None],
    ) -> BuildResult:
        release = request.release
        dropped = cache.drop_unconfirmed(cache_dir)
        if dropped:
            notify(BuildEvent("prepare", f"dropped incomplete cache {dropped[0].name}"))
        notify(BuildEvent("dib", "starting disk-image-create"))
        dib = DibBuild(selection, release, stage / "dib", cache_dir, log)
        (stage / "dib").mkdir()
        dib_result = dib.run(lambda e: notify(BuildEvent("dib", e.script, e.phase)))
        cache.confirm(cache_dir)

        notify(BuildEvent("pack", "writing reproducible root image"))
        pack_start = time.monotonic()
        out = stage / "release"
        out.mkdir()
        epoch = source_date_epoch(selection.search_path)
        facts = packer.pack(dib_result.tar, out, epoch)
        for name, made in (dib_result.machine or {}).items():
            os.replace(made, out / name)  # the same filesystem: the staging directory
        shutil.rmtree(stage / "dib", ignore_errors=True)
        pack_seconds = time.monotonic() - pack_start
        stamped = (facts.release_stamp or {}).get("release")
        if stamped != release:
            raise BuildFailed(
                f"the image is stamped {stamped!r}, not {release!r}: is the imageupdate-node "
                "element shadowed by another elements path?",
                release=release,
                step="pack",
            )

        bad_tests = packer.shipped_test_problems(facts.tests)
        if bad_tests:
            raise InvalidPostDeployTest(
                f"release {release} ships a post-deploy test that cannot run: {bad_tests[0]}"
                + (f" (and {len(bad_tests) - 1} more)" if len(bad_tests) > 1 else ""),
                release=release,
                step="pack",
            )

        if facts.upgrade_problems:
            raise InvalidUpgradeMetadata(
                f"release {release} ships invalid upgrade metadata: {facts.upgrade_problems[0]}"
                + (f" (and {len(facts.upgrade_problems) - 1} more)" if len(facts.upgrade_problems) > 1 else ""),
                release=release,
                step="pack",
            )

        manifest = Manifest(
            release=release,
            built_at=stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            build_seconds=0.0,
            elements=selection.requested,
            expanded_elements=sorted(dib_result.expanded_elements),
            dib_version=dib_version(),
            imageupdate_version=version(),
            source_date_epoch=epoch,
            environment=dib_result.environment,
            packages=facts.packages,
            kernel=facts.kernel,
            services=facts.services,
            tests=facts.tests,
            migrations=facts.migrations,
            state_paths=facts.state_paths,
            upgrade=facts.upgrade,
            files={
                "count": facts.file_count,
                "total_size": facts.total_size,
                "uncompressed_tar_size": facts.uncompressed_size,
            },
        )
        manifest.artifacts = {
            ROOT_IMAGE: describe_artifact(out / ROOT_IMAGE, "tar+zstd"),
            FILE_INDEX: describe_artifact(out / FILE_INDEX, "jsonl"),
        }
        if dib_result.machine:
            if facts.kernel is None:
                raise BuildFailed(f"release {release} was built as a machine image but has no kernel in /boot",
                                  release=release, step="pack")
            manifest.artifacts |= {name: describe_artifact(out / name, fmt) for name, fmt in MACHINE_ARTIFACTS.items()}
            manifest.boot = {"root_label": dib_result.environment.get("DIB_ROOT_LABEL", DEFAULT_ROOT_LABEL),
                             "init": VM_INIT, "state_label": STATE_LABEL}
        manifest.build_seconds = round(time.monotonic() - start, 2)
        manifest.write(out)
        write_checksums(
            out, [*manifest.artifacts, MANIFEST], {k: a.sha256 for k, a in manifest.artifacts.items()}
        )

        notify(BuildEvent("verify", "recomputing checksums"))
        self._verify_staged(out, manifest)
        notify(BuildEvent("sign", str(request.signing_key or signing.default_key())))
        signing.sign(out, self._key(request))
        notify(BuildEvent("publish", str(self.store.path(release))))
        path = self.store.publish(out, release, force=request.force)
        return BuildResult(
            release=release,
            path=path,
            manifest=manifest,
            seconds=time.monotonic() - start,
            dib_seconds=dib_result.seconds,
            pack_seconds=pack_seconds,
            log=log,
        )

    @staticmethod
    def _key(request: BuildRequest) -> Path:
        if request.signing_key is not None:
            return signing.require_private_key(request.signing_key, create=False)
        return signing.require_private_key(signing.default_key(), create=True)

    def _verify_staged(self, out: Path, manifest: Manifest) -> None:
        _checked, problems = verify_directory(out, manifest)
        if problems:
            raise BuildFailed(
                f"the staged release failed verification: {'; '.join(problems)}; "
                "check the disk under the store",
                release=manifest.release,
                step="verify",
            )
