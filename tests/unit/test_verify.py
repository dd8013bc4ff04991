"""The gate's checks on data: each built-in check passes on a healthy node and fails for each real fault;
verify_node's flow with a fake SSH runner (facts, built-ins, shipped tests, the caller's extra checks)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from imageupdate.images.fileindex import FileEntry
from imageupdate.images.manifest import ROOT_IMAGE, Artifact, Manifest
from imageupdate.images.packer import shipped_test_problems
from imageupdate.verify import builtin
from imageupdate.verify.builtin import Expectation
from imageupdate.verify.checks import FACTS_COMMAND, TESTS_DIR, CheckResult, NodeTarget, verify_node


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


ART = "a" * 64
SERVICE = {"name": "web", "command": ["/usr/bin/python3", "-m", "web"], "user": "web", "ports": [8080],
           "health": "/health"}


def expectation(artifact: str | None = ART, services: list[dict[str, Any]] | None = None) -> Expectation:
    m = Manifest(release="R2", built_at="", build_seconds=0, elements=[], expanded_elements=[], dib_version="",
                 imageupdate_version="", source_date_epoch=0, environment={}, packages={}, kernel=None,
                 services=[SERVICE] if services is None else services, tests=[], migrations=[],
                 state_paths=["/etc/ssh/keys", "/var/log"], files={},
                 artifacts={ROOT_IMAGE: Artifact(ART, 1, "tar+zstd")})
    index = {e.path: e for e in [
        FileEntry("usr/bin/python3.11", "file", 0o755, 0, 0, 10, sha("python")),
        FileEntry("usr/bin/python3", "symlink", 0o777, 0, 0, link="python3.11"),
        FileEntry("usr/lib/libc.so.6", "file", 0o755, 0, 0, 10, sha("libc")),
        FileEntry("usr/lib/libc-hard.so", "hardlink", 0o755, 0, 0, link="usr/lib/libc.so.6"),
        FileEntry("usr/lib/app/main.py", "file", 0o644, 0, 0, 4, sha("main")),
        FileEntry("usr/sbin/sshd", "file", 0o755, 0, 0, 10, sha("sshd")),
        FileEntry("etc/hosts", "file", 0o644, 0, 0, 5, sha("hosts")),
        FileEntry("etc/alternatives/x", "symlink", 0o777, 0, 0, link="/usr/bin/x"),
        FileEntry("etc/ssh/keys", "symlink", 0o777, 0, 0, link="/mnt/state/identity"),
    ]}
    return Expectation("R2", m, index, artifact)


def code(kind: str, path: str, **kw: Any) -> dict[str, Any]:
    """One entry of a process's ``executes``, as node_facts reports it."""
    entry: dict[str, Any] = {"kind": kind, "path": path, "deleted": False, "same_inode": True, "on_root": True,
                             "mount": "/"}
    if kind == "map":
        entry["perms"] = "r-xp"
    if kind == "script":
        entry |= {"same_inode": None, "arg": path, "directory": False, "target": None}
    return entry | kw


def proc(pid: int, exe: str, *maps: str | dict[str, Any], cmdline: list[str] | None = None, ppid: int = 1,
         script: str | dict[str, Any] | None = None) -> dict[str, Any]:
    executes = [code("exe", exe)] + [code("map", m) if isinstance(m, str) else m for m in maps]
    if script is not None:
        executes.append(code("script", script) if isinstance(script, str) else script)
    return {"pid": pid, "ppid": ppid, "state": "S", "start_time": 1000 + pid, "uid": 0,
            "cmdline": cmdline or [exe], "exe": exe, "exe_deleted": False, "executes": executes}


def sock(port: int, address: str = "0.0.0.0", *pids: int, proto: str = "tcp") -> dict[str, Any]:
    return {"proto": proto, "address": address, "port": port, "inode": 100 + port, "pids": list(pids)}


