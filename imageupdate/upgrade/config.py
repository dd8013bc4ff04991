"""Config compatibility: the operator's config files against the schema of every release up to a target.

Each option (``section.key`` of an INI file) is followed through the releases in version order: removed
in one of them is an error naming that release and the replacement; deprecated is a warning; unknown to
the target is a warning (the service would ignore it). A file that does not parse is bad input.
"""

from __future__ import annotations

import configparser
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imageupdate.base.errors import InputError
from imageupdate.images.upgrade_meta import ReleaseMeta
from imageupdate.upgrade.plan import ReleaseInfo


class ConfigUnparseable(InputError):
    """A config file that is not valid INI."""


class ConfigIncompatible(InputError):
    """Config uses an option the target release (or one on the way) removed."""


@dataclass(frozen=True)
class ConfigFinding:
    level: str  # error | warning
    source: str  # where the config came from (a file, or NODE:PATH)
    file: str  # the schema's path of the file
    option: str
    release: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.level}: {self.source}: {self.message}"


@dataclass(frozen=True)
class ConfigFile:
    source: str
    schema_path: str
    text: str


def options(cfg: ConfigFile) -> list[str]:
    parser = configparser.ConfigParser(interpolation=None, default_section="__no_default__")
    try:
        parser.read_string(cfg.text, source=cfg.source)
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        raise ConfigUnparseable(f"{cfg.source} is not a valid INI config file: {first}; fix it and run again",
                                step="check-config") from None
    return [f"{section}.{key}" for section in parser.sections() for key in parser[section]]


def check(files: list[ConfigFile], path: list[ReleaseInfo], target: str) -> list[ConfigFinding]:
    """``path``: the releases after the fleet's, up to and including ``target``, in version order."""
    metas = [(r.release, r.meta) for r in path if r.meta is not None]
    target_meta = next((m for rel, m in metas if rel == target), None)
    findings: list[ConfigFinding] = []
    for cfg in files:
        for opt in options(cfg):
            findings.extend(_follow(cfg, opt, metas, target, target_meta))
    return findings


def _follow(cfg: ConfigFile, opt: str, metas: list[tuple[str, ReleaseMeta]], target: str,
            target_meta: ReleaseMeta | None) -> list[ConfigFinding]:
    out: list[ConfigFinding] = []
    section, _, key = opt.partition(".")
    name = f"[{section}] {key}"
    warned = False
    for release, meta in metas:
        schema = meta.config.get(cfg.schema_path)
        if schema is None:
            continue
        if opt in schema.removed:
            change = schema.removed[opt]
            use = f"use {_name(change.replacement)} instead" if change.replacement else "drop it"
            out.append(ConfigFinding("error", cfg.source, cfg.schema_path, opt, release,
                               f"{name} was removed in {release} (version {change.since}): {use}"))
            return out
        if opt in schema.deprecated and not warned:
            change = schema.deprecated[opt]
            use = f"; use {_name(change.replacement)}" if change.replacement else ""
            out.append(ConfigFinding("warning", cfg.source, cfg.schema_path, opt, release,
                               f"{name} is deprecated since version {change.since} ({release}){use}"))
            warned = True
    schema = target_meta.config.get(cfg.schema_path) if target_meta else None
    if schema is not None and opt not in schema.options and opt not in schema.deprecated:
        out.append(ConfigFinding("warning", cfg.source, cfg.schema_path, opt, target,
                           f"{name} is unknown to {target}: it will be ignored"))
    return out


def _name(option: str) -> str:
    section, _, key = option.partition(".")
    return f"[{section}] {key}"


def files_given(paths: list[Path], schemas: set[str]) -> list[ConfigFile]:
    """Operator-given files, each matched to a schema file by its name."""
    by_name: dict[str, list[str]] = {}
    for s in schemas:
        by_name.setdefault(Path(s).name, []).append(s)
    out = []
    for p in paths:
        if not p.is_file():
            raise InputError(f"config file {p} does not exist", step="check-config")
        matches = by_name.get(p.name, [])
        if len(matches) != 1:
            known = ", ".join(sorted(schemas)) or "none"
            raise InputError(f"{p}: no release on the path has a config file named {p.name} "
                             f"(they know: {known})", step="check-config")
        out.append(ConfigFile(str(p), matches[0], p.read_text(errors="replace")))
    return out


def raise_errors(findings: list[ConfigFinding]) -> None:
    errors = [f for f in findings if f.level == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigIncompatible(f"{errors[0].source}: {errors[0].message}{more}; nothing was started",
                                 release=errors[0].release, step="check-config")
