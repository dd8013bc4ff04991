"""Only imageupdate reaches a site's Heat: the secret filter, and a Heat without it is not reused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imageupdate.heat.secret import SecretAuth
from imageupdate.heat.service import HeatService


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"stacks"]


@pytest.mark.parametrize("token,allowed", [("s3cret", True), ("", False), ("s3cre", False), ("s3cret2", False)])
def test_the_filter_passes_only_the_sites_secret(token: str, allowed: bool) -> None:
    said: list[str] = []
    body = SecretAuth(_app, "s3cret")({"HTTP_X_AUTH_TOKEN": token}, lambda status, headers: said.append(status))
    assert (said[0] == "200 OK") is allowed and (body == [b"stacks"]) is allowed


@pytest.fixture
def fake_heat() -> Iterator[tuple[int, dict[str, int]]]:
    """A loopback server standing where a site's Heat runs: healthy, and answering the API with ``code``."""
    code = {"api": 401}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/healthcheck" else code["api"])
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], code
    finally:
        server.shutdown()


def test_a_heat_that_answers_without_the_secret_is_not_reused(tmp_path: Path,
                                                               fake_heat: tuple[int, dict[str, int]]) -> None:
    """Seen: a Heat started before the secret existed kept answering anyone until restarted by hand."""
    port, code = fake_heat
    service = HeatService(tmp_path / "heat")
    service.paths.root.mkdir(parents=True)
    heat = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "imageupdate.heat.server"])
    try:
        service.paths.state.write_text(json.dumps({"pid": heat.pid, "port": port, "started": time.time()}))
        assert service.running() is not None  # 401 without the secret: ours
        code["api"] = 200
        assert service.running() is None  # answers anyone: replaced by the next ensure()
        code["api"] = 401
        service.paths.state.write_text(json.dumps({"pid": os.getpid(), "port": port, "started": time.time()}))
        assert service.running() is None  # a process that is not our Heat, answering 401, gets no secret
    finally:
        heat.kill()
        heat.wait()