def healthy() -> dict[str, Any]:
    return {
        "stamp": '{"release": "R2"}',
        "mounts": {"/": {"options": ["ro", "relatime"]}, "/mnt/state": {"options": ["rw"]}},
        "root_write": {"ok": False, "error": "OSError: Read-only file system"},
        "state_write": {"ok": True, "error": None},
        "service_status": {"sshd": {"pid": 7, "starts": 1}, "web": {"pid": 9, "starts": 1, "start_time": 1009}},
        "listening": [sock(22, "0.0.0.0", 7), sock(22, "::", 7, proto="tcp6"), sock(8080, "127.0.0.1", 9)],
        "processes": [proc(1, "/usr/bin/python3.11", "/usr/lib/libc.so.6", ppid=0),
                      proc(7, "/usr/sbin/sshd", "/usr/lib/libc.so.6",
                           code("map", "/SYSV0000abcd", perms="rw-s", deleted=True, on_root=False)),
                      proc(9, "/usr/bin/python3.11", "/usr/lib/libc-hard.so",
                           cmdline=["/usr/bin/python3", "-m", "web"])],
        "code": {"/usr/bin/python3.11": {"size": 10, "sha256": sha("python")},
                 "/usr/lib/libc.so.6": {"size": 10, "sha256": sha("libc")},
                 "/usr/lib/libc-hard.so": {"size": 10, "sha256": sha("libc")},
                 "/usr/lib/app/main.py": {"size": 4, "sha256": sha("main")},
                 "/usr/sbin/sshd": {"size": 10, "sha256": sha("sshd")}},
        "health": [{"service": "web", "url": "http://127.0.0.1:8080/health", "status": 200, "reason": "OK",
                    "error": None, "attempts": 1, "seconds": 0.01}],
        "etc": {"/etc/hosts": {"type": "file", "sha256": sha("hosts")},
                "/etc/alternatives/x": {"type": "symlink", "link": "/usr/bin/x"},
                "/etc/ssh/keys": {"type": "symlink", "link": "/mnt/state/identity"}},
        "tests": [],
    }


def run(name: str, facts: dict[str, Any], want: Expectation | None = None) -> tuple[bool, str]:
    check = dict(builtin.BUILTIN)[name]
    return check(facts, want or expectation())


@pytest.mark.parametrize("name", [n for n, _ in builtin.BUILTIN])
def test_every_builtin_check_passes_on_a_healthy_node(name: str) -> None:
    ok, said = run(name, healthy())
    assert ok, said


# release ------------------------------------------------------------------------------------------

def test_release_names_the_artifact() -> None:
    assert run("release", healthy()) == (True, "runs R2 (artifact aaaaaaaaaaaa)")


@pytest.mark.parametrize("stamp, says", [
    ('{"release": "R1"}', "node runs 'R1', expected 'R2'"),
    ("R2", "release stamp /etc/imageupdate/release.json is missing or not a JSON object with a release"),
    (None, "release stamp /etc/imageupdate/release.json is missing"),
    ('["R2"]', "not a JSON object"),
])
def test_a_wrong_or_broken_stamp_fails(stamp: str | None, says: str) -> None:
    facts = healthy() | {"stamp": stamp}
    ok, said = run("release", facts)
    assert not ok and says in said


def test_a_tree_from_another_artifact_fails() -> None:
    ok, said = run("release", healthy(), expectation(artifact="b" * 64))
    assert not ok and said == ("node runs R2 unpacked from artifact bbbbbbbbbbbb, but the store's R2 is "
                               "aaaaaaaaaaaa (rebuilt under the same id?)")


def test_an_unknown_artifact_fails() -> None:
    ok, said = run("release", healthy(), expectation(artifact=None))
    assert not ok and "nothing records which artifact" in said


# services -----------------------------------------------------------------------------------------

def test_a_running_service_is_named_with_its_tree_and_where_it_listens() -> None:
    facts = healthy()
    facts["processes"].append(proc(12, "/usr/bin/python3.11", ppid=9))
    assert run("services", facts) == (True, "running: web (pid 9, 2 processes; port 8080 on 127.0.0.1)")


def test_a_service_that_is_not_running_fails() -> None:
    facts = healthy()
    facts["service_status"]["web"]["pid"] = None
    assert run("services", facts) == (False, "web is not running")
    facts["service_status"] = None
    assert run("services", facts) == (False, "web is not running")


def test_a_dead_pid_fails() -> None:
    facts = healthy()
    facts["processes"] = facts["processes"][:2]
    assert run("services", facts) == (False, "web is not running (its pid 9 is gone)")


def test_a_zombie_service_fails() -> None:
    facts = healthy()
    facts["processes"][2] |= {"state": "Z", "exe": None, "cmdline": [], "executes": []}
    assert run("services", facts) == (False, "web (pid 9) has exited: it is a zombie")
    assert run("stale-code", facts)[0]  # a zombie runs nothing


