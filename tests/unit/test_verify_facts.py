"""The node's facts script, imported: which script an interpreter runs, the listening table, the health
loop; then on this machine's own /proc (a script, an executable mapping, shared memory, a socket, an HTTP
server answering 500)."""

from __future__ import annotations

import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import pytest

from imageupdate.verify import node_facts as nf

PY = "/usr/bin/python3.11"


@pytest.mark.parametrize("exe, cmdline, script", [
    # python: options with values skipped, -c/-m/- mean no script file
    (PY, ["python3", "/tmp/old.py"], "/tmp/old.py"),
    (PY, ["/usr/bin/python3", "-u", "-W", "ignore", "-X", "dev", "app.py", "--port", "1"], "app.py"),
    (PY, ["python3", "-Wignore", "-Xdev", "-OO", "-I", "app.py", "-c", "x"], "app.py"),
    (PY, ["python3", "--check-hash-based-pycs", "always", "a.py"], "a.py"),
    (PY, ["python3", "--", "a.py"], "a.py"),
    (PY, ["python3", "-m", "web"], None),
    (PY, ["/usr/bin/python3", "-m", "sample_workload"], None),
    (PY, ["python3", "-c", "import x", "a.py"], None),
    (PY, ["python3", "-uc", "code"], None),
    (PY, ["python3", "-"], None),
    (PY, ["python3"], None),
    # a title rewritten (setproctitle), or argv[0] that is no interpreter: argv says nothing
    (PY, ["gunicorn: master [app]"], None),
    (PY, ["perl", "x.pl"], None),
    # not an interpreter, whatever its argv looks like: nginx, PostgreSQL rename themselves
    ("/usr/sbin/nginx", ["nginx: master process /usr/sbin/nginx -g daemon off;"], None),
    ("/usr/lib/postgresql/15/bin/postgres", ["postgres: 15/main: checkpointer"], None),
    ("/usr/sbin/nginx", ["python3", "/tmp/x.py"], None),
    # perl
    ("/usr/bin/perl", ["perl", "-I", "/opt/lib", "-w", "script.pl"], "script.pl"),
    ("/usr/bin/perl", ["perl", "-Mstrict", "-l", "x.pl"], "x.pl"),
    ("/usr/bin/perl", ["perl", "-i.bak", "-p", "x.pl"], "x.pl"),
    ("/usr/bin/perl", ["perl", "-le", "print 1"], None),
    ("/usr/bin/perl", ["perl", "-0777", "-ne", "print"], None),
    # shells
    ("/usr/bin/dash", ["/bin/sh", "/usr/lib/imageupdate/node-firstboot"], "/usr/lib/imageupdate/node-firstboot"),
    ("/usr/bin/dash", ["sh", "-c", "exec foo", "/tmp/x"], None),
    ("/usr/bin/bash", ["bash", "-e", "-o", "pipefail", "+x", "run.sh"], "run.sh"),
    ("/usr/bin/bash", ["bash", "--rcfile", "rc", "--norc", "run.sh"], "run.sh"),
    ("/usr/bin/bash", ["-bash"], None),
    ("/usr/bin/bash", ["bash", "-s", "x"], None),
    # node, ruby, php, lua, tclsh
    ("/usr/bin/node", ["node", "--max-old-space-size=512", "-r", "dotenv/config", "server.js"], "server.js"),
    ("/usr/bin/node", ["node", "--require", "x", "server.js"], "server.js"),
    ("/usr/bin/node", ["node", "-e", "x"], None),
    ("/usr/bin/node", ["node", "--eval=x"], None),
    ("/usr/bin/ruby3.1", ["ruby", "-rjson", "-I", "lib", "app.rb"], "app.rb"),
    ("/usr/bin/ruby3.1", ["ruby", "-e", "puts 1"], None),
    ("/usr/bin/php8.2", ["php", "-d", "x=1", "-f", "index.php"], "index.php"),
    ("/usr/bin/php8.2", ["php", "-S", "0.0.0.0:8000", "-t", "/srv", "router.php"], "router.php"),
    ("/usr/bin/php8.2", ["php", "-r", "echo 1;"], None),
    ("/usr/sbin/php-fpm8.2", ["php-fpm: master process (/etc/php/8.2/fpm/php-fpm.conf)"], None),
    ("/usr/bin/lua5.4", ["lua5.4", "-e", "x=1", "main.lua"], "main.lua"),
    ("/usr/bin/tclsh8.6", ["tclsh8.6", "-encoding", "utf-8", "main.tcl"], "main.tcl"),
])
def test_the_script_an_interpreter_runs(exe: str, cmdline: list[str], script: str | None) -> None:
    assert nf.script_arg(exe, cmdline) == script


TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 4242 1 0 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0 100 0 0 10 0
   2: 0A00000A:0016 0B00000A:D2F0 01 00000000:00000000 02:0004E200 00000000     0        0 99 4 0 20 4 29 10 -1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue ...
   0: 00000000000000000000000001000000:1538 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   104        0 5151 1 0 100 0 0 10 0
