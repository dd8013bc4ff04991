"""The checks a gate runs on a node after its rebuild, from the orchestrator's side, over SSH.

1. ``facts``: one SSH call runs ``node_facts.py`` on the node's own python3 and brings back what the
   built-in checks need (the node must answer). The declared health endpoints are asked there too, so
   the call's bound is the health bound plus 30 s;
2. the built-in checks (``builtin.py``): ``release``, ``services``, ``health``, ``stale-code``,
   ``config``, ``filesystems``, ``state-version``;
3. ``test:NAME``: each post-deploy test the release ships in ``/usr/share/imageupdate/tests/``: an
   executable file (a ``#!`` script or an ELF binary), run on the node as root from ``/`` (``env -C /``:
   an SSH session starts in root's home) with a bound; exit status 0 passes, anything else fails, its
   output is the evidence. A file that is not executable or not runnable fails without running.
   Skipped when the node runs the wrong release;
4. whatever the caller adds (the operator's resource ``verify`` hooks, and ``probe_check``: what the
   rollout's downtime probe saw of the node during its gate).

Every check yields a ``CheckResult``; the ``Verdict`` sums them up for the gate's reason and data.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from imageupdate.base.text import last_line
from imageupdate.verify import node_facts
from imageupdate.verify.builtin import BUILTIN, Expectation
from imageupdate.verify.probe import NodeProbe

TESTS_DIR = "/usr/share/imageupdate/tests"
FACTS_COMMAND = ["python3", "-"]
TEST_TIMEOUT = 120.0
FACTS_SCRIPT = (Path(__file__).with_name("node_facts.py")).read_text()
SSH_TIMEOUT = node_facts.HEALTH_TIMEOUT + 30.0  # the facts wait for the health endpoints, at most this long
# A guest (a VM node, a cloud server) gets longer: its sshd and the facts script run under emulation (TCG here,
# nested virtualisation in many CI clouds) on a host that may be busy. Seen with two TCG guests beside a
# rollout on 2 cores: the SSH banner exchange passed 5 s, and the facts script (which hashes the code it finds
# on a root the host did not unpack) passed 45 s.
CONNECT_TIMEOUT = 5
GUEST_CONNECT_TIMEOUT = 30
GUEST_SSH_TIMEOUT = SSH_TIMEOUT + 75.0
PROBE_MIN_DOWN = 3  # fewer failed requests than this prove nothing about a whole gate


@dataclass(frozen=True)
class NodeTarget:
    name: str
    address: str
    key: Path
    user: str = "root"
    known_hosts: Path | None = None  # pinned host keys (cloud fleets: imageupdate.cloud.hostkeys); None: not checked
    # the node's root is a read-only tree the host unpacked from an artifact whose sha256 it checked (a local
    # namespace node): code on it is not hashed again at every gate
    root_verified: bool = False
    guest: bool = False  # a virtual machine: slower to answer (GUEST_CONNECT_TIMEOUT, GUEST_SSH_TIMEOUT)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    seconds: float
    output: str


@dataclass
class Verdict:
    node: str
    release: str
    results: list[CheckResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    @property
    def reason(self) -> str:
        if self.ok:
            return f"{self.node} on {self.release}: {len(self.results)} checks passed"
        if not self.results:
            return f"{self.node} on {self.release}: no check ran"
        first = self.failed[0]
        detail = last_line(first.output, "failed")
        more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
        return f"{self.node} on {self.release}: check {first.name} failed: {detail[:200]}{more}"

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "release": self.release, "ok": self.ok, "reason": self.reason,
                "started": self.started, "finished": self.finished, "checks": [asdict(r) for r in self.results]}


class Runner(Protocol):
    def __call__(self, target: NodeTarget, command: list[str], timeout: float,
                 input: str | None = None) -> subprocess.CompletedProcess[str]: ...


def _control_path() -> str:
    """One SSH connection per node for all its checks (a handshake costs more than most checks);
    short, private, and not under the site (a socket path must fit in 108 bytes)."""
    d = Path(tempfile.gettempdir()) / f"imageupdate-ssh-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return str(d / "%C")


def _pinned(target: NodeTarget) -> bool:
    try:
        text = target.known_hosts.read_text(errors="replace") if target.known_hosts else ""
    except OSError:
        return False
    return any(line.startswith(f"imageupdate-{target.name} ") for line in text.splitlines())


def _quoted(path: Path) -> str:
    """A path as one ssh_config argument: ssh expands % tokens and splits at spaces."""
    return '"' + str(path).replace("%", "%%") + '"'


def _host_key_options(target: NodeTarget) -> list[str]:
    """A pinned key is checked under the node's alias (its address may change); without a pin (a local site's
    node, on a bridge only root on the host reaches) nothing is checked or remembered."""
    if target.known_hosts is None:
        # and the classic key exchange: the post-quantum default (sntrup761) cost the client 0.1 s of CPU per
        # connection, a gate's largest share, and guards against nobody on a bridge only root reaches
        return ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "KexAlgorithms=curve25519-sha256"]
    return ["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={_quoted(target.known_hosts)}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlias=imageupdate-{target.name}",
            "-o", "UpdateHostKeys=no"]


def _ssh_base(target: NodeTarget, shared: bool = True) -> list[str]:
    share = ["-o", f"ControlPath={_control_path()}", "-o", "ControlMaster=auto", "-o", "ControlPersist=15"] \
        if shared else ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return ["ssh", "-i", str(target.key), *_host_key_options(target), "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={GUEST_CONNECT_TIMEOUT if target.guest else CONNECT_TIMEOUT}",
            "-o", "LogLevel=ERROR", *share]


HOST_KEY_CHANGED = "the SSH host key"


def ssh(target: NodeTarget, command: list[str], timeout: float, input: str | None = None,
        shared: bool = True) -> subprocess.CompletedProcess[str]:
    """``command`` on the node as ``target.user``, the host key checked against the pinned one. ``shared``: over
    the node's shared connection (a gate's checks, closed by ``close_ssh``); a one-off read outside a gate
    passes False, so no connection outlives it (a later one would reuse it without a host key check)."""
    cmd = [*_ssh_base(target, shared), f"{target.user}@{target.address}", "--", *command]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              input=input if input is not None else "")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout:.0f} s")
    if done.returncode == 255 and target.known_hosts is not None and "Host key verification failed" in done.stderr:
        if not _pinned(target):
            done.stderr = (f"{HOST_KEY_CHANGED} of {target.name} is not known: it printed none on its console that "
                           "imageupdate could read when it was created, so no answer from it counts; reboot it (it "
                           f"prints its keys at boot) or see {target.known_hosts}\n")
            return done
        done.stderr = (f"{HOST_KEY_CHANGED} at {target.address} is not the one {target.name} printed at creation: "
                       "someone else may be answering there; if it was replaced on purpose: imageupdate cloud "
                       f"forget-host-key {target.name}\n")
    return done


def close_ssh(target: NodeTarget) -> None:
    """End the node's shared connection now rather than after ControlPersist."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run([*_ssh_base(target), "-O", "exit", f"{target.user}@{target.address}"], capture_output=True,
                       timeout=5, check=False)