@pytest.mark.parametrize("exe, title, port, address", [
    ("/usr/sbin/nginx", ["nginx: master process /usr/sbin/nginx -g daemon off;"], 80, "0.0.0.0"),
    ("/usr/lib/postgresql/15/bin/postgres", ["postgres: 15/main: checkpointer"], 5432, "127.0.0.1"),
    ("/usr/lib/postgresql/15/bin/postgres", ["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/x"], 5432, "::1"),
])
def test_a_daemon_that_renames_itself_is_still_its_service(exe: str, title: list[str], port: int,
                                                            address: str) -> None:
    svc = {"name": "daemon", "command": [exe, "-c", "config_file=/etc/x.conf"], "ports": [port]}
    facts = healthy()
    facts["service_status"] = {"daemon": {"pid": 30, "starts": 1, "start_time": 1030}}
    facts["processes"] += [proc(30, exe, cmdline=title), proc(31, exe, ppid=30, cmdline=[title[0] + " worker"])]
    facts["listening"].append(sock(port, address, 30, 31, proto="tcp6" if ":" in address else "tcp"))
    ok, said = run("services", facts, expectation(services=[svc]))
    assert ok and said == f"running: daemon (pid 30, 2 processes; port {port} on {address})"


def test_a_service_whose_parent_is_not_the_init_fails() -> None:
    facts = healthy()
    facts["processes"][2]["ppid"] = 7
    assert run("services", facts) == (False, "web (pid 9) is not the init's child (its parent is pid 7): not the "
                                             "process the init started")


def test_a_recycled_pid_fails_but_an_old_init_without_start_times_is_accepted() -> None:
    facts = healthy()
    facts["service_status"]["web"]["start_time"] = 555
    assert run("services", facts) == (False, "web: pid 9 started at tick 1009, the init's process at tick 555: not "
                                             "the process the init started")
    del facts["service_status"]["web"]["start_time"]
    assert run("services", facts)[0]


def test_a_declared_port_not_listening_fails() -> None:
    facts = healthy() | {"listening": [sock(22, "0.0.0.0", 7)]}
    assert run("services", facts) == (False, "web does not listen on port 8080")


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::", "::1", "10.0.0.10"])
def test_a_port_listening_on_any_address_counts_loopback_included(address: str) -> None:
    facts = healthy() | {"listening": [sock(8080, address, 9, proto="tcp6" if ":" in address else "tcp")]}
    assert run("services", facts) == (True, f"running: web (pid 9, 1 process; port 8080 on {address})")


def test_a_port_held_outside_the_service_is_said() -> None:
    facts = healthy() | {"listening": [sock(8080, "0.0.0.0", 44)]}
    ok, said = run("services", facts)
    assert ok and said.endswith("port 8080 on 0.0.0.0 (held by pid 44, outside web's processes))")


# health -------------------------------------------------------------------------------------------

def test_a_healthy_endpoint_passes_with_its_answer() -> None:
    assert run("health", healthy()) == (True, "web: http://127.0.0.1:8080/health answered 200 OK (1 attempt over "
                                              "0.0 s)")


def test_a_health_endpoint_answering_500_fails_naming_the_url() -> None:
    facts = healthy()
    facts["health"][0] |= {"status": 500, "reason": "Internal Server Error", "attempts": 30, "seconds": 15.02}
    assert run("health", facts) == (False, "web: http://127.0.0.1:8080/health answered 500 Internal Server Error "
                                           "(30 attempts over 15.0 s)")


def test_a_health_endpoint_that_does_not_answer_fails() -> None:
    facts = healthy()
    facts["health"][0] |= {"status": None, "reason": None, "url": "http://[::1]:8080/health",
                           "error": "ConnectionRefusedError: [Errno 111] Connection refused", "attempts": 29,
                           "seconds": 14.8}
    assert run("health", facts) == (False, "web: http://[::1]:8080/health did not answer (ConnectionRefusedError: "
                                           "[Errno 111] Connection refused) (29 attempts over 14.8 s)")


def test_a_health_endpoint_not_asked_fails_and_none_declared_passes() -> None:
    facts = healthy() | {"health": []}
    assert run("health", facts) == (False, "web: /health on port 8080 was not asked (the node's declaration "
                                           "differs from the release's?)")
    no_health = [{k: v for k, v in SERVICE.items() if k != "health"}]
    assert run("health", facts, expectation(services=no_health)) == (True, "no service declares a health endpoint")


