"""HTTP layer of the sample workload; storage comes from the release's storage module."""
import configparser
import json
import os
import signal
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sample_workload import storage

DATA_DIR = os.environ.get("SAMPLE_WORKLOAD_DATA", "/var/lib/sample-workload")
PORT = int(os.environ.get("SAMPLE_WORKLOAD_PORT", "8080"))
CONFIG = os.environ.get("SAMPLE_WORKLOAD_CONFIG", "/etc/sample-workload/sample-workload.conf")


def release() -> str:
    with open("/etc/imageupdate/release.json") as f:
        return json.load(f)["release"]


class Handler(BaseHTTPRequestHandler):
    store: "storage.Store"

    def _send(self, code: int, body: bytes, ctype: str = "application/octet-stream") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _key(self) -> str | None:
        if self.path.startswith("/kv/") and len(self.path) > 4:
            return self.path[4:]
        return None

    def do_GET(self) -> None:
        if self.path == "/health":
            doc = {"status": "ok", "release": release(), "format": storage.FORMAT}
            self._send(200, json.dumps(doc).encode(), "application/json")
            return
        key = self._key()
        value = self.store.get(key) if key else None
        if value is None:
            self._send(404, b"not found\n")
        else:
            self._send(200, value)

    def do_PUT(self) -> None:
        key = self._key()
        if key is None:
            self._send(400, b"PUT /kv/KEY\n")
            return
        length = int(self.headers.get("Content-Length", "0"))
        self.store.put(key, self.rfile.read(length))
        self._send(204, b"")

    def do_DELETE(self) -> None:
        key = self._key()
        if key is None:
            self._send(400, b"DELETE /kv/KEY\n")
            return
        self.store.delete(key)
        self._send(204, b"")

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks socket.getfqdn(), a DNS lookup that
        # stalls ~10 s on a node without a resolver: bind without it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def load_config() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(CONFIG)
    return config


def main() -> None:
    try:
        Handler.store = storage.Store(DATA_DIR, load_config())
    except storage.StateNotMigrated as e:
        sys.exit(f"sample-workload {release()}: {e}")
    server = Server(("0.0.0.0", PORT), Handler)
    # server.shutdown() from a handler running in serve_forever's own thread
    # would wait for itself forever: leave by raising SystemExit instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"sample-workload {release()} format {storage.FORMAT} on :{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
