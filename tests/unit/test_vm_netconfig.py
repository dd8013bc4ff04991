"""A booted node on a cloud reads its network, hostname and keys from the config drive (vm-netconfig, shipped
in the machine element and run by vm-init when the kernel has no ip=): everything in the drive is hostile."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scripts import load_script

nc = load_script("imageupdate-debian-machine/static/usr/lib/imageupdate/vm-netconfig", "vm_netconfig")
MAC0, MAC1 = "52:54:00:1e:00:00", "52:54:00:1e:00:01"
NETWORK = {
    "links": [{"id": "tap0", "type": "phy", "ethernet_mac_address": MAC1.upper()}],
    "networks": [{"id": "net0", "link": "tap0", "type": "ipv4", "ip_address": "10.77.3.12",
                  "netmask": "255.255.255.0",
                  "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.77.3.1"},
                             {"network": "10.9.0.0", "netmask": "255.255.0.0", "gateway": "10.77.3.254"}]}],
}


def test_the_first_ipv4_network_goes_on_the_interface_with_its_links_mac() -> None:
    cmds, said = nc.plan(NETWORK, {MAC0: "eth0", MAC1: "eth1"})
    assert cmds == [["ip", "addr", "replace", "10.77.3.12/24", "dev", "eth1"], ["ip", "link", "set", "eth1", "up"],
                    ["ip", "route", "replace", "default", "via", "10.77.3.1", "dev", "eth1"],
                    ["ip", "route", "replace", "10.9.0.0/16", "via", "10.77.3.254", "dev", "eth1"]]
    assert said == []


@pytest.mark.parametrize("net, expected", [
    ({"ip_address": "10.0.0.1; reboot", "netmask": "255.255.255.0"}, "no valid ip_address"),
    ({"ip_address": "10.0.0.1", "netmask": "-f"}, "no valid ip_address"),
    ({"type": "ipv4_dhcp"}, "asks for DHCP"),
    ({"link": "nowhere"}, "no interface"),
])
def test_a_network_that_cannot_be_applied_is_said_and_runs_nothing(net: dict, expected: str) -> None:  # type: ignore[type-arg]
    base = dict(NETWORK["networks"][0])  # type: ignore[index]
    base.update(net)
    cmds, said = nc.plan({"links": NETWORK["links"], "networks": [base]}, {MAC1: "eth0"})
    assert cmds == [] and any(expected in s for s in said), said


def test_a_route_that_is_not_an_address_is_skipped() -> None:
    net = dict(NETWORK["networks"][0])  # type: ignore[index]
    net["routes"] = [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "$(id)"}]
    cmds, said = nc.plan({"links": NETWORK["links"], "networks": [net]}, {MAC1: "eth0"})
    assert [c[1] for c in cmds] == ["addr", "link"] and said == ["a route that is not network/netmask/gateway: skipped"]


def test_interfaces_by_mac_from_sysfs(tmp_path: Path) -> None:
    for dev, mac in (("lo", "00:00:00:00:00:00"), ("eth0", MAC0), ("eth1", "not a mac")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "address").write_text(mac + "\n")
    assert nc.interfaces(tmp_path) == {MAC0: "eth0"}


def test_only_well_formed_public_keys_are_written_and_only_when_changed(tmp_path: Path) -> None:
    good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl operator"
    meta = {"public_keys": {"k1": good, "k2": "ssh-ed25519 AAAA\ncommand=\"/bin/sh\" ssh-rsa AAAA",
                            "k3": "from=\"*\" " + good, "k4": 7}}
    keys = nc.public_keys(meta)
    assert keys == [good]
    path = tmp_path / "identity/authorized_keys"
    assert nc.write_keys(keys, path) is True and path.read_text() == good + "\n"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert nc.write_keys(keys, path) is False


def test_a_drive_with_garbage_json_configures_nothing(tmp_path: Path) -> None:
    (tmp_path / "n.json").write_bytes(b"\xff[not json")
    assert nc.read_json(tmp_path / "n.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert nc.read_json(tmp_path / "list.json") == {}
    assert nc.plan({}, {}) == ([], ["no ipv4 network in network_data.json"])