# stale code ---------------------------------------------------------------------------------------

def stale(*procs: dict[str, Any], **hashes: dict[str, Any]) -> tuple[bool, str]:
    facts = healthy()
    facts["processes"] += procs
    facts["code"] |= hashes
    return run("stale-code", facts)


def test_a_deleted_executable_is_stale() -> None:
    p = proc(40, "/tmp/old") | {"exe_deleted": True}
    p["executes"][0] |= {"deleted": True, "on_root": False, "mount": None}
    assert stale(p) == (False, "1 process(es) run code that is not R2's: pid 40 (/tmp/old): runs deleted /tmp/old")


def test_an_executable_on_the_state_partition_is_stale() -> None:
    p = proc(41, "/mnt/state/bin/tool")
    p["executes"][0] |= {"on_root": False, "mount": "/mnt/state"}
    assert stale(p) == (False, "1 process(es) run code that is not R2's: pid 41 (/mnt/state/bin/tool): runs "
                               "/mnt/state/bin/tool, which is not on the release's root")


def test_a_library_mapped_from_the_state_partition_is_stale() -> None:
    p = proc(41, "/usr/sbin/sshd", code("map", "/mnt/state/old/libcurl.so.4", on_root=False, mount="/mnt/state"))
    ok, said = stale(p)
    assert not ok and "pid 41 (/usr/sbin/sshd): maps /mnt/state/old/libcurl.so.4, which is not on the release's " \
                      "root" in said


def test_a_deleted_mapping_is_stale() -> None:
    facts = healthy()
    facts["processes"][1]["executes"][1]["deleted"] = True
    ok, said = run("stale-code", facts)
    assert not ok and "pid 7 (/usr/sbin/sshd): maps deleted /usr/lib/libc.so.6" in said


def test_an_executable_mapping_of_a_deleted_library_in_dev_shm_is_stale() -> None:
    lib = code("map", "/dev/shm/libhook.so", deleted=True, on_root=False, mount=None, same_inode=None)
    ok, said = stale(proc(43, "/usr/sbin/sshd", "/usr/lib/libc.so.6", lib))
    assert not ok and said.endswith("pid 43 (/usr/sbin/sshd): maps deleted /dev/shm/libhook.so")
    lib |= {"deleted": False, "mount": "/dev/shm"}
    ok, said = stale(proc(43, "/usr/sbin/sshd", lib))
    assert not ok and said.endswith("maps /dev/shm/libhook.so, which is not on the release's root")


@pytest.mark.parametrize("path, perms, deleted", [
    ("/SYSV0000abcd", "rw-s", True),  # PostgreSQL's SysV shared memory
    ("/dev/shm/PostgreSQL.1234", "rw-s", False),  # its POSIX shared memory
    ("/memfd:pulseaudio", "rw-s", True),
    ("/memfd:doublemapper", "r-xp", True),  # a JIT's code, mapped twice through a memfd
    ("/usr/lib/locale/locale-archive", "r--p", False),
    ("/var/lib/postgresql/15/main/base/1/1259", "rw-s", False),
    ("/dev/zero", "rw-s", True),
    ("/run/nginx/cache.bin", "r--s", False),
])
def test_data_mappings_are_not_code(path: str, perms: str, deleted: bool) -> None:
    data = code("map", path, perms=perms, deleted=deleted, on_root=path.startswith("/usr"))
    assert stale(proc(60, "/usr/sbin/sshd", "/usr/lib/libc.so.6", data))[0]


def test_code_with_other_content_or_unknown_to_the_release_is_stale() -> None:
    facts = healthy()
    facts["code"]["/usr/sbin/sshd"]["sha256"] = sha("patched")
    ok, said = run("stale-code", facts)
    assert not ok and "runs /usr/sbin/sshd differs from R2's" in said
    ok, said = stale(proc(50, "/usr/local/bin/agent"), **{"/usr/local/bin/agent": {"size": 1, "sha256": sha("a")}})
    assert not ok and "runs /usr/local/bin/agent is not a file of R2" in said


