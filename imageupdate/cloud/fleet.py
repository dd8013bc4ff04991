"""``CloudFleet``: the orchestrator's fleet on a real cloud. The nodes are the Nova servers of the fleet's Heat
stack (``imageupdate-NAME``, made by ``imageupdate cloud up``); what each runs is the stack's ``releases`` output;
each node's address is its server's accessIPv4 or first address; checks reach it over SSH with the fleet's key.
History, lock and reports stay in a local directory, as on the local site.

``cloud.json`` in that directory records the cloud, the stack and the server options (flavor, key name,
networks, SSH key and user) so later commands need only ``--cloud NAME``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageupdate.base.datadirs import heat_templates_dir
from imageupdate.base.errors import InputError, OperationError
from imageupdate.base.text import tail_of
from imageupdate.cloud import hostkeys, images
from imageupdate.cloud.connect import connect
from imageupdate.cloud.hostkeys import HostKeyUnknown
from imageupdate.heat import chain
from imageupdate.heat.client import HeatClient, environment_files
from imageupdate.history.db import History
from imageupdate.images import signing
from imageupdate.images.fileindex import FileEntry
from imageupdate.images.store import ImageStore
from imageupdate.rollout import stack
from imageupdate.rollout.fleet import NodeState
from imageupdate.upgrade import state
from imageupdate.upgrade.plan import UpgradePlan
from imageupdate.upgrade.rehearse import Rehearsal
from imageupdate.verify.builtin import Expectation
from imageupdate.verify.checks import GUEST_CONNECT_TIMEOUT, HOST_KEY_CHANGED, NodeTarget, ssh

DEFAULT_ROOT = Path("/var/lib/imageupdate/clouds")
STACK_TAG = "imageupdate chain"  # every chain template's description starts with it


class CloudNotSetUp(InputError):
    """A cloud command on a directory that holds no fleet (``imageupdate cloud up`` makes one)."""


class StackNotOurs(InputError):
    """The fleet's stack name is taken by a stack imageupdate did not make."""


@dataclass
class CloudConfig:
    cloud: str
    stack: str
    flavor: str
    ssh_key: str
    networks: list[dict[str, Any]] | None = None
    key_name: str | None = None
    ssh_user: str = "root"
    nodes: list[str] = field(default_factory=list)

    def server_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"flavor": self.flavor}
        if self.networks is not None:
            opts["networks"] = self.networks
        if self.key_name:
            opts["key_name"] = self.key_name
        return opts


@dataclass(frozen=True)
class CloudHeat:
    """Stands where the local site's Heat process does: a cloud's Heat never 'restarts' under us."""

    endpoint: str

    @property
    def instance(self) -> str:
        return self.endpoint


BOOTED = "/run/imageupdate/services.json"  # the node's init wrote its services' status
BLOCKED = "/run/imageupdate/blocked"  # node-migrate refused: the init starts sshd only
# Waiting for a rebuilt server to boot asks again after 0.5, 1, 2, then every 3 s: a server whose Nova driver
# starts it at once answers within the first second (a fixed 3 s cost every such node 1.5 s on average); a
# guest booting a kernel is asked no more often than before.
BOOT_POLL_FIRST = 0.5
BOOT_POLL_MAX = 3.0