def _timed(name: str, fn: Callable[[], tuple[bool, str]]) -> CheckResult:
    """Run one check; one that raises (facts a hostile node shaped oddly) fails alone, naming why, and the
    other checks still give their evidence."""
    t0 = time.monotonic()
    try:
        ok, output = fn()
    except Exception as e:  # noqa: BLE001 - fail closed, per check
        ok, output = False, f"the node's facts could not be judged: {e.__class__.__name__}: {e}"[:400]
    return CheckResult(name, ok, round(time.monotonic() - t0, 3), output)


def verify_node(target: NodeTarget, want: Expectation, run: Runner | None = None,
                extra: Callable[[], list[CheckResult]] | None = None) -> Verdict:
    """Run the checks over SSH (or through ``run``, which tests inject); ``extra`` adds the caller's own."""
    try:
        verdict = _verify(target, want, run or ssh)
    finally:
        if run is None:
            close_ssh(target)
    if extra is not None:
        verdict.results.extend(extra())
    verdict.finished = time.time()
    return verdict


def _facts(target: NodeTarget, run: Runner) -> tuple[dict[str, Any] | None, CheckResult]:
    t0 = time.monotonic()
    command = [*FACTS_COMMAND, node_facts.ROOT_VERIFIED] if target.root_verified else FACTS_COMMAND
    p = run(target, command, GUEST_SSH_TIMEOUT if target.guest else SSH_TIMEOUT, input=FACTS_SCRIPT)
    took = round(time.monotonic() - t0, 3)
    if p.returncode != 0:
        said = last_line(p.stderr, f"exit status {p.returncode}")
        if p.returncode == 255 and said.startswith(HOST_KEY_CHANGED):
            return None, CheckResult("host-key", False, took, said)
        if p.returncode == 255 or p.returncode == 124:
            return None, CheckResult("facts", False, took, f"node does not answer over SSH at {target.address}: "
                                                           f"{said}")
        return None, CheckResult("facts", False, took, f"could not read the node's facts: {said}")
    try:
        facts = json.loads(p.stdout)
    except ValueError:
        facts = None
    if not isinstance(facts, dict):
        return None, CheckResult("facts", False, took, "the node's facts are not a JSON object: "
                                                      f"{p.stdout.strip()[:200]!r}")
    return facts, CheckResult("facts", True, took, f"{len(facts.get('processes', []))} processes, "
                                                   f"{len(facts.get('etc', {}))} paths under /etc")