def test_a_script_run_by_an_interpreter_from_tmp_is_stale() -> None:
    p = proc(42, "/usr/bin/python3.11", "/usr/lib/libc.so.6", cmdline=["python3", "/tmp/old.py"],
             script=code("script", "/tmp/old.py", on_root=False, mount="/tmp"))
    assert stale(p) == (False, "1 process(es) run code that is not R2's: pid 42 (python3 /tmp/old.py): runs script "
                               "/tmp/old.py, which is not on the release's root")


def test_a_script_that_is_gone_changed_or_unknown_is_stale() -> None:
    gone = code("script", "/usr/lib/app/old.py", deleted=True, on_root=False, mount=None)
    ok, said = stale(proc(42, "/usr/bin/python3.11", cmdline=["python3", "old.py"], script=gone))
    assert not ok and said.endswith("runs script /usr/lib/app/old.py, which no longer exists")
    ok, said = stale(proc(42, "/usr/bin/python3.11", cmdline=["python3", "/usr/lib/app/main.py"],
                          script="/usr/lib/app/main.py"), **{"/usr/lib/app/main.py": {"size": 4, "sha256": sha("x")}})
    assert not ok and said.endswith("runs script /usr/lib/app/main.py differs from R2's")
    ok, said = stale(proc(42, "/usr/bin/perl", cmdline=["perl", "/usr/local/x.pl"], script="/usr/local/x.pl"),
                     **{"/usr/local/x.pl": {"size": 1, "sha256": sha("x")}})
    assert not ok and "runs /usr/bin/perl is not a file of R2 (+1 more)" in said
    piped = code("script", "/dev/fd/63", deleted=True, on_root=False, target="pipe:[4242]")
    ok, said = stale(proc(42, "/usr/bin/python3.11", cmdline=["python3", "/dev/fd/63"], script=piped))
    assert not ok and said.endswith("runs script /dev/fd/63, which is pipe:[4242], not a file")


def test_the_releases_own_script_run_by_python_passes() -> None:
    ok, said = stale(proc(42, "/usr/bin/python3.11", "/usr/lib/libc.so.6",
                          cmdline=["/usr/bin/python3", "-u", "/usr/lib/app/main.py"], script="/usr/lib/app/main.py"),
                     proc(43, "/usr/bin/python3.11", cmdline=["python3", "/usr/lib/app"],
                          script=code("script", "/usr/lib/app", directory=True)))
    assert ok and said == "5 processes, all on R2's code"


def test_a_process_that_cannot_be_inspected_is_stale() -> None:
    p = proc(70, "/usr/sbin/sshd") | {"exe": None, "executes": [], "error": "PermissionError: Permission denied"}
    assert stale(p) == (False, "1 process(es) run code that is not R2's: pid 70 (/usr/sbin/sshd): cannot be "
                               "inspected (PermissionError: Permission denied)")


def test_many_stale_processes_are_counted_not_all_listed() -> None:
    procs = []
    for i in range(8):
        p = proc(100 + i, f"/tmp/x{i}")
        p["executes"][0]["deleted"] = True
        procs.append(p)
    ok, said = stale(*procs)
    assert not ok and said.startswith("8 process(es)") and said.endswith("; and 3 more")


# config -------------------------------------------------------------------------------------------

def test_config_that_differs_from_the_image_fails() -> None:
    facts = healthy()
    facts["etc"]["/etc/hosts"]["sha256"] = sha("tampered")
    assert run("config", facts) == (False, "1 config file(s) differ from R2: /etc/hosts differs from the image")


def test_extra_missing_and_relinked_config_fails() -> None:
    facts = healthy()
    facts["etc"]["/etc/extra.conf"] = {"type": "file", "sha256": sha("x")}
    del facts["etc"]["/etc/hosts"]
    facts["etc"]["/etc/alternatives/x"]["link"] = "/opt/x"
    ok, said = run("config", facts)
    assert not ok and said.startswith("3 config file(s) differ")
    assert "/etc/extra.conf is not in the image" in said and "/etc/hosts is missing" in said
    assert "/etc/alternatives/x links to /opt/x, the image has /usr/bin/x" in said


def test_declared_overlays_may_differ() -> None:
    facts = healthy()
    facts["etc"]["/etc/ssh/keys/host_key"] = {"type": "file", "sha256": sha("per-node")}
    assert run("config", facts)[0]


# filesystems --------------------------------------------------------------------------------------

