"""The local site as the orchestrator sees it (``imageupdate.rollout.fleet.Fleet``): its nodes, what they
run, its ephemeral Heat."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imageupdate.base import confined, procs
from imageupdate.base.datadirs import heat_templates_dir
from imageupdate.heat.client import HeatClient, environment_files
from imageupdate.heat.service import HeatProcess, HeatService
from imageupdate.history.db import History
from imageupdate.images.fileindex import FileEntry
from imageupdate.images.store import ImageStore
from imageupdate.images.unpack import ensure_release, unpacked_from
from imageupdate.images.upgrade_meta import STATE_DIGEST, Migration, from_manifest
from imageupdate.rollout.fleet import NodeState, SiteNotUp
from imageupdate.site.site import LocalSite
from imageupdate.site.vmnode import VmNode
from imageupdate.upgrade import sandbox, state
from imageupdate.upgrade.migrate import STEP_TIMEOUT
from imageupdate.upgrade.plan import UpgradePlan
from imageupdate.upgrade.rehearse import STATE_DIGEST_TIMEOUT, Rehearsal, copy_state, rehearse
from imageupdate.verify.builtin import Expectation
from imageupdate.verify.checks import NodeTarget, ssh


class LocalFleet:

    def __init__(self, site: LocalSite) -> None:
        self.site = site
        self.heat = HeatService(site.path / "heat")
        self.history = History(site.path / "history.sqlite")
        self._indexes: dict[str, dict[str, FileEntry]] = {}  # release -> its file index, read once

    @property
    def path(self) -> Path:
        return self.site.path

    def require_runnable(self, release: str) -> None:
        self.site.require_runnable(release)

    migrates_in_image = False  # the host's migrator runs every hop from each release's own image

    @property
    def can_rehearse(self) -> bool:
        """A VM node's state is its VM's disk while it runs: no consistent copy can be taken beside it."""
        return self.site.kind != "vm"

    @property
    def store(self) -> ImageStore:
        return self.site.store

    @property
    def stack_name(self) -> str:
        return f"imageupdate-{self.site.config()['id']}"

    def node_names(self) -> list[str]:
        return [n.name for n in self.site.nodes()]

    def states(self) -> dict[str, NodeState]:
        return {s.name: NodeState(s.name, s.address, s.pending or s.current, s.running, s.paused,
                                  s.pending is not None)
                for s in self.site.status().nodes}

    def require_up(self) -> None:
        down = [s.name for s in self.site.status().nodes if not s.running]
        if down:
            raise SiteNotUp(f"site {self.path} is not up (not running: {', '.join(down)}); "
                            f"start it with 'imageupdate site up --site {self.path}'")

    def server_options(self) -> dict[str, Any]:
        return {"site": str(self.site.path), "store": str(self.store.root)}

    def environment(self) -> tuple[dict[str, str], dict[str, Any]]:
        return environment_files([heat_templates_dir() / "environments" / "local.yaml"])

    def target(self, node: str) -> NodeTarget:
        # a namespace node's root is the release tree unpacked from its checked artifact, bound read-only
        return NodeTarget(node, self.site.node(node).address, self.site.path / "key",
                          root_verified=self.site.kind != "vm", guest=self.site.kind == "vm")

    def wait_booted(self, node: str, timeout: float) -> str | None:
        """A local node's rebuild returns once it is ready (``site rebuild`` waits): nothing to wait for."""
        return None

    def expectation(self, release: str) -> Expectation:
        """What a node on ``release`` must look like: the store's manifest and file index, and the
        artifact the site unpacked the release from (the file index is read once per release)."""
        if release not in self._indexes:
            self._indexes[release] = self.store.file_index(release)
        return Expectation(release, self.store.manifest(release), self._indexes[release],
                           unpacked_from(self.site.path / "releases", release))

    def require_exists(self) -> None:
        self.site.config()  # SiteNotFound

    def publish(self, release: str) -> str | None:
        """Nothing to upload: the site unpacks releases from the store when a node needs one."""
        return None

    def heat_status(self) -> tuple[dict[str, Any], HeatClient | None]:
        proc = self.heat.running()
        if proc is None:
            return {"running": False}, None
        return {"running": True, "pid": proc.pid, "endpoint": proc.endpoint}, \
            HeatClient(proc.endpoint, token=self.heat.secret())

    def connect(self) -> tuple[HeatClient, HeatProcess]:
        proc = self.heat.ensure()
        return HeatClient(proc.endpoint, token=self.heat.secret()), proc

    def state_record(self, node: str) -> state.StateRecord:
        """The node's state version and migration journal, as kept on its state partition."""
        n = self.site.node(node)
        if isinstance(n, VmNode):
            text = self._vm_state_file(n, state.STATE_FILE)
            return state.loads(text) if text else state.StateRecord()
        return state.read(n.state_dir)

    def state_file(self, node: str, path: str) -> str | None:
        """A file of the node's state partition, by its path on the node (a registered state path)."""
        n = self.site.node(node)
        release = n.record().current
        state_paths = self.store.manifest(release).state_paths
        if not any(path == p or path.startswith(p.rstrip("/") + "/") for p in state_paths):
            return None
        if isinstance(n, VmNode):
            return self._vm_state_file(n, path.lstrip("/"))
        try:  # the node controls that tree: a link it planted there is refused (confined.Escape), not followed
            return confined.read_text(n.state_dir, path.lstrip("/"))
        except OSError:
            return None

    def _vm_state_file(self, n: VmNode, rel: str) -> str | None:
        """A VM node's state file: over SSH while it runs (the disk is the VM's), else from its disk mounted
        here; either way resolved inside the node's tree."""
        if n.status().running:
            proc = ssh(self.target(n.name), ["cat", "--", f"/mnt/state/{rel}"], timeout=60, shared=False)
            return proc.stdout if proc.returncode == 0 else None
        with n.state_mounted():
            try:
                return confined.read_text(n.state_dir, rel)
            except OSError:
                return None

    def rehearse(self, node: str, upgrade: UpgradePlan, step_timeout: float = STEP_TIMEOUT) -> Rehearsal:
        """``upgrade``'s migrations on a copy of ``node``'s state (taken with the node frozen for the copy)."""
        n = self.site.node(node)
        work = self.path / "upgrade" / "rehearsal" / node

        def copy(dst: Path) -> None:
            with procs.frozen(n.record().pid):
                copy_state(n.state_dir, dst)

        def run_step(step: Migration, state_dir: Path) -> sandbox.RunResult:
            tree = ensure_release(self.store, step.release, self.path / "releases", self.path)
            return sandbox.run(tree, state_dir, [step.path], work / "sandbox", step_timeout)

        def prepare() -> None:
            for release in upgrade.releases:
                ensure_release(self.store, release, self.path / "releases", self.path)

        def digest_step(release: str, state_dir: Path) -> sandbox.RunResult | None:
            """The release's state digest, if its tree ships one (lexists: it may be a symlink into the tree)."""
            tree = ensure_release(self.store, release, self.path / "releases", self.path)
            if not os.path.lexists(tree / STATE_DIGEST.lstrip("/")):
                return None
            return sandbox.run(tree, state_dir, [STATE_DIGEST], work / "sandbox", STATE_DIGEST_TIMEOUT, split=True)

        volatile: dict[str, tuple[str, ...]] = {}
        for release in upgrade.releases:
            meta = from_manifest(self.store.manifest(release).upgrade)
            volatile[release] = meta.volatile if meta is not None else ()
        return rehearse(node, upgrade, copy, work, run_step, prepare, digest_step, volatile)
