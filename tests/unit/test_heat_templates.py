"""The shipped Heat environments and templates say what the rollout relies on."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from imageupdate.base.datadirs import heat_templates_dir
from imageupdate.heat import chain
from imageupdate.heat.client import environment_files, split_status
from imageupdate.heat.config import HeatPaths, render_conf, render_token

TEMPLATES = heat_templates_dir()


def test_local_environment_maps_the_abstract_server_to_the_plugin() -> None:
    files, env = environment_files([TEMPLATES / "environments/local.yaml"])
    assert env["resource_registry"][chain.SERVER_TYPE] == "ImageUpdate::Local::Server"
    assert files == {}
    plugin = ast.parse((TEMPLATES / "plugins/imageupdate_local.py").read_text())
    mapping = next(f for f in plugin.body if isinstance(f, ast.FunctionDef) and f.name == "resource_mapping")
    assert "ImageUpdate::Local::Server" in ast.unparse(mapping)


def test_openstack_environment_rebuilds_nova_servers_keeping_the_ephemeral_disk() -> None:
    files, env = environment_files([TEMPLATES / "environments/openstack.yaml"])
    provider = env["resource_registry"][chain.SERVER_TYPE]
    assert provider.endswith("openstack/server.yaml") and provider in files
    template = yaml.safe_load(files[provider])
    server = template["resources"]["server"]
    assert server["type"] == "OS::Nova::Server"
    assert server["properties"]["image_update_policy"] == "REBUILD_PRESERVE_EPHEMERAL"
    # the same interface as the local plugin: name, release, options
    assert set(template["parameters"]) == {"name", "release", "options"}


def test_heat_conf_keeps_everything_in_the_site_and_on_loopback(tmp_path: Path) -> None:
    paths = HeatPaths(tmp_path / "heat")
    conf = render_conf(paths, 8004)
    assert "transport_url = fake://" in conf and "convergence_engine = true" in conf
    assert f"connection = sqlite:///{paths.database}" in conf
    assert "flavor = noauth" in conf and str(TEMPLATES / "plugins") in conf
    for line in conf.splitlines():
        if "http://" in line:
            assert "http://127.0.0.1:8004" in line, line
    catalog = render_token(8004)["token"]["catalog"]  # type: ignore[index]
    assert {e["url"] for e in catalog[0]["endpoints"]} == {"http://127.0.0.1:8004/v1/admin"}


@pytest.mark.parametrize("raw, action, status", [
    ("UPDATE_IN_PROGRESS", "UPDATE", "IN_PROGRESS"),
    ("CREATE_COMPLETE", "CREATE", "COMPLETE"),
    ("ROLLBACK_FAILED", "ROLLBACK", "FAILED"),
    ("INIT_COMPLETE", "INIT", "COMPLETE"),
])
def test_resource_status_splits_on_heats_statuses(raw: str, action: str, status: str) -> None:
    """Heat's status names hold an underscore: a rebuild in progress must read IN_PROGRESS, not PROGRESS."""
    assert split_status(raw) == (action, status)