def test_a_writable_root_fails() -> None:
    facts = healthy()
    facts["mounts"]["/"]["options"] = ["rw"]
    facts["root_write"] = {"ok": True, "error": None}
    ok, said = run("filesystems", facts)
    assert not ok and said == "the root is mounted rw, not read-only; a write to / succeeded"


def test_a_missing_or_read_only_state_partition_fails() -> None:
    facts = healthy()
    del facts["mounts"]["/mnt/state"]
    facts["state_write"] = {"ok": False, "error": "OSError: Read-only file system"}
    ok, said = run("filesystems", facts)
    assert not ok and said == ("/mnt/state is not a mount point; a write to /mnt/state failed: OSError: "
                               "Read-only file system")


# verify_node --------------------------------------------------------------------------------------

TARGET = NodeTarget("node0", "10.0.0.10", Path("/keys/id"))


class FakeNode:
    """Answers what verify_node runs over SSH; records the calls."""

    def __init__(self, facts: dict[str, Any] | None = None, facts_rc: int = 0, facts_err: str = "",
                 tests: dict[str, tuple[int, str]] | None = None) -> None:
        self.facts = healthy() if facts is None else facts
        self.facts_rc, self.facts_err = facts_rc, facts_err
        self.tests = tests or {}
        self.calls: list[list[str]] = []

    def __call__(self, target: NodeTarget, command: list[str], timeout: float,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        assert target == TARGET
        self.calls.append(command)
        if command == FACTS_COMMAND:
            assert input is not None and "def main()" in input  # the facts script travels on stdin
            return subprocess.CompletedProcess(command, self.facts_rc, json.dumps(self.facts), self.facts_err)
        assert command[:3] == ["env", "-C", "/"]  # shipped tests run from / (as documented)
        rc, out = self.tests[command[-1].removeprefix(TESTS_DIR + "/")]
        return subprocess.CompletedProcess(command, rc, out, "")


def with_tests(*names: str, **flags: bool) -> dict[str, Any]:
    facts = healthy()
    facts["tests"] = [{"name": n, "file": True, "executable": True, "runnable": True} | flags for n in names]
    return facts


def test_a_healthy_node_passes_builtins_then_tests_in_order() -> None:
    node = FakeNode(with_tests("10-a", "20-b"), tests={"10-a": (0, "fine\n"), "20-b": (0, "")})
    v = verify_node(TARGET, expectation(), run=node)
    assert v.ok, v.reason
    assert [r.name for r in v.results] == ["facts", "release", "services", "health", "stale-code", "config",
                                           "filesystems", "state-version", "test:10-a", "test:20-b"]
    assert v.results[-1].output == "exit status 0"
    assert node.calls[1:] == [["env", "-C", "/", f"{TESTS_DIR}/10-a"], ["env", "-C", "/", f"{TESTS_DIR}/20-b"]]
    assert v.reason == "node0 on R2: 10 checks passed" and v.finished is not None and v.finished >= v.started


def test_the_facts_are_read_with_the_roots_verification_when_the_host_vouches_for_it() -> None:
    node = FakeNode()
    verify_node(TARGET, expectation(), run=node)
    assert node.calls[0] == FACTS_COMMAND
    vouched = NodeTarget("node0", "10.0.0.10", Path("/keys/id"), root_verified=True)
    calls: list[list[str]] = []

    def run(target: NodeTarget, command: list[str], timeout: float,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, json.dumps(healthy()), "")
    assert verify_node(vouched, expectation(), run=run).ok
    assert calls[0] == [*FACTS_COMMAND, "--root-verified"]


def test_a_guest_is_given_longer_to_answer_than_a_namespace_node() -> None:
    """Seen with two TCG guests beside a rollout on 2 cores: the SSH banner exchange took more than 5 s and
    the facts script more than 45 s; both failed a healthy node's gate."""
    from imageupdate.verify.checks import GUEST_SSH_TIMEOUT, SSH_TIMEOUT, _ssh_base
    guest = NodeTarget("node0", "10.0.0.10", Path("/keys/id"), guest=True)
    assert "ConnectTimeout=5" in _ssh_base(TARGET) and "ConnectTimeout=30" in _ssh_base(guest)
    given: list[float] = []

    def run(target: NodeTarget, command: list[str], timeout: float,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        given.append(timeout)
        return subprocess.CompletedProcess(command, 0, json.dumps(healthy()), "")
    verify_node(TARGET, expectation(), run=run)
    verify_node(guest, expectation(), run=run)
    assert given[0] == SSH_TIMEOUT and GUEST_SSH_TIMEOUT in given and GUEST_SSH_TIMEOUT >= 2 * SSH_TIMEOUT


def test_a_local_node_is_reached_with_the_classic_key_exchange_and_a_cloud_one_with_the_default() -> None:
    """sntrup761 (OpenSSH's default) cost the client 0.1 s of CPU per gate; a local site's bridge only root
    on the host reaches, a cloud's network is anyone's."""
    from imageupdate.verify.checks import _ssh_base
    assert "KexAlgorithms=curve25519-sha256" in _ssh_base(TARGET)
    pinned = NodeTarget("node0", "10.0.0.10", Path("/keys/id"), known_hosts=Path("/site/known_hosts"))
    assert not any(o.startswith("KexAlgorithms") for o in _ssh_base(pinned))


def test_a_failing_shipped_test_is_named_in_the_reason() -> None:
    node = FakeNode(with_tests("10-a", "20-data-roundtrip"),
                    tests={"10-a": (0, ""), "20-data-roundtrip": (1, "wrote 1, read back 2\n")})
    v = verify_node(TARGET, expectation(), run=node)
    assert not v.ok and v.reason == "node0 on R2: check test:20-data-roundtrip failed: wrote 1, read back 2"


def test_an_unreachable_node_fails_on_its_facts_and_nothing_else_runs() -> None:
    node = FakeNode(facts_rc=255, facts_err="ssh: connect to host 10.0.0.10 port 22: No route to host\n")
    v = verify_node(TARGET, expectation(), run=node)
    assert [(r.name, r.ok) for r in v.results] == [("facts", False)]
    assert v.reason == ("node0 on R2: check facts failed: node does not answer over SSH at 10.0.0.10: "
                        "ssh: connect to host 10.0.0.10 port 22: No route to host")
    assert len(node.calls) == 1


def test_facts_that_are_not_json_fail() -> None:
    class Garbled(FakeNode):
        def __call__(self, target: NodeTarget, command: list[str], timeout: float,
                     input: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.CompletedProcess(command, 0, "Traceback: boom", "")
    v = verify_node(TARGET, expectation(), run=Garbled())
    assert not v.ok and "the node's facts are not a JSON object" in v.reason


def test_the_wrong_release_skips_the_shipped_tests() -> None:
    facts = with_tests("10-a") | {"stamp": '{"release": "R1"}'}
    node = FakeNode(facts, tests={"10-a": (0, "")})
    v = verify_node(TARGET, expectation(), run=node)
    assert not v.ok and "test:10-a" not in [r.name for r in v.results]
    assert node.calls == [FACTS_COMMAND]


@pytest.mark.parametrize("flags, says", [
    ({"executable": False}, "is not executable: ship it with mode 0755"),
    ({"runnable": False}, "is neither a #! script nor an ELF binary"),
    ({"file": False}, "is not a regular file"),
])
def test_a_test_that_cannot_run_fails_without_running(flags: dict[str, bool], says: str) -> None:
    node = FakeNode(with_tests("10-a", **flags), tests={})
    v = verify_node(TARGET, expectation(), run=node)
    assert not v.ok and says in v.reason and "test:10-a" in v.reason
    assert node.calls == [FACTS_COMMAND]


def test_extra_checks_join_the_verdict() -> None:
    extra = [CheckResult("resources:kv:verify", False, 0.1, "key gone")]
    v = verify_node(TARGET, expectation(), run=FakeNode(), extra=lambda: extra)
    assert not v.ok and v.reason == "node0 on R2: check resources:kv:verify failed: key gone"


def test_the_facts_script_stays_standalone() -> None:
    """It runs on the node's python3 with the standard library only: no imageupdate imports."""
    text = (Path(__file__).resolve().parents[2] / "imageupdate/verify/node_facts.py").read_text()
    assert "imageupdate." not in "\n".join(ln for ln in text.splitlines() if ln.startswith(("import", "from")))


def test_shipped_tests_are_validated_at_build_time() -> None:
    tests: list[dict[str, object]] = [
        {"path": "/usr/share/imageupdate/tests/10-ok", "executable": True, "runnable": True},
        {"path": "/usr/share/imageupdate/tests/20-mode", "executable": False, "runnable": True},
        {"path": "/usr/share/imageupdate/tests/30-text", "executable": True, "runnable": False},
    ]
    assert shipped_test_problems(tests) == [
        "/usr/share/imageupdate/tests/20-mode is not executable (give it mode 0755 in its element)",
        "/usr/share/imageupdate/tests/30-text is neither a #! script nor an ELF binary",
    ]
    assert shipped_test_problems(copy.deepcopy(tests[:1])) == []


def versioned(state_version: int = 3) -> Expectation:
    want = expectation()
    upgrade = {"version": "3", "state_version": state_version,
               "migrations": [{"name": "0003-add", "state_version": 3, "kind": "expand"}]}
    return Expectation(want.release, dataclasses.replace(want.manifest, upgrade=upgrade), want.index, want.artifact)


def state_json(version: int, *steps: tuple[str, int, str, bool | None]) -> str:
    return json.dumps({"version": version, "steps": [
        {"release": "R", "migration": m, "state_version": sv, "kind": kind, "started": 1.0,
         "finished": None if ok is None else 2.0, "ok": ok} for m, sv, kind, ok in steps]})


def test_the_state_version_must_be_one_the_release_runs_on() -> None:
    facts = healthy()
    assert run("state-version", facts)[0]  # a release without upgrade metadata: nothing to hold it to
    facts["state_version"] = state_json(3, ("0003-add", 3, "expand", True))
    ok, said = run("state-version", facts, versioned())
    assert ok and said == "state version 3 (release R2 needs 3)"
    facts["state_version"] = state_json(2)
    assert run("state-version", facts, versioned()) == (False, "the state is at version 2 and R2 needs 3: its "
                                                               "migrations have not run")
    facts["state_version"] = state_json(4, ("0004-drop", 4, "contract", True))
    ok, said = run("state-version", facts, versioned())
    assert not ok and "contract migration 0004-drop" in said
    facts["state_version"] = state_json(3, ("0003-add", 3, "expand", None))
    assert "was interrupted" in run("state-version", facts, versioned())[1]
    facts["state_version"] = None
    assert run("state-version", facts, versioned())[1].startswith("no imageupdate/state.json on /mnt/state")
    facts["state_version"] = "{]"
    assert not run("state-version", facts, versioned())[0]


def test_a_machine_whose_migrations_blocked_it_at_boot_fails_with_the_reason() -> None:
    facts = healthy()
    facts["state_version"] = state_json(3, ("0003-add", 3, "expand", True))
    facts["blocked"] = "migration 0003-add of R2 (expand) failed: disk full\x1b[31m; the state stays at version 2\n"
    ok, said = run("state-version", facts, versioned())
    assert not ok and said == ("the node's migrations at boot blocked its services: migration 0003-add of R2 "
                               "(expand) failed: disk full[31m; the state stays at version 2")
    facts["blocked"] = None
    assert run("state-version", facts, versioned())[0]


def test_a_check_that_cannot_read_odd_facts_fails_alone() -> None:
    """A node's root may rewrite the init's status file: odd facts fail one check, the others still report."""
    from imageupdate.verify.builtin import check_services
    from imageupdate.verify.checks import _timed

    assert _timed("x", lambda: (True, "fine")).ok
    broken = _timed("stale-code", lambda: {}["pid"])  # type: ignore[index]
    assert not broken.ok and broken.output == "the node's facts could not be judged: KeyError: 'pid'"
    manifest = SimpleNamespace(services=[{"name": "web", "ports": [80]}])
    want = SimpleNamespace(manifest=manifest)
    for status in (["web"], {"web": 7}, "x"):
        ok, said = check_services({"service_status": status, "processes": []}, want)  # type: ignore[arg-type]
        assert not ok and said == "web is not running"


def test_a_one_off_ssh_read_shares_no_connection_a_later_one_could_reuse_unchecked(tmp_path: Path) -> None:
    """A shared (ControlMaster) connection is reused with no host key check: only a gate's checks share one,
    and close it; a one-off read (a node's state file, a boot poll) must not leave one behind."""
    from imageupdate.verify.checks import _ssh_base

    target = NodeTarget("node0", "10.0.0.2", tmp_path / "key", "root", tmp_path / "known_hosts")
    assert "ControlMaster=auto" in _ssh_base(target)
    one_off = _ssh_base(target, shared=False)
    assert "ControlMaster=no" in one_off and "ControlPath=none" in one_off and "ControlPersist=15" not in one_off
