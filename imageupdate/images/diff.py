"""Compare two releases before rolling anything: packages, files, kernel, services.

The service part is the input for a later "restart or reboot" decision: a
declared service is affected when a file under one of its ``paths`` or of one
of its ``packages`` changed, or when it appears, disappears or its
declaration changed. A kernel change means a reboot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imageupdate.images.fileindex import FileEntry
from imageupdate.images.manifest import Manifest


@dataclass
class PackageChange:
    name: str
    old: str | None
    new: str | None


@dataclass
class FileGroup:
    """Changed paths under one package (``pkg:NAME``) or directory (``dir:PATH``)."""

    group: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)


@dataclass
class ServiceImpact:
    name: str
    status: str  # added | removed | changed | unchanged
    reasons: list[str] = field(default_factory=list)


@dataclass
class ReleaseDiff:
    old: str
    new: str
    packages_added: list[PackageChange]
    packages_removed: list[PackageChange]
    packages_changed: list[PackageChange]
    files: list[FileGroup]
    kernel_old: str | None
    kernel_new: str | None
    services: list[ServiceImpact]
    tests_changed: list[str]
    migrations_added: list[str]

    @property
    def kernel_changed(self) -> bool:
        return self.kernel_old != self.kernel_new

    @property
    def action(self) -> str:
        """What a node needs after the swap: reboot, restart, or none."""
        if self.kernel_changed:
            return "reboot"
        if any(s.status != "unchanged" for s in self.services):
            return "restart"
        return "none"

    @property
    def files_total(self) -> dict[str, int]:
        return {
            "added": sum(len(g.added) for g in self.files),
            "removed": sum(len(g.removed) for g in self.files),
            "changed": sum(len(g.changed) for g in self.files),
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kernel_changed"] = self.kernel_changed
        data["action"] = self.action
        data["files_total"] = self.files_total
        return data


def group_of(entry: FileEntry, depth: int = 3) -> str:
    if entry.package:
        return f"pkg:{entry.package}"
    parts = entry.path.split("/")
    return "dir:/" + "/".join(parts[: min(depth, max(len(parts) - 1, 1))])


def diff_packages(
    old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]
) -> tuple[list[PackageChange], list[PackageChange], list[PackageChange]]:
    added = [PackageChange(n, None, new[n]["version"]) for n in sorted(new.keys() - old.keys())]
    removed = [PackageChange(n, old[n]["version"], None) for n in sorted(old.keys() - new.keys())]
    changed = [
        PackageChange(n, old[n]["version"], new[n]["version"])
        for n in sorted(old.keys() & new.keys())
        if old[n]["version"] != new[n]["version"]
    ]
    return added, removed, changed


def diff_files(old: dict[str, FileEntry], new: dict[str, FileEntry]) -> list[FileGroup]:
    groups: dict[str, FileGroup] = {}

    def bucket(entry: FileEntry) -> FileGroup:
        key = group_of(entry)
        return groups.setdefault(key, FileGroup(key))

    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if a is None and b is not None:
            bucket(b).added.append(path)
        elif b is None and a is not None:
            bucket(a).removed.append(path)
        elif a is not None and b is not None and a.signature() != b.signature():
            bucket(b).changed.append(path)
    return sorted(groups.values(), key=lambda g: (-g.total, g.group))


def _service_impact(
    name: str,
    decl_old: dict[str, Any] | None,
    decl_new: dict[str, Any] | None,
    changed_paths: set[str],
    changed_packages: set[str],
    packages_with_changed_files: set[str],
) -> ServiceImpact:
    if decl_old is None:
        return ServiceImpact(name, "added", ["declared in the new release"])
    if decl_new is None:
        return ServiceImpact(name, "removed", ["no longer declared"])
    reasons: list[str] = []
    if decl_old != decl_new:
        reasons.append("declaration changed")
    for pkg in decl_new.get("packages", []):
        if pkg in changed_packages:
            reasons.append(f"package {pkg} changed")
        elif pkg in packages_with_changed_files:
            reasons.append(f"files of package {pkg} changed")
    for prefix in decl_new.get("paths", []):
        rel = prefix.strip("/")
        hits = [p for p in changed_paths if p == rel or p.startswith(rel + "/")]
        if hits:
            reasons.append(f"{len(hits)} file(s) under {prefix} changed")
    return ServiceImpact(name, "changed" if reasons else "unchanged", reasons)


def diff_releases(
    old: Manifest,
    new: Manifest,
    old_files: dict[str, FileEntry],
    new_files: dict[str, FileEntry],
) -> ReleaseDiff:
    added, removed, changed = diff_packages(old.packages, new.packages)
    files = diff_files(old_files, new_files)
    changed_paths = {p for g in files for p in (*g.added, *g.removed, *g.changed)}
    changed_packages = {c.name for c in (*added, *removed, *changed)}
    old_services = {s["name"]: s for s in old.services}
    new_services = {s["name"]: s for s in new.services}
    packages_with_changed_files = {g.group[4:] for g in files if g.group.startswith("pkg:")}
    services = [
        _service_impact(
            n,
            old_services.get(n),
            new_services.get(n),
            changed_paths,
            changed_packages,
            packages_with_changed_files,
        )
        for n in sorted(old_services.keys() | new_services.keys())
    ]
    old_tests = {t["name"]: t["sha256"] for t in old.tests}
    new_tests = {t["name"]: t["sha256"] for t in new.tests}
    tests_changed = sorted(
        n for n in old_tests.keys() | new_tests.keys() if old_tests.get(n) != new_tests.get(n)
    )
    old_migrations = {m["name"] for m in old.migrations}
    migrations_added = sorted(m["name"] for m in new.migrations if m["name"] not in old_migrations)
    return ReleaseDiff(
        old=old.release,
        new=new.release,
        packages_added=added,
        packages_removed=removed,
        packages_changed=changed,
        files=files,
        kernel_old=old.kernel,
        kernel_new=new.kernel,
        services=services,
        tests_changed=tests_changed,
        migrations_added=migrations_added,
    )