def _verify(target: NodeTarget, want: Expectation, run: Runner) -> Verdict:
    verdict = Verdict(target.name, want.release)
    facts, result = _facts(target, run)
    verdict.results.append(result)
    if facts is None:
        return verdict
    for name, check in BUILTIN:
        verdict.results.append(_timed(name, lambda check=check: check(facts, want)))  # type: ignore[misc]
    if not verdict.results[1].ok:  # the wrong release: its tests would test something else
        return verdict
    for test in facts.get("tests", []):
        name = test["name"]
        problem = None
        if not test.get("file"):
            problem = f"{TESTS_DIR}/{name} is not a regular file"
        elif not test.get("executable"):
            problem = (f"{TESTS_DIR}/{name} is not executable: ship it with mode 0755 "
                       "(or remove it from the element)")
        elif not test.get("runnable"):
            problem = f"{TESTS_DIR}/{name} is neither a #! script nor an ELF binary"
        if problem is not None:
            verdict.results.append(CheckResult(f"test:{name}", False, 0.0, problem))
            continue

        def shipped(name: str = name) -> tuple[bool, str]:
            p = run(target, ["env", "-C", "/", f"{TESTS_DIR}/{name}"], TEST_TIMEOUT)
            said = (p.stdout + p.stderr).strip()
            return p.returncode == 0, said or f"exit status {p.returncode}"
        verdict.results.append(_timed(f"test:{name}", shipped))
    return verdict


def probe_check(probe: NodeProbe | None, since: float, until: float) -> CheckResult | None:
    """What the rollout's downtime probe saw of a node during its gate [since, until] (the probe's clock):
    fails when the service was down for the whole gate (at least ``PROBE_MIN_DOWN`` requests, none
    answered); None when the node was not probed."""
    if probe is None:
        return None
    w = probe.window(since, until)
    target = probe.endpoint.describe()
    if w.requests >= PROBE_MIN_DOWN and not w.any_ok:
        return CheckResult("probe", False, 0.0, f"probe: {target} was down for the whole gate ({w.failures} of "
                                                f"{w.requests} requests failed over {w.seconds:.1f} s)")
    if not w.requests:
        said = f"was not asked during the gate ({w.seconds:.1f} s)"
    elif not w.any_ok:
        said = f"failed {w.failures} of {w.requests} requests over {w.seconds:.1f} s: too few to judge"
    else:
        said = (f"answered {w.requests - w.failures} of {w.requests} requests over {w.seconds:.1f} s"
                + (f" ({w.failures} failed)" if w.failures else ""))
    return CheckResult("probe", True, 0.0, f"probe: {target} {said}")
