"""SSH host keys of a cloud fleet's servers, pinned from what each server publishes on first boot.

A gate is decided over SSH: whoever answers on a server's address as that server decides it. So a server's
host key is never taken from the first connection's answer. On its first boot a node prints its public host
keys to its console between ``-----BEGIN SSH HOST KEY KEYS-----`` and ``-----END SSH HOST KEY KEYS-----``
(the block cloud-init prints; the ``imageupdate-node`` element's ``node-firstboot`` prints the same), and Nova
keeps the console log. imageupdate reads it through the compute API (authenticated, not the server's
network address) when the fleet is created, or when a node has no pin yet, and writes the keys to
``FLEET/known_hosts`` under the alias ``imageupdate-NODE``. Every connection after checks the key
(``StrictHostKeyChecking=yes``); a changed key fails the gate and says so. A server replaced on purpose is
re-learned with ``imageupdate cloud forget-host-key NODE``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from imageupdate.base.errors import InputError, OperationError

KNOWN_HOSTS = "known_hosts"
BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
END = "-----END SSH HOST KEY KEYS-----"
MAX_KEYS = 8
MAX_CONSOLE = 4 * 1024 * 1024  # characters of console read: the block is printed at first boot
LEARN_TIMEOUT = 300.0  # seconds a new server has to print its keys after Nova says ACTIVE
_KEY = re.compile(r"(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa) ([A-Za-z0-9+/]{20,4096}={0,3})(?:\s.*)?")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class HostKeyUnknown(OperationError):
    """A server did not publish its SSH host keys on its console, so none can be pinned."""


def alias(node: str) -> str:
    return f"imageupdate-{node}"


def parse_console(text: str) -> list[tuple[str, str]]:
    """The (type, base64) host keys of the first complete key block in a console log; [] if there is none.
    Console text is the server's own output: lines are checked one by one, the count is bounded."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != BEGIN:
            continue
        keys: list[tuple[str, str]] = []
        for raw in lines[i + 1:]:
            inner = raw.strip()
            if inner == END:
                return keys
            m = _KEY.fullmatch(inner)
            if m and len(keys) < MAX_KEYS:
                keys.append((m.group(1), m.group(2)))
        return []  # a block the console cut short: not a list of keys
    return []


def read(path: Path) -> dict[str, list[tuple[str, str]]]:
    """node -> pinned keys."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {}
    out: dict[str, list[tuple[str, str]]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0].startswith("imageupdate-"):
            out.setdefault(fields[0].removeprefix("imageupdate-"), []).append((fields[1], fields[2]))
    return out


def _write(path: Path, pins: dict[str, list[tuple[str, str]]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as f:
            f.write("# SSH host keys of this fleet's servers, as each printed them on its console at boot\n")
            for node in sorted(pins):
                f.writelines(f"{alias(node)} {t} {k}\n" for t, k in pins[node])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def pin(path: Path, node: str, keys: list[tuple[str, str]]) -> None:
    pins = read(path)
    pins[node] = keys
    _write(path, pins)


def forget(path: Path, node: str) -> bool:
    if not _NODE.fullmatch(node):
        raise InputError(f"node name {node!r} is not allowed")
    pins = read(path)
    if pins.pop(node, None) is None:
        return False
    _write(path, pins)
    return True


def learn(console: Callable[[], str], node: str, path: Path, sleep: Callable[[float], None] = time.sleep,
          timeout: float = LEARN_TIMEOUT, interval: float = 3.0) -> list[tuple[str, str]]:
    """Pin ``node``'s keys from its console (``console`` returns the log); waits for the block to appear."""
    retrying = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(interval), sleep=sleep,
                        retry=retry_if_result(lambda keys: not keys))
    try:
        keys = retrying(lambda: parse_console(console()))
    except RetryError:
        raise HostKeyUnknown(f"server {node} printed no SSH host keys on its console within {timeout:.0f} s "
                             f"('{BEGIN}' block): its host key cannot be pinned, so no gate can trust an SSH "
                             "answer from it; check its image prints them (cloud-init or imageupdate-node)",
                             node=node, step="host-key") from None
    pin(path, node, keys)
    return keys


def console_of(conn: Any, server: Any) -> Callable[[], str]:
    def fetch() -> str:
        try:
            out = conn.compute.get_server_console_output(server)
        except Exception:  # noqa: BLE001 - sdk/keystoneauth errors: not there yet, asked again until the bound
            return ""
        return str((out or {}).get("output") or "")[:MAX_CONSOLE]
    return fetch
