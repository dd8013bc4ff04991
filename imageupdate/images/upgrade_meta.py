"""Release upgrade metadata: ``/usr/share/imageupdate/upgrade.json`` in the image, copied into the manifest.

::

    {
      "product": "sample-workload",   # optional: the product line; a path never mixes two
      "version": "3",                 # sortable: dot-separated integers
      "state_version": 3,             # the state version this release's code runs on
      "min_from": "2",                # optional: the oldest version this release upgrades from directly
      "migrations": [                 # this release's own steps, in order, each idempotent
        {"name": "0003-add-created", "state_version": 3, "kind": "expand"}
      ],
      "config": {                     # the release's config schema, per file
        "/etc/sample-workload/sample-workload.conf": {
          "format": "ini",
          "options": ["storage.sync"],
          "deprecated": {"storage.fsync": {"since": "2", "replacement": "storage.sync"}},
          "removed": {}
        }
      },
      "volatile": [                   # optional: node paths the rehearsal's file digest leaves out
        "/var/lib/sample-workload/cache"
      ]
    }

A migration named N is the executable ``/usr/share/imageupdate/migrations/N``; ``expand`` means the previous
release's code still works on the state after it, ``contract`` that it no longer does. Steps produce
consecutive state versions ending at the release's ``state_version``.

The rehearsal runs each step twice and compares the state after each run. By default it compares every
file of the state (``imageupdate.upgrade.rehearse.digest``); ``volatile`` names what a service rewrites
whenever it runs (a database's control file, WAL, statistics), left out of that comparison with
everything beneath it. Each is an absolute, normalised node path under one of the release's state paths
(checked at build, where the packer knows them), at most ``MAX_VOLATILE`` of them, each at most
``MAX_PATH`` characters: a list, not patterns, so what the comparison skips is visible in the metadata.
A release that understands its state better ships ``STATE_DIGEST`` instead (schema and row checksums,
say): an executable run in the release's sandbox like a migration, whose stdout the rehearsal compares.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageupdate.base import confined
from imageupdate.base.errors import ImageUpdateError

UPGRADE_FILE = "usr/share/imageupdate/upgrade.json"
MAX_META = 1 << 20  # bytes of upgrade.json read at most
STATE_DIGEST = "/usr/share/imageupdate/state-digest"
MAX_VOLATILE = 64
MAX_PATH = 1024
KINDS = ("expand", "contract")
_VERSION = re.compile(r"^\d+(\.\d+)*$")
_PRODUCT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@dataclass(frozen=True)
class Migration:
    name: str
    state_version: int
    kind: str  # expand | contract
    release: str = ""  # the release whose image runs it (set by the planner)

    @property
    def path(self) -> str:
        return f"/usr/share/imageupdate/migrations/{self.name}"


@dataclass(frozen=True)
class OptionChange:
    since: str  # the version that deprecated or removed the option
    replacement: str | None


@dataclass(frozen=True)
class ConfigSchema:
    path: str
    format: str
    options: frozenset[str]
    deprecated: dict[str, OptionChange]
    removed: dict[str, OptionChange]


@dataclass(frozen=True)
class ReleaseMeta:
    version: str
    state_version: int
    min_from: str | None = None
    migrations: tuple[Migration, ...] = ()
    config: dict[str, ConfigSchema] = field(default_factory=dict)
    volatile: tuple[str, ...] = ()  # node paths the rehearsal's file digest leaves out
    product: str | None = None  # the product line: versions and state versions mean something only within one

    @property
    def key(self) -> tuple[int, ...]:
        return version_key(self.version)

    @property
    def first_state_version(self) -> int:
        """The state version this release's steps start from."""
        return self.migrations[0].state_version - 1 if self.migrations else self.state_version


def _changes(raw: Any, where: str, problems: list[str]) -> dict[str, OptionChange]:
    out: dict[str, OptionChange] = {}
    if not isinstance(raw, dict):
        problems.append(f"{where} must be an object of option: {{since, replacement}}")
        return out
    for opt, spec in raw.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("since"), str) or not _VERSION.match(spec["since"]):
            problems.append(f"{where}.{opt} needs 'since', a version like \"2\"")
            continue
        repl = spec.get("replacement")
        out[opt] = OptionChange(spec["since"], repl if isinstance(repl, str) else None)
    return out


