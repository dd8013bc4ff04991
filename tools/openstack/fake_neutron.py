"""A minimal Neutron API for the test control plane: every collection is empty (test-only).

nova-api looks up ports (and security groups through them) on server show/list/delete, and its periodic tasks list
networks and extensions; with ``networks: none`` servers have no port, so empty lists are the truthful answer.
Anything else is logged and answered 404, so a surprise shows up. ``fake_neutron.py PORT``.
"""

from __future__ import annotations

import json
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

VERSIONS = {"versions": [{"id": "v2.0", "status": "CURRENT", "links": []}]}


class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, doc: object | None) -> None:
        body = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = urlparse(self.path).path.rstrip("/")
        if path in ("", "/v2.0"):
            self._send(200, VERSIONS)
            return
        parts = path.split("/")
        if len(parts) == 3 and parts[1] == "v2.0":
            name = parts[2].removesuffix(".json")
            self._send(200, {name.replace("-", "_"): []})
            return
        if len(parts) == 4 and parts[1:3] == ["v2.0", "quotas"]:
            self._send(200, {"quota": {"port": -1, "network": -1, "security_group": -1}})
            return
        sys.stderr.write(f"fake neutron: no answer for GET {self.path}\n")
        self._send(404, {"NeutronError": {"message": f"{self.path} not found", "type": "NotFound"}})

    def do_DELETE(self) -> None:
        self._send(204, None)

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write("fake neutron: %s\n" % (fmt % args))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn(): no resolver here
        self.server_name, self.server_port = self.server_address[:2]


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
