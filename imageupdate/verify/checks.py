"""The checks a gate runs on a node after its rebuild, from the orchestrator's side, over SSH.

- ``release``: the node answers over SSH and its release stamp names the release it should run;
- ``test:NAME``: each post-deploy test the release ships in ``/usr/share/imageupdate/tests/`` (executables,
  exit status 0 = pass), run on the node with a bound.

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

TESTS_DIR = "/usr/share/imageupdate/tests"
LIST_TESTS = ["sh", "-c", f"test ! -e {TESTS_DIR} || ls -1 {TESTS_DIR}"]  # no directory: the release ships none
TEST_TIMEOUT = 120.0
SSH_TIMEOUT = 30.0


@dataclass(frozen=True)
class NodeTarget:
    name: str
    address: str
    key: Path


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
        detail = first.output.strip().splitlines()[-1] if first.output.strip() else "failed"
        more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
        return f"{self.node} on {self.release}: check {first.name} failed: {detail[:200]}{more}"

    def to_dict(self) -> dict[str, object]:
        return {"node": self.node, "release": self.release, "ok": self.ok, "reason": self.reason,
                "checks": [asdict(r) for r in self.results]}


Runner = Callable[[NodeTarget, list[str], float], "subprocess.CompletedProcess[str]"]


def _control_path() -> str:
    """One SSH connection per node for all its checks (a handshake costs more than most checks);
    short, private, and not under the site (a socket path must fit in 108 bytes)."""
    d = Path(tempfile.gettempdir()) / f"imageupdate-ssh-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return str(d / "%C")


def _ssh_base(target: NodeTarget) -> list[str]:
    return ["ssh", "-i", str(target.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
            "-o", f"ControlPath={_control_path()}", "-o", "ControlMaster=auto", "-o", "ControlPersist=15"]


def ssh(target: NodeTarget, command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [*_ssh_base(target), f"root@{target.address}", "--", *command]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout:.0f} s")


def close_ssh(target: NodeTarget) -> None:
    """End the node's shared connection now rather than after ControlPersist."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run([*_ssh_base(target), "-O", "exit", f"root@{target.address}"], capture_output=True,
                       timeout=5, check=False)


def _timed(name: str, fn: Callable[[], tuple[bool, str]]) -> CheckResult:
    t0 = time.monotonic()
    ok, output = fn()
    return CheckResult(name, ok, round(time.monotonic() - t0, 3), output)


def verify_node(target: NodeTarget, release: str, run: Runner | None = None) -> Verdict:
    """Run the checks over SSH (or through ``run``, which tests inject)."""
    if run is not None:
        return _verify(target, release, run)
    try:
        return _verify(target, release, ssh)
    finally:
        close_ssh(target)


def _verify(target: NodeTarget, release: str, run: Runner) -> Verdict:
    verdict = Verdict(target.name, release)

    def stamp() -> tuple[bool, str]:
        p = run(target, ["cat", "/etc/imageupdate/release.json"], SSH_TIMEOUT)
        if p.returncode != 0:
            return False, f"node does not answer over SSH at {target.address}: {p.stderr.strip() or p.returncode}"
        try:
            stamp = json.loads(p.stdout)
        except ValueError:
            stamp = None
        if not isinstance(stamp, dict):
            return False, "release stamp /etc/imageupdate/release.json is not a JSON object with a release"
        found = stamp.get("release")
        if found != release:
            return False, f"node runs {found!r}, expected {release!r}"
        return True, f"runs {release}"

    verdict.results.append(_timed("release", stamp))
    if not verdict.ok:
        return verdict
    # A release may ship no tests (the directory is absent); any other failure to list them fails the gate.
    listing = run(target, LIST_TESTS, SSH_TIMEOUT)
    if listing.returncode != 0:
        verdict.results.append(CheckResult("tests", False, 0.0, f"cannot list {TESTS_DIR}: "
                                           f"{listing.stderr.strip() or f'exit status {listing.returncode}'}"))
        return verdict
    names = sorted(n for n in listing.stdout.split() if n)
    for name in names:
        def test(name: str = name) -> tuple[bool, str]:
            p = run(target, [f"{TESTS_DIR}/{name}"], TEST_TIMEOUT)
            said = (p.stdout + p.stderr).strip()
            return p.returncode == 0, said or f"exit status {p.returncode}"
        verdict.results.append(_timed(f"test:{name}", test))
    return verdict