"""  # noqa: E501


def test_listening_sockets_are_read_with_their_addresses() -> None:
    assert nf.parse_listening("tcp", TCP, "little") == [
        {"proto": "tcp", "address": "127.0.0.1", "port": 8080, "inode": 4242, "pids": []},
        {"proto": "tcp", "address": "0.0.0.0", "port": 22, "inode": 17, "pids": []},
    ]
    assert nf.parse_listening("tcp6", TCP6, "little") == [
        {"proto": "tcp6", "address": "::1", "port": 5432, "inode": 5151, "pids": []}]
    assert nf.decode_address("7F000001", "big") == "127.0.0.1"


@pytest.mark.parametrize("addresses, target", [
    (["127.0.0.1"], "127.0.0.1"),
    (["0.0.0.0", "::"], "127.0.0.1"),
    (["::"], "::1"),
    (["::1"], "::1"),
    (["10.0.0.10"], "10.0.0.10"),
    ([], "127.0.0.1"),  # not listening yet: ask loopback, and retry
])
def test_the_health_endpoint_is_asked_where_the_service_listens(addresses: list[str], target: str) -> None:
    sockets = [{"port": 8080, "address": a} for a in addresses] + [{"port": 22, "address": "10.0.0.9"}]
    assert nf.health_address(8080, sockets) == target
    assert nf.url(target, 8080, "/health") == (f"http://[{target}]:8080/health" if ":" in target
                                               else f"http://{target}:8080/health")


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_health_loop_retries_every_interval_until_the_bound() -> None:
    t = FakeTime()
    asked: list[tuple[str, float]] = []

    def get(address: str, port: int, path: str, timeout: float) -> tuple[int | None, str | None, str | None]:
        asked.append((address, timeout))
        t.now += 0.01
        return 500, "Internal Server Error", None

    got = nf.ask_health("web", 8080, "/health", sockets=lambda: [{"port": 8080, "address": "::"}], get=get,
                        clock=t.clock, sleep=t.sleep)
    assert got == {"service": "web", "url": "http://[::1]:8080/health", "status": 500,
                   "reason": "Internal Server Error", "error": None, "attempts": 30, "seconds": 14.51}
    assert {a for a, _ in asked} == {"::1"} and asked[0][1] == nf.HEALTH_REQUEST_TIMEOUT


def test_the_health_loop_stops_at_the_first_2xx_and_bounds_each_request() -> None:
    t = FakeTime()
    answers = iter([(None, None, "ConnectionRefusedError: refused"), (503, "Service Unavailable", None),
                    (204, "No Content", None)])
    timeouts: list[float] = []

    def get(address: str, port: int, path: str, timeout: float) -> tuple[int | None, str | None, str | None]:
        timeouts.append(timeout)
        t.now += 3.0  # each one times out slowly
        return next(answers)

    got = nf.ask_health("web", 8080, "/health", sockets=list, get=get, clock=t.clock, sleep=t.sleep, bound=8.0)
    assert got["status"] == 204 and got["attempts"] == 3 and got["seconds"] == 9.0
    assert timeouts == [3.0, 3.0, 2.0]  # the last one only gets what is left of the bound


def test_health_targets_are_the_services_with_a_health_path_and_ports() -> None:
    services: list[dict[str, Any]] = [
        {"name": "web", "ports": [8080, 8443], "health": "/health"}, {"name": "db", "ports": [5432]},
        {"name": "bad", "invalid": "Expecting value"}, {"name": "odd", "ports": [1], "health": "health"}]
    assert nf.health_targets(services) == [("web", 8080, "/health")]


# on this machine's own /proc ---------------------------------------------------------------------

@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    script = tmp_path / "old.py"
    script.write_text("import time\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-u", "old.py"], cwd=tmp_path)
    yield p, script
    p.kill()
    p.wait()


def test_a_script_is_found_from_the_processs_own_cwd_and_its_deletion_seen(
        sleeper: tuple[subprocess.Popen[bytes], Path]) -> None:
    p, script = sleeper
    points = list(nf.mounts())
    deadline = time.monotonic() + 5
    while (info := nf.process(p.pid, points)) is None or not info["cmdline"][1:]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert info["ppid"] == os.getpid() and info["state"] in "RS" and info["start_time"] > 0
    scripts = [f for f in info["executes"] if f["kind"] == "script"]
    assert scripts == [{"kind": "script", "path": str(script.resolve()), "deleted": False, "same_inode": None,
                        "on_root": scripts[0]["on_root"], "mount": nf.mount_of(str(script.resolve()), points),
                        "arg": "old.py", "target": None, "directory": False}]
    assert info["executes"][0]["kind"] == "exe" and info["executes"][0]["path"] == os.path.realpath(sys.executable)
    assert str(script.resolve()) in nf.code_paths([info]) or not scripts[0]["on_root"]
    script.unlink()
    info = nf.process(p.pid, points)
    assert info is not None and [f["deleted"] for f in info["executes"] if f["kind"] == "script"] == [True]


def test_only_executable_mappings_are_code(tmp_path: Path) -> None:
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"\0" * 4096)
    data = tmp_path / "data.bin"
    data.write_bytes(b"\0" * 4096)
    shm = shared_memory.SharedMemory(create=True, size=4096)  # /dev/shm/psm_..., rw-s
    memfd = os.memfd_create("imageupdate-test")
    os.ftruncate(memfd, 4096)
    with open(lib, "rb") as fl, open(data, "rb") as fd:
        try:
            code = mmap.mmap(fl.fileno(), 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)
        except PermissionError:
            pytest.skip(f"{tmp_path} is mounted noexec")
        maps = [code, mmap.mmap(fd.fileno(), 4096, prot=mmap.PROT_READ), mmap.mmap(memfd, 4096)]
    try:
        lib.unlink()
        info = nf.process(os.getpid(), list(nf.mounts()))
        assert info is not None
        mapped = {f["path"]: f for f in info["executes"] if f["kind"] == "map"}
        assert mapped[str(lib)]["deleted"] and "x" in mapped[str(lib)]["perms"]
        assert all("x" in f["perms"] for f in mapped.values())
        assert str(data) not in mapped and not any("memfd:" in p or "psm_" in p for p in mapped)
    finally:
        for m in maps:
            m.close()
        os.close(memfd)
        shm.close()
        shm.unlink()


def test_listening_sockets_and_their_holders_on_this_machine() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        mine = [x for x in nf.listening() if x["port"] == port]
        assert [(x["proto"], x["address"]) for x in mine] == [("tcp", "127.0.0.1")]
        assert nf.socket_holders({mine[0]["inode"]}, set()) == {mine[0]["inode"]: [os.getpid()]}


def test_the_health_loop_against_a_real_server_answering_500() -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        got = nf.ask_health("web", port, "/health", bound=0.5, interval=0.1)
        assert got["url"] == f"http://127.0.0.1:{port}/health" and got["status"] == 500
        assert got["reason"] == "Internal Server Error" and got["attempts"] >= 2
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_verified_root_is_compared_by_size_and_any_other_code_hashed(tmp_path: Path) -> None:
    """A namespace node's root is the tree unpacked from a checked artifact: its code is not hashed at every
    gate (a third of the facts' time); a host that says nothing gets every file hashed."""
    code = tmp_path / "lib.so"
    code.write_bytes(b"\x7fELF" + b"x" * 1000)
    assert nf.hashes([str(code)]) == {str(code): {"size": 1004, "sha256": nf.sha256(str(code))}}
    assert nf.hashes([str(code)], root_verified=True) == {str(code): {"size": 1004, "sha256": None}}


def test_the_facts_script_hashes_root_code_unless_the_host_vouches_for_the_root() -> None:
    script = Path(nf.__file__).read_text()
    plain = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, check=True)
    vouched = subprocess.run([sys.executable, "-", nf.ROOT_VERIFIED], input=script, capture_output=True, text=True,
                             check=True)
    hashed = json.loads(plain.stdout)["code"]
    sized = json.loads(vouched.stdout)["code"]
    assert hashed and all(v.get("sha256") for v in hashed.values() if "error" not in v)
    assert sized and all(v.get("sha256") is None and v.get("size") for v in sized.values() if "error" not in v)


