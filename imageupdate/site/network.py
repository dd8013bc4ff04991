"""The site's network: one bridge on the host, one network namespace per node.

Names are derived from the site id (6 hex digits) so two sites on one host
never collide: bridge ``iub-ID``, namespace ``iu-ID-NODE``, host-side veth
``iuvIDNN``. Each site takes a free /24 from 10.231.0.0/16; the bridge holds
``.1``, node *n* gets ``.(10+n)``. Traffic only ever goes between the host
and these namespaces.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base import locks
from imageupdate.base.errors import InputError, OperationError

POOL = ipaddress.ip_network("10.231.0.0/16")
SUBNET_LOCK = Path("/run/imageupdate-subnets.lock")  # host-wide: sites that start at once pick apart
FIRST_HOST = 10
MAX_NODES = 240


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise OperationError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}", step="network")
    return proc


def used_subnets() -> set[ipaddress.IPv4Network]:
    out = ip("-j", "-4", "addr", "show").stdout
    used: set[ipaddress.IPv4Network] = set()
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            used.add(ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network)
    return used


def netns_pids(ns: str) -> list[int]:
    """The processes whose network namespace is ``ns`` (none when it does not exist)."""
    return [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]


@contextmanager
def picking(lock: Path = SUBNET_LOCK) -> Iterator[None]:
    """Held from picking a site's subnet until its bridge holds it: two ``site up`` at once get two subnets."""
    with locks.held(lock, mode=0o600):  # held for milliseconds
        yield


def pick_subnet() -> str:
    used = used_subnets()
    for net in POOL.subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise InputError(f"no free /24 left in {POOL} for a new site; take a site down first", step="network")


@dataclass(frozen=True)
class SiteNet:
    site_id: str
    subnet: str

    @property
    def bridge(self) -> str:
        return f"iub-{self.site_id}"

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.subnet).network_address + 1)

    def address(self, index: int) -> str:
        if not 0 <= index < MAX_NODES:
            raise InputError(f"node index {index} out of range: a site holds at most {MAX_NODES} nodes")
        return str(ipaddress.ip_network(self.subnet).network_address + FIRST_HOST + index)

    def netns(self, node: str) -> str:
        return f"iu-{self.site_id}-{node}"

    def veth(self, index: int) -> str:
        return f"iuv{self.site_id}{index:03d}"

    # bridge ------------------------------------------------------------------

    def bridge_exists(self) -> bool:
        return ip("link", "show", self.bridge, check=False).returncode == 0

    def create_bridge(self) -> None:
        if not self.bridge_exists():
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def delete_bridge(self) -> None:
        if self.bridge_exists():
            ip("link", "del", self.bridge)

    # nodes -------------------------------------------------------------------

    def pids(self, node: str) -> list[int]:
        """Every process in the node's network namespace: the node's own, or a stray instance of it."""
        return netns_pids(self.netns(node))

    def netns_exists(self, node: str) -> bool:
        return self.netns(node) in ip("netns", "list").stdout.split()

    def _fresh_netns(self, node: str, index: int) -> str:
        """The node's namespace made anew, its veth's inner end ``eth0`` in it and the outer end on the site's
        bridge; returns the namespace's name."""
        ns, veth = self.netns(node), self.veth(index)
        if self.netns_exists(node):
            self.delete_node(node, index)
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", veth, "master", self.bridge, "up")
        return ns

    def create_node(self, node: str, index: int) -> None:
        ns = self._fresh_netns(node, index)
        ip("-n", ns, "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", self.gateway)

    def tap(self) -> str:
        return "tap0"  # inside the node's own namespace: the same name in every node

    def create_vm_node(self, node: str, index: int) -> None:
        """A machine node's namespace: the veth's inner end and the VM's tap on a bridge in it, no address
        there (the guest holds the node's address). QEMU runs in this namespace: the VM reaches only what
        a namespace node reaches, and ``ip netns pids`` finds it like any node's processes."""
        ns = self._fresh_netns(node, index)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "add", "br0", "type", "bridge")
        ip("-n", ns, "tuntap", "add", "dev", self.tap(), "mode", "tap")
        for link in ("eth0", self.tap()):
            ip("-n", ns, "link", "set", link, "master", "br0", "up")
        ip("-n", ns, "link", "set", "br0", "up")

    def delete_node(self, node: str, index: int) -> None:
        ip("link", "del", self.veth(index), check=False)
        if self.netns_exists(node):
            ip("netns", "del", self.netns(node))
