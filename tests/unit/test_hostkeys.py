"""Cloud servers' SSH host keys are pinned from their console at creation, never from a connection
(trust boundary, point 4: the cloud half)."""
from __future__ import annotations

from pathlib import Path

import pytest

from imageupdate.cloud import hostkeys
from imageupdate.verify.checks import NodeTarget, _pinned, _quoted, _ssh_base

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMx1B5sB0cW1Cq0wQv1f6o8q0Yk5m3d1b0wq9yS8ZQ0a root@node0"
EC = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEc2VYz6O3Y0X8M7b9xg6Y3Fq1C8k"
      "5l0XqL0D4N5eN0QxQeM0c7e9QXo2bq4Jm0ZbQz3O8T9j1q0mF6u5Y0r3Ww= root@node0")

CLOUD_INIT = f"""[    2.1] random: crng init done
ci-info: no authorized SSH keys fingerprints found for user root.
-----BEGIN SSH HOST KEY FINGERPRINTS-----
256 SHA256:abc root@node0 (ED25519)
-----END SSH HOST KEY FINGERPRINTS-----
-----BEGIN SSH HOST KEY KEYS-----
{ED}
{EC}
-----END SSH HOST KEY KEYS-----
init: node node0 booting release R1
"""


def test_the_key_block_cloud_init_prints_is_read() -> None:
    assert hostkeys.parse_console(CLOUD_INIT) == [tuple(ED.split()[:2]), tuple(EC.split()[:2])]


@pytest.mark.parametrize("console", [
    "",
    "init: booting\n",
    f"{hostkeys.BEGIN}\n{ED}\n",  # cut short by the console's length: not a list
    f"{hostkeys.BEGIN}\nnot a key\n{hostkeys.END}\n",
    f"{hostkeys.BEGIN}\nssh-dss AAAAB3NzaC1kc3MAAACBAP1234567890abcdef root@x\n{hostkeys.END}\n",
])
def test_a_console_without_a_whole_block_of_keys_pins_nothing(console: str) -> None:
    assert hostkeys.parse_console(console) == []


def test_the_first_boots_block_counts_and_the_count_is_bounded() -> None:
    later = f"{hostkeys.BEGIN}\n{EC}\n{hostkeys.END}\n"
    assert hostkeys.parse_console(CLOUD_INIT + later)[0] == tuple(ED.split()[:2])
    many = f"{hostkeys.BEGIN}\n" + f"{ED}\n" * 1000 + f"{hostkeys.END}\n"
    assert len(hostkeys.parse_console(many)) == hostkeys.MAX_KEYS


def test_learning_waits_for_the_block_then_pins_and_forgets(tmp_path: Path) -> None:
    consoles = iter(["", "init: booting\n", CLOUD_INIT])
    slept: list[float] = []
    known = tmp_path / "known_hosts"
    keys = hostkeys.learn(lambda: next(consoles), "node0", known, sleep=slept.append, timeout=60, interval=3)
    assert len(keys) == 2 and slept == [3, 3]
    hostkeys.pin(known, "node1", [tuple(EC.split()[:2])])  # type: ignore[list-item]
    assert set(hostkeys.read(known)) == {"node0", "node1"}
    assert f"imageupdate-node0 {ED.split()[0]} {ED.split()[1]}" in known.read_text().splitlines()
    assert hostkeys.forget(known, "node0") is True
    assert hostkeys.forget(known, "node0") is False
    assert set(hostkeys.read(known)) == {"node1"}


def test_a_server_that_prints_no_keys_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(hostkeys.HostKeyUnknown) as exc:
        hostkeys.learn(lambda: "init: booting\n", "node0", tmp_path / "known_hosts", sleep=lambda _s: None,
                       timeout=0)
    assert exc.value.node == "node0" and len(exc.value.message.splitlines()) == 1
    assert not (tmp_path / "known_hosts").exists()


def test_ssh_checks_a_pinned_key_strictly_under_the_nodes_alias(tmp_path: Path) -> None:
    pinned = _ssh_base(NodeTarget("node0", "192.0.2.7", tmp_path / "key", known_hosts=tmp_path / "known_hosts"))
    assert "StrictHostKeyChecking=yes" in pinned and f'UserKnownHostsFile="{tmp_path / "known_hosts"}"' in pinned
    assert "HostKeyAlias=imageupdate-node0" in pinned and "StrictHostKeyChecking=no" not in pinned
    local = _ssh_base(NodeTarget("node0", "10.0.0.2", tmp_path / "key"))
    assert "StrictHostKeyChecking=no" in local  # a local site's node: the bridge only root on the host reaches


def test_a_fleet_path_reaches_ssh_as_one_argument_and_an_unpinned_node_is_told_apart(tmp_path: Path) -> None:
    """Seen in review: ssh expands % in UserKnownHostsFile and splits it at spaces; a node with no pin was
    reported as 'someone else may be answering'."""
    assert _quoted(Path("/var/lib/x 1/100%d/known_hosts")) == '"/var/lib/x 1/100%%d/known_hosts"'
    known = tmp_path / "known_hosts"
    hostkeys.pin(known, "node1", [tuple(ED.split()[:2])])  # type: ignore[list-item]
    assert _pinned(NodeTarget("node1", "a", tmp_path / "k", known_hosts=known))
    assert not _pinned(NodeTarget("node0", "a", tmp_path / "k", known_hosts=known))
    assert not _pinned(NodeTarget("node", "a", tmp_path / "k", known_hosts=known))  # a prefix is not a name
