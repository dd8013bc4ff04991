"""The cloud path's own logic, and the errors openstacksdk gives before any cloud answers (real openstacksdk,
a clouds.yaml in a temporary directory, loopback only). Against a real cloud: tests/functional/test_cloud.py."""
from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from imageupdate.cloud import connect as cloud_connect
from imageupdate.cloud import fleet as fleet_module
from imageupdate.cloud.fleet import CloudConfig, CloudFleet, CloudNotSetUp
from imageupdate.cloud.images import image_name
from imageupdate.images.store import ImageStore
from imageupdate.verify.checks import NodeTarget

CLOUDS = """clouds:
  refused:
    auth:
      auth_url: http://127.0.0.1:1/v3
      username: a
      password: b
      project_name: c
      user_domain_name: Default
      project_domain_name: Default
"""


def test_server_options_carry_only_what_was_given() -> None:
    cfg = CloudConfig("c", "s", "m1.node", "/k")
    assert cfg.server_options() == {"flavor": "m1.node"}
    cfg = CloudConfig("c", "s", "m1.node", "/k", networks=[{"allocate_network": "none"}], key_name="fleet")
    assert cfg.server_options() == {"flavor": "m1.node", "networks": [{"allocate_network": "none"}],
                                    "key_name": "fleet"}
    assert image_name("R2") == "imageupdate-R2"


def test_a_directory_without_a_fleet_says_how_to_make_one(tmp_path: Path) -> None:
    fleet = CloudFleet(tmp_path, ImageStore(tmp_path / "store"), "c")
    with pytest.raises(CloudNotSetUp, match="imageupdate cloud up --cloud NAME"):
        fleet.node_names()
    fleet.save_config(CloudConfig("c", "imageupdate-c", "f", "/k", nodes=["node0", "node1"]))
    assert fleet.node_names() == ["node0", "node1"] and fleet.stack_name == "imageupdate-c"


def test_a_server_is_reached_at_its_access_address_else_its_first_ipv4() -> None:
    both = SimpleNamespace(access_ipv4="192.0.2.7", addresses={"net": [{"version": 4, "addr": "10.0.0.5"}]})
    only = SimpleNamespace(access_ipv4="", addresses={"net": [{"version": 6, "addr": "fd00::5"},
                                                              {"version": 4, "addr": "10.0.0.5"}]})
    none = SimpleNamespace(access_ipv4=None, addresses={})
    assert [CloudFleet._address(s) for s in (both, only, none, None)] == ["192.0.2.7", "10.0.0.5", "", ""]


def test_an_unknown_cloud_and_an_unreachable_one_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "clouds.yaml").write_text(CLOUDS)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))
    with pytest.raises(cloud_connect.UnknownCloud, match="no cloud named 'nope' in clouds.yaml") as exc:
        cloud_connect.connect("nope")
    assert exc.value.exit_code == 2
    with pytest.raises(cloud_connect.CloudUnreachable, match="cloud 'refused' does not answer at its auth_url"):
        cloud_connect.connect("refused")


def test_waiting_for_a_boot_asks_soon_then_backs_off_to_every_3_s(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed 3 s between asks cost each rebuilt server 1.5 s on average on a cloud whose servers start at
    once; now 0.5, 1, 2, then 3 s, and the answer still comes the moment the node's init has written it."""
    fleet = CloudFleet(tmp_path, ImageStore(tmp_path / "store"), "c")
    answers = iter([1, 1, 1, 1, 1, 0])  # 'test -e services.json' fails until the node has booted
    asked: list[float] = []
    now = [0.0]

    def ssh(target: NodeTarget, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        asked.append(now[0])
        return subprocess.CompletedProcess(argv, next(answers), "", "")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(fleet_module, "ssh", ssh)
    monkeypatch.setattr(CloudFleet, "target", lambda self, node: NodeTarget(node, "192.0.2.7", tmp_path / "k"))
    assert fleet.wait_booted("node0", 600, sleep=sleep, clock=lambda: now[0]) is None
    assert asked == [0.0, 0.5, 1.5, 3.5, 6.5, 9.5]


class _Starting:
    """A connection whose Glance answers no version document ``fails`` times (a Glance still starting), then
    does; Heat and Nova answer at once."""

    def __init__(self, fails: int) -> None:
        self.fails, self.asked = fails, 0

    @property
    def orchestration(self) -> object:
        return object()

    compute = orchestration

    @property
    def image(self) -> object:
        from openstack import exceptions as sdk

        self.asked += 1
        if self.asked <= self.fails:
            raise sdk.NotSupported("The image service for c:RegionOne exists but does not have any supported versions.")
        return object()


def test_an_api_still_starting_is_asked_again_then_named_in_one_line() -> None:
    """Seen in CI: Glance was in the catalog and listening, but its version discovery failed once, and
    'cloud up' died with openstacksdk's traceback. Now each API is asked again every 2 s for 60 s."""
    slept: list[float] = []
    starting = _Starting(fails=3)
    cloud_connect.require_apis(starting, "c", sleep=slept.append)
    assert starting.asked == 4 and slept == [2, 2, 2]
    down = _Starting(fails=10**6)
    with pytest.raises(cloud_connect.CloudUnreachable,
                       match=r"cloud 'c': Glance \(image\) answered no API version it speaks for 60 s \(The image "
                             r"service .* does not have any supported versions.\); check that it runs"):
        cloud_connect.require_apis(down, "c", sleep=slept.append)
    assert down.asked == 31
