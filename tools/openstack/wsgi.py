"""Serve one OpenStack API with gunicorn on loopback: ``wsgi.py SERVICE PORT CONFIG_DIR``.

keystone, nova and heat parse ``sys.argv`` with oslo.config when their WSGI app is imported, so gunicorn's own
arguments would be "unrecognized": this launcher sets ``sys.argv`` to what each service expects first.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from gunicorn.app.base import BaseApplication

APPS = {
    "keystone": ("keystone.wsgi.api", ["keystone"], "OS_KEYSTONE_CONFIG_DIR"),
    "glance": ("glance.wsgi.api", ["glance-api"], "OS_GLANCE_CONFIG_DIR"),
    "placement": ("placement.wsgi.api", ["placement-api"], "OS_PLACEMENT_CONFIG_DIR"),
    "nova": ("nova.wsgi.osapi_compute", ["nova-api"], "OS_NOVA_CONFIG_DIR"),
    "heat": ("heat.wsgi.api", ["heat-api"], None),
}


class Server(BaseApplication):  # type: ignore[misc]
    def __init__(self, service: str, port: int, conf_dir: str) -> None:
        self.service, self.port, self.conf_dir = service, port, conf_dir
        super().__init__()

    def load_config(self) -> None:
        self.cfg.set("bind", f"127.0.0.1:{self.port}")
        self.cfg.set("workers", 1)
        self.cfg.set("worker_class", "gthread")
        self.cfg.set("threads", 4)
        self.cfg.set("timeout", 300)
        # no keep-alive: a client reusing a pooled connection just as gunicorn closes it (2 s idle by default)
        # gets "connection reset"; keystoneauth does not retry that
        self.cfg.set("keepalive", 0)
        self.cfg.set("accesslog", os.path.join(self.conf_dir, "..", "..", "logs", f"{self.service}-access.log"))

    def load(self) -> Any:
        module, argv, env = APPS[self.service]
        if env:
            os.environ[env] = self.conf_dir
        sys.argv = list(argv)
        if self.service == "heat":
            sys.argv += ["--config-file", os.path.join(self.conf_dir, "heat.conf")]
        return importlib.import_module(module).application


if __name__ == "__main__":
    service, port, conf = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.argv = sys.argv[:1]
    Server(service, port, conf).run()
