"""Service declarations (``/usr/share/imageupdate/services/NAME.json``): check one, fill its defaults.

A release declares each service it runs with one JSON file; the node's init
(``elements/imageupdate-node``) starts what it declares, the gate checks it,
the rollout's probe asks it and ``images diff`` reports what a change touches.
This module is the one place that says what a declaration may contain. The
packer refuses a build whose declarations have problems (exit 2, the file and
key named), so a typo such as ``stop_sigal`` never reaches a node where the
init would quietly ignore it.

:func:`parse_service` is pure (a path and decoded JSON in, the normalised
declaration and problems out); :func:`account_problems` checks the users and
groups a declaration names against the image's ``/etc/passwd`` and
``/etc/group``. Defaults that depend on the image's accounts (``group``: the
user's primary group; ``supplementary_groups``: every group listing the user,
as ``initgroups(3)`` does) stay ``None`` in the normalised form: the init
resolves them on the node from the same files, at each start.

The node's init is stdlib-only Python that must run on the image's own
interpreter, so it cannot import this module: it repeats the few rules it
needs, and skips (with a log line) what it cannot use.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from imageupdate.base.errors import InputError

KNOWN_KEYS = (
    "name", "command", "user", "group", "supplementary_groups", "working_directory", "environment",
    "runtime_directories", "stop_signal", "stop_timeout", "ports", "health", "probe", "paths", "packages",
)  # fmt: skip
RUNTIME_DIR_KEYS = ("path", "owner", "group", "mode")
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL")
DEFAULT_STOP_TIMEOUT = 5
MIN_STOP_TIMEOUT, MAX_STOP_TIMEOUT = 1, 60
DEFAULT_MODE = "0755"
RUNTIME_ROOT = "/run"
RESERVED_NAMES = ("sshd",)  # the init starts sshd itself, under that name in its status file
RESERVED_RUNTIME = ("/run/imageupdate",)  # the init's own status lives there

# Names the shadow utilities accept (useradd's default NAME_REGEX, widened to
# upper case and dots as Debian's adduser allows), at most 32 characters.
_ACCOUNT = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODE = re.compile(r"^[0-7]{3,4}$")
_HEALTH = re.compile(r"^/[\x21-\x7e]*$")  # printable, no spaces: it goes on an HTTP request line


def _type_name(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def bad(self, key: str, what: str) -> None:
        self.problems.append(f"{self.path}: {key!r} {what}")

    def string(self, key: str, value: object, *, account: bool = False) -> str | None:
        if not isinstance(value, str) or not value or "\0" in value:
            self.bad(key, f"must be a non-empty string (got {_type_name(value)})")
            return None
        if account and not _ACCOUNT.fullmatch(value):
            self.bad(key, f"must be a user or group name (got {value!r})")
            return None
        return value

    def absolute(self, key: str, value: object) -> str | None:
        text = self.string(key, value)
        if text is not None and not text.startswith("/"):
            self.bad(key, f"must be an absolute path (got {text!r})")
            return None
        return text

    def strings(self, key: str, value: object, *, account: bool = False, absolute: bool = False) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v and "\0" not in v for v in value):
            self.bad(key, "must be a list of non-empty strings")
            return []
        if account and not all(_ACCOUNT.fullmatch(v) for v in value):
            self.bad(key, f"must be a list of group names (got {value!r})")
            return []
        if absolute and not all(v.startswith("/") for v in value):
            self.bad(key, f"must be a list of absolute paths (got {value!r})")
            return []
        return list(value)


def _command(c: _Checker, value: object) -> list[str]:
    if value == []:
        c.bad("command", "must not be empty")
        return []
    command = c.strings("command", value)
    if command and not command[0].startswith("/"):
        c.bad("command", f"must start with an absolute path (got {command[0]!r})")
    return command


def _environment(c: _Checker, value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        c.bad("environment", f"must be an object of string to string (got {_type_name(value)})")
        return {}
    env: dict[str, str] = {}
    for name, text in value.items():
        if not _ENV_NAME.fullmatch(name):
            c.bad("environment", f"has an invalid variable name {name!r}")
        elif not isinstance(text, str) or "\0" in text:
            c.bad("environment", f"value of {name!r} must be a string (got {_type_name(text)})")
        else:
            env[name] = text
    return env


def _mode(c: _Checker, key: str, value: object) -> str:
    if not isinstance(value, str) or not _MODE.fullmatch(value):
        c.bad(key, f'must be an octal string such as "0755" or "2775" (got {value!r})')
        return DEFAULT_MODE
    return value.rjust(4, "0")


def runtime_dir_path(value: str) -> str | None:
    """The normalised path of a runtime directory, or ``None`` unless it lies strictly inside /run
    (and outside the init's own /run/imageupdate)."""
    if not value.startswith(RUNTIME_ROOT + "/") or "\0" in value:
        return None
    if any(part in (".", "..") for part in value.split("/")):
        return None
    norm = posixpath.normpath(value)
    if not norm.startswith(RUNTIME_ROOT + "/") or any(norm == r or norm.startswith(r + "/") for r in RESERVED_RUNTIME):
        return None
    return norm


def _runtime_directories(c: _Checker, value: object, user: str, group: str | None) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        c.bad("runtime_directories", f"must be a list of objects (got {_type_name(value)})")
        return []
    dirs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        key = f"runtime_directories[{i}]"
        if not isinstance(entry, dict):
            c.bad(key, f'must be an object such as {{"path": "/run/NAME"}} (got {_type_name(entry)})')
            continue
        for k in sorted(set(entry) - set(RUNTIME_DIR_KEYS)):
            c.bad(f"{key}.{k}", f"is not a known key (known: {', '.join(RUNTIME_DIR_KEYS)})")
        raw = c.string(f"{key}.path", entry.get("path"))
        path = runtime_dir_path(raw) if raw is not None else None
        if raw is not None and path is None:
            c.bad(f"{key}.path", "must be an absolute path inside /run/ (not /run/imageupdate), "
                  f"without '.' or '..' (got {raw!r})")
        if path is not None and path in seen:
            c.bad(f"{key}.path", f"repeats {path!r}")
        owner = c.string(f"{key}.owner", entry["owner"], account=True) if "owner" in entry else user
        dgroup = c.string(f"{key}.group", entry["group"], account=True) if "group" in entry else group
        mode = _mode(c, f"{key}.mode", entry["mode"]) if "mode" in entry else DEFAULT_MODE
        if path is not None:
            seen.add(path)
            dirs.append({"path": path, "owner": owner, "group": dgroup, "mode": mode})
    return dirs


def _stop_timeout(c: _Checker, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        c.bad("stop_timeout", f"must be a number of seconds (got {_type_name(value)})")
        return DEFAULT_STOP_TIMEOUT
    if not MIN_STOP_TIMEOUT <= value <= MAX_STOP_TIMEOUT:
        c.bad("stop_timeout", f"must be between {MIN_STOP_TIMEOUT} and {MAX_STOP_TIMEOUT} seconds (got {value})")
        return DEFAULT_STOP_TIMEOUT
    return int(value) if float(value).is_integer() else float(value)


def _ports(c: _Checker, value: object) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in value
    ):
        c.bad("ports", f"must be a list of integers 1..65535 (got {value!r})")
        return []
    if len(set(value)) != len(value):
        c.bad("ports", f"repeats a port (got {value!r})")
    return list(value)


def parse_service(path: str, data: object) -> tuple[dict[str, Any] | None, list[str]]:
    """Check one declaration; return it normalised (every key, defaults filled) and its problems.

    ``path`` names the file in each problem (``/usr/share/imageupdate/services/pg.json: unknown key
    'stop_sigal' (known: ...)``); its stem is the name the declaration must carry. The declaration
    is ``None`` only when ``data`` is not a JSON object; with problems, it holds what could be read.
    """
    c = _Checker(path)
    if not isinstance(data, dict):
        c.problems.append(f"{path}: must be a JSON object (got {_type_name(data)})")
        return None, c.problems
    stem = posixpath.basename(path)
    stem = stem[: -len(".json")] if stem.endswith(".json") else stem
    for key in sorted(set(data) - set(KNOWN_KEYS)):
        c.problems.append(f"{path}: unknown key {key!r} (known: {', '.join(KNOWN_KEYS)})")
    for key in ("name", "command"):
        if key not in data:
            c.problems.append(f"{path}: missing required key {key!r}")
    name = c.string("name", data["name"]) if "name" in data else None
    if name is not None and name != stem:
        c.bad("name", f"must equal the file's name {stem!r} (got {name!r})")
    if (name or stem) in RESERVED_NAMES:
        c.bad("name", f"{name or stem!r} is the node's own (its init runs it); name the service otherwise")
    command = _command(c, data["command"]) if "command" in data else []
    user = c.string("user", data["user"], account=True) if "user" in data else "root"
    group = None
    if data.get("group") is not None:
        group = c.string("group", data["group"], account=True)
    supplementary = None
    if data.get("supplementary_groups") is not None:
        supplementary = c.strings("supplementary_groups", data["supplementary_groups"], account=True)
    workdir = c.absolute("working_directory", data["working_directory"]) if "working_directory" in data else "/"
    env = _environment(c, data["environment"]) if "environment" in data else {}
    runtime = _runtime_directories(c, data["runtime_directories"], user or "root", group) \
        if "runtime_directories" in data else []
    stop_signal = data.get("stop_signal", "SIGTERM")
    if stop_signal not in STOP_SIGNALS:
        c.bad("stop_signal", f"must be one of {', '.join(STOP_SIGNALS)} (got {stop_signal!r})")
        stop_signal = "SIGTERM"
    stop_timeout = _stop_timeout(c, data["stop_timeout"]) if "stop_timeout" in data else DEFAULT_STOP_TIMEOUT
    ports = _ports(c, data["ports"]) if "ports" in data else []
    health = None
    if data.get("health") is not None:
        health = data["health"]
        if not isinstance(health, str) or not _HEALTH.fullmatch(health):
            c.bad("health", f'must be an HTTP path starting with "/", without spaces (got {health!r})')
            health = None
        elif not ports:
            c.bad("health", "needs 'ports': it is asked with HTTP GET on the first declared port")
    probe = data.get("probe", True)
    if not isinstance(probe, bool):
        c.bad("probe", f"must be true or false (got {probe!r})")
        probe = True
    decl: dict[str, Any] = {
        "name": name if name is not None else stem,
        "command": command,
        "user": user or "root",
        "group": group,
        "supplementary_groups": supplementary,
        "working_directory": workdir or "/",
        "environment": env,
        "runtime_directories": runtime,
        "stop_signal": stop_signal,
        "stop_timeout": stop_timeout,
        "ports": ports,
        "health": health,
        "probe": probe,
        "paths": c.strings("paths", data["paths"], absolute=True) if "paths" in data else [],
        "packages": c.strings("packages", data["packages"]) if "packages" in data else [],
    }
    return decl, c.problems


def parse_accounts(passwd: str, group: str) -> tuple[dict[str, int], dict[str, int], dict[str, list[str]]]:
    """From /etc/passwd and /etc/group text: user -> primary gid, group -> gid, group -> member names."""
    users: dict[str, int] = {}
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[3].isdigit():
            users.setdefault(fields[0], int(fields[3]))
    gids: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit():
            gids.setdefault(fields[0], int(fields[2]))
            members.setdefault(fields[0], [m for m in fields[3].split(",") if m])
    return users, gids, members


def account_problems(path: str, decl: dict[str, Any], passwd: str, group: str) -> list[str]:
    """Users and groups ``decl`` names that the image's /etc/passwd and /etc/group do not define."""
    users, gids, _ = parse_accounts(passwd, group)
    problems: list[str] = []

    def need(key: str, kind: str, name: object, known: dict[str, int]) -> None:
        if isinstance(name, str) and name not in known:
            problems.append(f"{path}: {key!r} names {kind} {name!r}, which the image's /etc/{kind_file[kind]} "
                            "does not define (create it in the element's install.d)")

    kind_file = {"user": "passwd", "group": "group"}
    need("user", "user", decl.get("user"), users)
    need("group", "group", decl.get("group"), gids)
    for g in decl.get("supplementary_groups") or []:
        need("supplementary_groups", "group", g, gids)
    for i, d in enumerate(decl.get("runtime_directories") or []):
        need(f"runtime_directories[{i}].owner", "user", d.get("owner"), users)
        need(f"runtime_directories[{i}].group", "group", d.get("group"), gids)
    return problems


def normalised(decl: dict[str, Any]) -> dict[str, Any]:
    """A manifest's declaration with every key present, leniently: manifests written before a key
    existed (or an ``invalid`` placeholder) still compare and read as the current form."""
    parsed, _ = parse_service(f"{decl.get('name', 'service')}.json", {k: v for k, v in decl.items()
                                                                     if k in KNOWN_KEYS})
    out = dict(parsed or {})
    if "invalid" in decl:
        out["invalid"] = decl["invalid"]
    return out


class InvalidServiceDeclaration(InputError):
    """A release ships a service declaration with unknown keys, wrong types or unknown accounts."""


def refusal(release: str | None, problems: list[str]) -> InvalidServiceDeclaration:
    """The build's refusal for ``problems`` (non-empty): the first named, the count of the rest."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return InvalidServiceDeclaration(
        f"release {release or '?'} ships an invalid service declaration: {problems[0]}{more}",
        release=release,
        step="pack",
    )