class CloudFleet:
    can_rehearse = False  # the state lives on the servers; rehearse on a local site with the same releases
    migrates_in_image = True  # a server's node-migrate runs the migrations its new image ships, at boot

    def __init__(self, path: Path, store: ImageStore, cloud: str | None = None) -> None:
        self.path = path
        self.store = store
        self.history = History(path / "history.sqlite")
        self._cloud = cloud
        self._conn: Any = None
        self._client: HeatClient | None = None
        self._indexes: dict[str, dict[str, FileEntry]] = {}

    # configuration ---------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "cloud.json"

    def config(self) -> CloudConfig:
        if not self.config_path.is_file():
            raise CloudNotSetUp(f"no cloud fleet in {self.path}: make one with 'imageupdate cloud up --cloud NAME "
                                "--nodes N --release R --flavor F --ssh-key KEY'")
        return CloudConfig(**json.loads(self.config_path.read_text()))

    def save_config(self, cfg: CloudConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(asdict(cfg), indent=1) + "\n")

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = connect(self._cloud or self.config().cloud)
        return self._conn

    # what the orchestrator asks of a fleet -------------------------------------------------------------------

    @property
    def stack_name(self) -> str:
        return self.config().stack

    def node_names(self) -> list[str]:
        return list(self.config().nodes)

    def connect(self) -> tuple[HeatClient, CloudHeat]:
        if self._client is None:
            endpoint = self.conn.endpoint_for("orchestration")
            self._client = HeatClient(endpoint, session=self.conn.session)
        return self._client, CloudHeat(self._client.endpoint)

    def environment(self) -> tuple[dict[str, str], dict[str, Any]]:
        return environment_files([heat_templates_dir() / "environments" / "openstack.yaml"])

    def server_options(self) -> dict[str, Any]:
        return self.config().server_options()

    def _stack_id(self, client: HeatClient) -> str | None:
        stack = client.stack(self.stack_name)
        if stack is None:
            return None
        if not stack.description.startswith(STACK_TAG):
            raise StackNotOurs(f"stack {self.stack_name} on {self.config().cloud} was not made by imageupdate "
                               f"(its description is {stack.description[:60]!r}); name another fleet")
        return stack.id

    def _servers(self, nodes: list[str] | None = None) -> dict[str, Any]:
        """The Nova server of each node (None where there is none). server_NODE is a nested stack
        (heat_templates/openstack/server.yaml); its output server_id is the Nova server."""
        client, _ = self.connect()
        stack_id = self._stack_id(client)
        if stack_id is None:
            return {}
        resources = client.resources(stack_id)
        out = {}
        for node in nodes if nodes is not None else self.node_names():
            server_id = None
            if chain.server_name(node) in resources:
                server_id = client.attributes(stack_id, chain.server_name(node)).get("server_id") or None
            out[node] = self.conn.compute.find_server(server_id, ignore_missing=True) if server_id else None
        return out

    def states(self) -> dict[str, NodeState]:
        """What each server runs, as Nova says: the release of the Glance image it was (re)built from. (Not
        the stack's outputs: after a failed update they say what was asked, not what runs.)"""
        servers = self._servers()
        out = {}
        for n in self.node_names():
            server = servers.get(n)
            release = self._release_of(server) if server is not None else "?"
            out[n] = NodeState(n, self._address(server), release, server is not None and server.status == "ACTIVE")
        return out

    def _release_of(self, server: Any) -> str:
        image_id = (server.image or {}).get("id")
        if not image_id:
            return "?"
        image = self.conn.image.find_image(image_id, ignore_missing=True)
        return str(((image.properties if image else None) or {}).get(images.RELEASE_PROPERTY, "?"))

    def require_up(self) -> None:
        down = [n for n, s in self.states().items() if not s.running]
        if down:
            raise InputError(f"servers not ACTIVE on {self.config().cloud}: {', '.join(down)}; see 'openstack "
                             f"server list' (rollback brings failed rebuilds back)")

    def require_runnable(self, release: str) -> None:
        """Nova boots what Glance holds: nothing to check here beyond the signature (see publish)."""

    def require_exists(self) -> None:
        self.config()

    @staticmethod
    def _address(server: Any) -> str:
        if server is None:
            return ""
        if server.access_ipv4:
            return str(server.access_ipv4)
        for addrs in (server.addresses or {}).values():
            for a in addrs:
                if a.get("version") == 4:
                    return str(a["addr"])
        return ""

    @property
    def known_hosts(self) -> Path:
        return self.path / hostkeys.KNOWN_HOSTS

    def target(self, node: str) -> NodeTarget:
        """How to reach ``node``, its SSH host key checked against the pin (learned now from its console if it
        has none, e.g. a fleet made by an older imageupdate; a node that printed none is refused by SSH)."""
        cfg = self.config()
        server = self._servers([node]).get(node)
        if server is not None and node not in hostkeys.read(self.known_hosts):
            with contextlib.suppress(hostkeys.HostKeyUnknown):
                hostkeys.learn(hostkeys.console_of(self.conn, server), node, self.known_hosts, timeout=0)
        return NodeTarget(node, self._address(server), Path(cfg.ssh_key), cfg.ssh_user, self.known_hosts, guest=True)

    def wait_booted(self, node: str, timeout: float, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> str | None:
        """Nova says ACTIVE when the machine starts, not when it has booted: wait until its init wrote its
        services' status (or node-migrate's reason for starting none), over SSH with the pinned key. An
        answer with another key is not waited out: the gate's checks say what it is."""
        deadline = clock() + timeout
        said = "no answer"
        pause = BOOT_POLL_FIRST
        while True:
            target = self.target(node)
            if target.address:
                proc = ssh(target, ["test", "-e", BOOTED, "-o", "-e", BLOCKED], timeout=GUEST_CONNECT_TIMEOUT + 10,
                           shared=False)
                if proc.returncode == 0 or HOST_KEY_CHANGED in proc.stderr:
                    return None
                said = "its services have not started" if proc.returncode == 1 else \
                    (" ".join(proc.stderr.split())[:160] or f"ssh exit status {proc.returncode}")
            if clock() >= deadline:
                break
            sleep(pause)
            pause = min(pause * 2, BOOT_POLL_MAX)
        server = self._servers([node]).get(node)
        tail = tail_of(hostkeys.console_of(self.conn, server)()) if server is not None else ""
        return (f"{node} did not finish booting within {timeout:.0f} s ({said})"
                + (f"; console ends: {tail}" if tail else ""))

    def learn_host_keys(self, nodes: list[str], sleep: Callable[[float], None] = time.sleep) -> None:
        """Pin each new server's host keys from its console (it prints them on first boot)."""
        servers = self._servers(nodes)
        for node in nodes:
            if servers.get(node) is None:
                raise HostKeyUnknown(f"server {node} is not in the stack: no host key to learn", node=node,
                                     step="host-key")
            hostkeys.learn(hostkeys.console_of(self.conn, servers[node]), node, self.known_hosts, sleep)

    def forget_host_key(self, node: str) -> bool:
        self.config()
        if node not in self.node_names():
            raise InputError(f"{node} is not a node of the fleet {self.config().stack} (nodes: "
                             f"{', '.join(self.node_names())})", node=node)
        return hostkeys.forget(self.known_hosts, node)

    def expectation(self, release: str) -> Expectation:
        """What a node on ``release`` must look like; the artifact is the one its Glance image was uploaded from."""
        if release not in self._indexes:
            self._indexes[release] = self.store.file_index(release)
        manifest = self.store.manifest(release)
        role = images.root_role(manifest)
        sha = manifest.artifacts[role.artifact].sha256
        image = images.find(self.conn, release, sha, role)
        return Expectation(release, manifest, self._indexes[release], sha if image is not None else None,
                           artifact_name=role.artifact)

    def publish(self, release: str) -> str | None:
        image, uploaded = images.publish(self.conn, self.store, release, self.path)
        said = f"uploaded {', '.join(uploaded)}" if uploaded else "reused"
        return f"{said}: Glance image {image.name} ({image.id})"

    def heat_status(self) -> tuple[dict[str, Any], HeatClient | None]:
        client, heat = self.connect()
        return {"running": True, "endpoint": heat.endpoint, "cloud": self.config().cloud}, client

    def up(self, cfg: CloudConfig, release: str) -> str:
        """Create the fleet's stack: ``cfg.nodes`` servers on ``release`` (the 'adopt' operation of a cloud)."""
        if self.config_path.exists():
            raise InputError(f"{self.path} already holds the fleet {self.config().stack}; use it, or another --site")
        signing.trust_own_key(self.path)  # a fleet made here trusts this host's release key
        self.store.require_trusted(release, self.path)
        self._cloud = cfg.cloud
        client, _ = self.connect()
        if client.stack(cfg.stack) is not None:
            raise StackNotOurs(f"a stack named {cfg.stack} already exists on {cfg.cloud}; name another fleet")
        said = self.publish(release)
        self.save_config(cfg)
        current = {n: release for n in cfg.nodes}
        stack.adopt(self.history, client, cfg.stack, current, cfg.server_options(), self.environment(),
                    time.sleep, 2.0, target=release, timeout=60)
        self.learn_host_keys(cfg.nodes)
        return f"{said}; stack {cfg.stack}: {len(cfg.nodes)} servers on {release}, host keys pinned"

    # the state partition, over SSH -------------------------------------------------------------------------

    def _cat(self, node: str, path: str) -> str | None:
        proc = ssh(self.target(node), ["cat", path], timeout=60, shared=False)
        return proc.stdout if proc.returncode == 0 else None

    def state_record(self, node: str) -> state.StateRecord:
        text = self._cat(node, f"/mnt/state/{state.STATE_FILE}")
        return state.loads(text) if text else state.StateRecord()

    def state_file(self, node: str, path: str) -> str | None:
        return self._cat(node, path)

    def rehearse(self, node: str, upgrade: UpgradePlan) -> Rehearsal:
        raise OperationError("a rehearsal copies a node's state locally: on the cloud path run it on a local site "
                             "with the same releases (imageupdate rehearse), then roll out with --no-rehearse",
                             node=node, step="rehearse")
