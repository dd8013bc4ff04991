"""The gate's checks on data: each built-in check passes on a healthy node and fails for each real fault;
verify_node's flow with a fake SSH runner (facts, built-ins, shipped tests, the caller's extra checks)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
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
SERVICE = {"name": "web", "command": ["/usr/bin/python3", "-m", "web"], "user": "web", "ports": [8080]}


def expectation(artifact: str | None = ART) -> Expectation:
    m = Manifest(release="R2", built_at="", build_seconds=0, elements=[], expanded_elements=[], dib_version="",
                 imageupdate_version="", source_date_epoch=0, environment={}, packages={}, kernel=None,
                 services=[SERVICE], tests=[], migrations=[], state_paths=["/etc/ssh/keys", "/var/log"], files={},
                 artifacts={ROOT_IMAGE: Artifact(ART, 1, "tar+zstd")})
    index = {e.path: e for e in [
        FileEntry("usr/bin/python3.11", "file", 0o755, 0, 0, 10, sha("python")),
        FileEntry("usr/bin/python3", "symlink", 0o777, 0, 0, link="python3.11"),
        FileEntry("usr/lib/libc.so.6", "file", 0o755, 0, 0, 10, sha("libc")),
        FileEntry("usr/lib/libc-hard.so", "hardlink", 0o755, 0, 0, link="usr/lib/libc.so.6"),
        FileEntry("usr/sbin/sshd", "file", 0o755, 0, 0, 10, sha("sshd")),
        FileEntry("etc/hosts", "file", 0o644, 0, 0, 5, sha("hosts")),
        FileEntry("etc/alternatives/x", "symlink", 0o777, 0, 0, link="/usr/bin/x"),
        FileEntry("etc/ssh/keys", "symlink", 0o777, 0, 0, link="/mnt/state/identity"),
    ]}
    return Expectation("R2", m, index, artifact)


def proc(pid: int, exe: str, *maps: str, cmdline: list[str] | None = None) -> dict[str, Any]:
    return {"pid": pid, "uid": 0, "cmdline": cmdline or [exe], "exe": exe, "exe_deleted": False,
            "maps": [{"path": m, "deleted": False, "same_inode": True, "on_root": True} for m in maps]}


def healthy() -> dict[str, Any]:
    return {
        "stamp": '{"release": "R2"}',
        "mounts": {"/": {"options": ["ro", "relatime"]}, "/mnt/state": {"options": ["rw"]}},
        "root_write": {"ok": False, "error": "OSError: Read-only file system"},
        "state_write": {"ok": True, "error": None},
        "service_status": {"sshd": {"pid": 7}, "web": {"pid": 9}},
        "listening": [22, 8080],
        "processes": [proc(1, "/usr/bin/python3.11", "/usr/lib/libc.so.6"),
                      proc(7, "/usr/sbin/sshd", "/usr/lib/libc.so.6", "/dev/shm/x"),
                      proc(9, "/usr/bin/python3.11", "/usr/lib/libc-hard.so",
                           cmdline=["/usr/bin/python3", "-m", "web"])],
        "code": {"/usr/bin/python3.11": {"size": 10, "sha256": sha("python")},
                 "/usr/lib/libc.so.6": {"size": 10, "sha256": sha("libc")},
                 "/usr/lib/libc-hard.so": {"size": 10, "sha256": sha("libc")},
                 "/usr/sbin/sshd": {"size": 10, "sha256": sha("sshd")}},
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

def test_a_service_that_is_not_running_fails() -> None:
    facts = healthy()
    facts["service_status"]["web"]["pid"] = None
    assert run("services", facts) == (False, "web is not running")
    facts["service_status"] = None
    assert run("services", facts) == (False, "web is not running")


def test_a_dead_pid_fails() -> None:
    facts = healthy()
    facts["processes"] = facts["processes"][:2]
    assert run("services", facts) == (False, "web is not running")


def test_a_service_running_something_else_fails() -> None:
    facts = healthy()
    facts["processes"][2]["cmdline"] = ["/usr/bin/python3", "-m", "other"]
    ok, said = run("services", facts)
    assert not ok and "runs '/usr/bin/python3 -m other', declared '/usr/bin/python3 -m web'" in said


def test_a_declared_port_not_listening_fails() -> None:
    facts = healthy() | {"listening": [22]}
    assert run("services", facts) == (False, "web does not listen on port 8080")


# stale code ---------------------------------------------------------------------------------------

def test_a_deleted_executable_is_stale() -> None:
    facts = healthy()
    facts["processes"].append(proc(40, "/tmp/old") | {"exe_deleted": True})
    ok, said = run("stale-code", facts)
    assert not ok and said == "1 process(es) run code that is not R2's: pid 40 (/tmp/old): runs deleted /tmp/old"


def test_a_library_mapped_from_the_state_partition_is_stale() -> None:
    facts = healthy()
    p = proc(41, "/usr/sbin/sshd", "/mnt/state/old/libcurl.so.4")
    p["maps"][0]["on_root"] = False
    facts["processes"].append(p)
    facts["code"]["/mnt/state/old/libcurl.so.4"] = {"size": 3, "sha256": sha("curl")}
    ok, said = run("stale-code", facts)
    assert not ok and "pid 41 (/usr/sbin/sshd): maps /mnt/state/old/libcurl.so.4, which is not on the release's " \
                      "root" in said


def test_a_deleted_mapping_is_stale() -> None:
    facts = healthy()
    facts["processes"][1]["maps"][0]["deleted"] = True
    ok, said = run("stale-code", facts)
    assert not ok and "pid 7 (/usr/sbin/sshd): maps deleted /usr/lib/libc.so.6" in said


def test_code_with_other_content_or_unknown_to_the_release_is_stale() -> None:
    facts = healthy()
    facts["code"]["/usr/sbin/sshd"]["sha256"] = sha("patched")
    ok, said = run("stale-code", facts)
    assert not ok and "runs /usr/sbin/sshd differs from R2's" in said
    facts = healthy()
    facts["processes"].append(proc(50, "/usr/local/bin/agent"))
    facts["code"]["/usr/local/bin/agent"] = {"size": 1, "sha256": sha("agent")}
    ok, said = run("stale-code", facts)
    assert not ok and "runs /usr/local/bin/agent is not a file of R2" in said


def test_many_stale_processes_are_counted_not_all_listed() -> None:
    facts = healthy()
    facts["processes"] += [proc(100 + i, f"/tmp/x{i}") | {"exe_deleted": True} for i in range(8)]
    ok, said = run("stale-code", facts)
    assert not ok and said.startswith("8 process(es)") and said.endswith("; and 3 more")


def test_shared_memory_and_devices_are_not_code() -> None:
    facts = healthy()
    p = proc(60, "/usr/sbin/sshd", "/dev/shm/ring", "/run/x.mmap")
    for m in p["maps"]:
        m["on_root"] = False
    facts["processes"].append(p)
    assert run("stale-code", facts)[0]


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
        rc, out = self.tests[command[0].removeprefix(TESTS_DIR + "/")]
        return subprocess.CompletedProcess(command, rc, out, "")


def with_tests(*names: str, **flags: bool) -> dict[str, Any]:
    facts = healthy()
    facts["tests"] = [{"name": n, "file": True, "executable": True, "runnable": True} | flags for n in names]
    return facts


def test_a_healthy_node_passes_builtins_then_tests_in_order() -> None:
    node = FakeNode(with_tests("10-a", "20-b"), tests={"10-a": (0, "fine\n"), "20-b": (0, "")})
    v = verify_node(TARGET, expectation(), run=node)
    assert v.ok, v.reason
    assert [r.name for r in v.results] == ["facts", "release", "services", "stale-code", "config", "filesystems",
                                           "state-version",
                                           "test:10-a", "test:20-b"]
    assert v.results[-1].output == "exit status 0"
    assert node.calls[1:] == [[f"{TESTS_DIR}/10-a"], [f"{TESTS_DIR}/20-b"]]
    assert v.reason == "node0 on R2: 9 checks passed" and v.finished is not None and v.finished >= v.started


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