def _serve_once(answer: bytes) -> int:
    """A server that answers one connection with ``answer`` and closes it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)
        srv.close()
    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1])


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.1 204 No Content\r\n\r\n", (204, "No Content", None)),
    (b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy", (503, "Service Unavailable", None)),
    (b"HTTP/1.1 200\r\n\r\n", (200, "", None)),
    (b"SSH-2.0-OpenSSH_9.2\r\n", (None, None, "BadStatusLine: 'SSH-2.0-OpenSSH_9.2'")),
    (b"", (None, None, "RemoteDisconnected: no answer")),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n\r\nfine", (200, "OK", None)),
])
def test_a_health_get_reads_the_status_line_of_whatever_answers(answer: bytes, expected: tuple[Any, ...]) -> None:
    assert nf.http_get("127.0.0.1", _serve_once(answer), "/health", 2.0) == expected


def test_a_health_get_does_not_wait_for_a_body_that_never_ends() -> None:
    """A server that ignores Connection: close: the status was read, the answer counts."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstill coming")
            done.wait(5)
        srv.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        assert nf.http_get("127.0.0.1", int(srv.getsockname()[1]), "/health", 1.0) == (200, "OK", None)
    finally:
        done.set()


def test_a_health_get_to_a_closed_port_names_the_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, reason, error = nf.http_get("127.0.0.1", port, "/health", 1.0)
    assert status is None and reason is None and error is not None and error.startswith("ConnectionRefusedError")