def under(path: str, roots: Sequence[str]) -> bool:
    """``path`` is one of ``roots`` or beneath one (node paths, absolute)."""
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _volatile(raw: Any, state_paths: list[str] | None, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_VOLATILE:
        problems.append(f"'volatile' must be a list of at most {MAX_VOLATILE} absolute paths")
        return ()
    out: list[str] = []
    for p in raw:
        if (not isinstance(p, str) or not p.startswith("/") or p.startswith("//") or p == "/"
                or len(p) > MAX_PATH or posixpath.normpath(p) != p):
            problems.append(f"volatile {p!r}: an absolute path of at most {MAX_PATH} characters, normalised "
                            "(no '..', '.', '//' or trailing '/'), not / itself")
        elif state_paths is not None and not under(p, state_paths):
            problems.append(f"volatile {p} is not under a state path of this release "
                            f"({', '.join(state_paths) or 'it registers none'})")
        else:
            out.append(p)
    return tuple(out)


def parse(data: Any, shipped: set[str] | None = None,
          state_paths: list[str] | None = None) -> tuple[ReleaseMeta | None, list[str]]:
    """Validate ``upgrade.json``; ``shipped`` = migration file names the image has, ``state_paths`` = the
    image's registered state paths (each checked when given)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return None, ["upgrade.json must be a JSON object"]
    version = data.get("version")
    if not isinstance(version, str) or not _VERSION.match(version):
        problems.append("'version' must be a string of dot-separated integers, like \"3\" or \"2.1\"")
    state_version = data.get("state_version")
    if not isinstance(state_version, int) or isinstance(state_version, bool) or state_version < 1:
        problems.append("'state_version' must be an integer >= 1")
        state_version = 0
    min_from = data.get("min_from")
    if min_from is not None and (not isinstance(min_from, str) or not _VERSION.match(min_from)):
        problems.append("'min_from' must be a version string like \"2\"")
        min_from = None
    migrations: list[Migration] = []
    raw_migrations = data.get("migrations", [])
    if not isinstance(raw_migrations, list):
        problems.append("'migrations' must be a list")
        raw_migrations = []
    for i, m in enumerate(raw_migrations):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or "/" in m["name"] or not m["name"]:
            problems.append(f"migrations[{i}] needs a 'name' (a file in /usr/share/imageupdate/migrations)")
            continue
        if m.get("kind") not in KINDS:
            problems.append(f"migration {m['name']}: 'kind' must be 'expand' or 'contract'")
            continue
        sv = m.get("state_version")
        if not isinstance(sv, int) or isinstance(sv, bool):
            problems.append(f"migration {m['name']}: 'state_version' must be an integer")
            continue
        migrations.append(Migration(m["name"], sv, m["kind"]))
    if migrations and not problems:
        first = migrations[0].state_version
        want = list(range(first, first + len(migrations)))
        if [m.state_version for m in migrations] != want or want[-1] != state_version:
            problems.append(f"migrations must produce consecutive state versions ending at state_version "
                            f"{state_version}; they produce {[m.state_version for m in migrations]}")
    if shipped is not None:
        listed = {m.name for m in migrations}
        for name in sorted(listed - shipped):
            problems.append(f"migration {name} is listed but /usr/share/imageupdate/migrations/{name} is not shipped")
        for name in sorted(shipped - listed):
            problems.append(f"/usr/share/imageupdate/migrations/{name} is shipped but not listed in upgrade.json")
    config: dict[str, ConfigSchema] = {}
    raw_config = data.get("config", {})
    if not isinstance(raw_config, dict):
        problems.append("'config' must be an object of file path: schema")
        raw_config = {}
    for path, spec in raw_config.items():
        if not path.startswith("/") or not isinstance(spec, dict):
            problems.append(f"config {path!r}: an absolute path with a schema object")
            continue
        if spec.get("format", "ini") != "ini":
            problems.append(f"config {path}: format {spec.get('format')!r} is not supported (ini)")
            continue
        options = spec.get("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) and "." in o for o in options):
            problems.append(f"config {path}: 'options' must list 'section.key' names")
            continue
        config[path] = ConfigSchema(path, "ini", frozenset(options),
                                    _changes(spec.get("deprecated", {}), f"config {path} deprecated", problems),
                                    _changes(spec.get("removed", {}), f"config {path} removed", problems))
    volatile = _volatile(data.get("volatile", []), state_paths, problems)
    product = data.get("product")
    if product is not None and (not isinstance(product, str) or not _PRODUCT.match(product)):
        problems.append("'product' must be a name of lower-case letters, digits, '.', '_' and '-' (at most 64)")
    if problems:
        return None, problems
    assert isinstance(version, str) and isinstance(state_version, int)
    return ReleaseMeta(version, state_version, min_from, tuple(migrations), config, volatile, product), []


def from_manifest(upgrade: dict[str, Any] | None) -> ReleaseMeta | None:
    """The metadata a manifest recorded (validated at build time); None for a release without any."""
    if not upgrade:
        return None
    meta, problems = parse(upgrade)
    return meta if not problems else None



def from_tree(tree: Path) -> ReleaseMeta | None:
    """The metadata of an unpacked release (None: it has none, or it is invalid)."""
    try:  # the image controls the tree: no link followed out of it, no endless file read
        data = json.loads(confined.read_bytes(tree, UPGRADE_FILE, MAX_META))
    except (OSError, ValueError, ImageUpdateError):
        return None
    meta, problems = parse(data)
    return meta if not problems else None
