"""The cloud path against a real OpenStack control plane on this machine (needs root; ~1 min to start).

``tools/openstack/controlplane.py`` runs Keystone, Glance, Placement, Nova and Heat on MariaDB and RabbitMQ, with
a Nova driver whose servers are the nodes of a local site: a Nova rebuild with preserve_ephemeral really swaps a
node's release and keeps its state partition. imageupdate drives it as any cloud: clouds.yaml, Glance, Heat's
OS::Nova::Server, signals through heatclient with Keystone auth.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.functional.conftest import imageupdate, live_processes_mentioning
from tests.functional.test_rollout import query, three_node_site
from tests.functional.test_site import health, http

pytestmark = pytest.mark.functional
ROOT = Path(__file__).resolve().parents[2]
CLOUD = "imageupdate-test"


@pytest.fixture(scope="module")
def plane(releases: dict, store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # type: ignore[type-arg]
    """A local site of 2 nodes (the servers' bodies) and a control plane whose Nova drives them."""
    base = tmp_path_factory.mktemp("cloud")
    for site in three_node_site(base / "site", store_dir, nodes=2):
        plane_dir = base / "plane"
        ctl = [sys.executable, str(ROOT / "tools/openstack/controlplane.py")]
        proc = subprocess.run([*ctl, "start", str(plane_dir), str(site), str(store_dir)], capture_output=True,
                              text=True, timeout=900, check=False)
        try:
            assert proc.returncode == 0, proc.stdout + proc.stderr
            env = {"OS_CLIENT_CONFIG_FILE": str(plane_dir / "clouds.yaml")}
            yield {"site": site, "dir": plane_dir, "env": env, "fleet": base / "fleet", "store": store_dir}
        finally:
            stop = subprocess.run([*ctl, "stop", str(plane_dir)], capture_output=True, text=True, timeout=300,
                                  check=False)
            assert stop.returncode == 0, stop.stdout + stop.stderr
            assert not live_processes_mentioning(str(plane_dir))


def cloud(p: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return imageupdate(*args, "--cloud", CLOUD, "--site", str(p["fleet"]), "--store", str(p["store"]), "--json",
                       env=p["env"])


def openstack(p: dict[str, Any], *args: str) -> Any:
    proc = subprocess.run([str(Path(sys.executable).parent / "openstack"), "--os-cloud", CLOUD, *args, "-f", "json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **p["env"]}, check=True)
    return json.loads(proc.stdout)


def servers(p: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per server name: its id and the Glance image Nova says it runs."""
    return {s["Name"]: {"id": s["ID"], "image": s["Image"], "status": s["Status"]}
            for s in openstack(p, "server", "list")}


def test_a_cloud_rollout_rebuilds_the_servers_in_place_and_keeps_their_state(plane: dict[str, Any]) -> None:
    up = cloud(plane, "cloud", "up", "--nodes", "2", "--release", "R1", "--flavor", "imageupdate-node",
               "--ssh-key", str(plane["site"] / "key"), "--network", "none")
    assert up.returncode == 0, up.stderr
    before = servers(plane)
    assert sorted(before) == ["node0", "node1"]
    assert pinned(plane) == published(plane)  # host keys learned from each console, not from a connection
    assert {s["image"] for s in before.values()} == {"imageupdate-R1"}
    addrs = {n["name"]: n["address"] for n in json.loads(cloud(plane, "status").stdout)["nodes"]}
    for name, addr in addrs.items():
        http(addr, "/kv/owner", f"data of {name}".encode(), "PUT")
    proc = cloud(plane, "rollout", "R2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded"
    after = servers(plane)
    assert {n: s["id"] for n, s in after.items()} == {n: s["id"] for n, s in before.items()}  # rebuilt, not replaced
    assert {s["image"] for s in after.values()} == {"imageupdate-R2"}
    for name, addr in addrs.items():
        assert health(addr)["release"] == "R2"
        assert http(addr, "/kv/owner") == f"data of {name}".encode()
    status = json.loads(cloud(plane, "status").stdout)
    assert {n["name"]: n["release"] for n in status["nodes"]} == {"node0": "R2", "node1": "R2"}
    checks = query(plane["fleet"], "SELECT node, name, ok FROM checks WHERE rollout = ?", result["rollout"]["id"])
    assert ("node1", "test:20-data-roundtrip", 1) in [tuple(c) for c in checks]
    log = [r["message"] for r in query(plane["fleet"], "SELECT message FROM log WHERE rollout = ?",
                                       result["rollout"]["id"])]
    assert any(m.startswith("uploaded root: Glance image imageupdate-R2") for m in log)


def test_the_broken_release_fails_its_first_gate_and_the_servers_come_back(plane: dict[str, Any]) -> None:
    proc = cloud(plane, "rollout", "R-broken")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["status"] == "rolled-back" and "test:20-data-roundtrip" in result["reason"]
    assert result["nodes"] == {"node0": "R2", "node1": "R2"}
    assert {s["image"] for s in servers(plane).values()} == {"imageupdate-R2"}
    touched = query(plane["fleet"], "SELECT node FROM steps WHERE rollout = ? AND step = 'rebuild' AND "
                                    "status != 'pending'", result["rollout"]["id"])
    assert [r["node"] for r in touched] == ["node0"]  # the first gate failed: nothing else was rebuilt


def test_a_second_run_reuses_the_glance_image(plane: dict[str, Any]) -> None:
    back = cloud(plane, "rollback", "--to", "R1")
    assert back.returncode == 0, back.stderr
    again = cloud(plane, "rollout", "R2")
    assert again.returncode == 0, again.stderr
    rid = json.loads(again.stdout)["rollout"]["id"]
    log = [r["message"] for r in query(plane["fleet"], "SELECT message FROM log WHERE rollout = ?", rid)]
    assert any(m.startswith("reused: Glance image imageupdate-R2") for m in log)
    names = [i["Name"] for i in openstack(plane, "image", "list")]
    assert names.count("imageupdate-R2") == 1


def pinned(p: dict[str, Any]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in (p["fleet"] / "known_hosts").read_text().splitlines():
        if not line.startswith("#"):
            alias, kind, key = line.split()
            out.setdefault(alias.removeprefix("imageupdate-"), set()).add(f"{kind} {key}")
    return out


def published(p: dict[str, Any]) -> dict[str, set[str]]:
    """The host keys each node holds on its state partition (what its sshd presents)."""
    return {f"node{i}": {" ".join(k.read_text().split()[:2])
                         for k in (p["site"] / f"nodes/node{i}/state/identity/ssh").glob("*.pub")} for i in range(2)}


def test_a_server_answering_with_another_host_key_fails_its_gate(plane: dict[str, Any], tmp_path: Path) -> None:
    """Trust boundary, point 4: whoever answers on a server's address with another host key decides nothing;
    the gate fails and says why. A server replaced on purpose is re-learned from its console."""
    known = plane["fleet"] / "known_hosts"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    impostor = (tmp_path / "impostor.pub").read_text().split()
    good = known.read_text()
    known.write_text("".join(f"imageupdate-node0 {impostor[0]} {impostor[1]}\n" if line.startswith("imageupdate-node0 ")
                             else line + "\n" for line in good.splitlines()))
    proc = cloud(plane, "check", "node0")
    assert proc.returncode == 1
    said = proc.stderr.strip().splitlines()
    assert len(said) == 1 and "SSH host key" in said[0] and "forget-host-key node0" in said[0], proc.stderr
    assert cloud(plane, "check", "node1").returncode == 0  # the others are still trusted
    proc = cloud(plane, "cloud", "forget-host-key", "node0")
    assert proc.returncode == 0, proc.stderr
    proc = cloud(plane, "check", "node0")
    assert proc.returncode == 0, proc.stderr
    assert pinned(plane) == published(plane)


def test_what_a_cloud_user_gets_wrong_is_said_in_one_line(plane: dict[str, Any], tmp_path: Path) -> None:
    unknown = imageupdate("status", "--cloud", "no-such-cloud", "--site", str(tmp_path / "x"), env=plane["env"])
    # no fleet there yet: the directory is checked first
    assert unknown.returncode == 2
    up = imageupdate("cloud", "up", "--cloud", "no-such-cloud", "--nodes", "1", "--release", "R1", "--flavor", "f",
                     "--ssh-key", str(plane["site"] / "key"), "--site", str(tmp_path / "y"),
                     "--store", str(plane["store"]), env=plane["env"])
    assert up.returncode == 2 and "no cloud named 'no-such-cloud' in clouds.yaml" in up.stderr
    text = (plane["dir"] / "clouds.yaml").read_text()
    bad = tmp_path / "clouds.yaml"
    bad.write_text(text.replace("imageupdate-test:", "wrong-password:", 1).replace("password: imageupdate-test",
                                                                                 "password: nope")
                   + text.replace("clouds:\n", "").replace("imageupdate-test:", "elsewhere:", 1)
                   .replace("RegionOne", "Elsewhere"))
    env = {"OS_CLIENT_CONFIG_FILE": str(bad)}
    for name, said in (("wrong-password", "refused its credentials"), ("elsewhere", "endpoint in its catalog")):
        proc = imageupdate("cloud", "up", "--cloud", name, "--nodes", "1", "--release", "R1", "--flavor", "f",
                           "--ssh-key", str(plane["site"] / "key"), "--site", str(tmp_path / name),
                           "--store", str(plane["store"]), env=env)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    # a stack of that name that imageupdate did not make
    tpl = tmp_path / "other.yaml"
    tpl.write_text("heat_template_version: 2021-04-16\nresources: {}\n")
    subprocess.run([str(Path(sys.executable).parent / "openstack"), "--os-cloud", CLOUD, "stack", "create", "-t",
                    str(tpl), "--wait", "somebody-elses"], capture_output=True, text=True, timeout=120,
                   env={**os.environ, **plane["env"]}, check=True)
    proc = imageupdate("cloud", "up", "--cloud", CLOUD, "--nodes", "1", "--release", "R1", "--flavor", "f",
                       "--ssh-key", str(plane["site"] / "key"), "--stack", "somebody-elses",
                       "--site", str(tmp_path / "z"), "--store", str(plane["store"]), env=plane["env"])
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert not (tmp_path / "z" / "cloud.json").exists()
