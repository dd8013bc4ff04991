"""The files an ephemeral local Heat runs from, all inside ``SITE/heat/``.

``heat.conf`` (noauth, ``fake://`` transport, convergence engine, SQLite in the site), a paste file with the
``noauth`` pipeline only, behind the site's secret (``imageupdate.heat.secret``), and the token document the
noauth middleware hands to the engine (as TripleO's ``heat_launcher`` did). Rendering touches nothing but these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base.datadirs import heat_templates_dir
from imageupdate.heat import secret

PROJECT = "admin"

API_PASTE = """\
[composite:heat-api]
use = egg:Paste#urlmap
/: api
/healthcheck: healthcheck

[composite:api]
paste.composite_factory = heat.api:pipeline_factory
noauth = request_id sitesecret faultwrap noauth context http_proxy_to_wsgi versionnegotiation apiv1app

[app:apiv1app]
paste.app_factory = heat.common.wsgi:app_factory
heat.app_factory = heat.api.openstack.v1:API

[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory

[filter:versionnegotiation]
paste.filter_factory = heat.common.wsgi:filter_factory
heat.filter_factory = heat.api.openstack:version_negotiation_filter

[filter:faultwrap]
paste.filter_factory = heat.common.wsgi:filter_factory
heat.filter_factory = heat.api.openstack:faultwrap_filter

[filter:context]
paste.filter_factory = heat.common.context:ContextMiddleware_filter_factory

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory

[filter:sitesecret]
paste.filter_factory = imageupdate.heat.secret:filter_factory
secret_file = {secret}

[filter:noauth]
paste.filter_factory = heat.common.noauth:filter_factory

[filter:request_id]
paste.filter_factory = oslo_middleware.request_id:RequestId.factory
"""


@dataclass(frozen=True)
class HeatPaths:
    """Where the local Heat of a site keeps its files."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "heat.conf"

    @property
    def paste(self) -> Path:
        return self.root / "api-paste.ini"

    @property
    def token(self) -> Path:
        return self.root / "token.json"

    @property
    def secret(self) -> Path:
        """What a request must carry as X-Auth-Token (``imageupdate.heat.secret``)."""
        return self.root / "secret"

    @property
    def database(self) -> Path:
        return self.root / "heat.sqlite"

    @property
    def log(self) -> Path:
        return self.root / "heat.log"

    @property
    def state(self) -> Path:
        """pid, start time and port of the running Heat, written by the server once it answers."""
        return self.root / "heat.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def endpoint(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1/{PROJECT}"


def render_conf(paths: HeatPaths, port: int) -> str:
    plugins = heat_templates_dir() / "plugins"
    return f"""\
[DEFAULT]
host = imageupdate-local
transport_url = fake://
convergence_engine = true
num_engine_workers = 1
plugin_dirs = {plugins}
keystone_backend = heat.engine.clients.os.keystone.fake_keystoneclient.FakeKeystoneClient
deferred_auth_method = password
heat_metadata_server_url = http://127.0.0.1:{port}
heat_waitcondition_server_url = {endpoint(port)}/waitcondition
default_deployment_signal_transport = HEAT_SIGNAL
max_resources_per_stack = -1
max_stacks_per_tenant = 10000
max_events_per_stack = 100000
event_purge_batch_size = 1000
rpc_response_timeout = 600
log_file = {paths.log}
use_stderr = false
debug = false
default_log_levels = heat=INFO,oslo_messaging=WARN,oslo_service=WARN,stevedore=WARN,keystoneauth=WARN

[database]
connection = sqlite:///{paths.database}

[paste_deploy]
flavor = noauth
api_paste_config = {paths.paste}

[noauth]
token_response = {paths.token}

[oslo_policy]
# noauth hands every request the admin role only; the new role-scoped defaults want reader/member roles too
enforce_scope = false
enforce_new_defaults = false

[oslo_messaging_notifications]
driver = noop

[clients_heat]
url = {endpoint(port)}

[yaql]
memory_quota = 900000
limit_iterators = 9000
"""


def render_token(port: int) -> dict[str, object]:
    return {"token": {
        "methods": ["token"],
        "project": {"id": PROJECT, "name": PROJECT, "domain": {"id": "default", "name": "Default"}},
        "user": {"id": PROJECT, "name": PROJECT, "domain": {"id": "default", "name": "Default"}},
        "roles": [{"id": "admin", "name": "admin"}],
        "expires_at": "2099-01-01T00:00:00.000000Z",
        "issued_at": "2026-01-01T00:00:00.000000Z",
        "catalog": [{"type": "orchestration", "name": "heat", "id": "heat",
                     "endpoints": [{"id": "heat-public", "interface": interface, "region": "regionOne",
                                    "region_id": "regionOne", "url": endpoint(port)}
                                   for interface in ("public", "internal", "admin")]}],
    }}


def write(paths: HeatPaths, port: int) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.conf.write_text(render_conf(paths, port))
    secret.ensure(paths.secret)
    paths.paste.write_text(API_PASTE.replace("{secret}", str(paths.secret)))
    paths.token.write_text(json.dumps(render_token(port), indent=2) + "\n")
