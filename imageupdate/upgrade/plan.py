"""The upgrade path from what a node runs to a target release: which releases' migrations run, in order.

Pure logic over the store's release metadata. From a node on release A with its state at version S to
a target T: every state version S+1 .. T.state_version is produced by exactly one migration step, run
from the image of the release that ships it (the intermediate releases, then T itself); a release whose
``min_from`` is newer than the release before it on the path forces a release in between (it cannot be
skipped). Several releases of the same version (a rebuilt or broken variant): the one that passed a
gate on this site wins, then the one built first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imageupdate.base.errors import InputError
from imageupdate.images.upgrade_meta import Migration, ReleaseMeta, version_key


class DowngradeRefused(InputError):
    """The target is older than what the fleet runs."""


class PathBlocked(InputError):
    """No path to the target: a release it needs is not in the store."""


@dataclass(frozen=True)
class ReleaseInfo:
    release: str
    meta: ReleaseMeta | None
    built_at: str = ""
    machine: bool = False  # carries a kernel and a bootable disk (a machine release), not only the tree


@dataclass
class Hop:
    release: str
    version: str
    migrations: list[Migration]
    required: str | None = None  # why this release cannot be skipped

    def to_dict(self) -> dict[str, Any]:
        return {"release": self.release, "version": self.version, "required": self.required,
                "migrations": [asdict(m) for m in self.migrations]}


@dataclass
class UpgradePlan:
    target: str
    from_release: str
    from_state: int | None
    to_state: int | None
    hops: list[Hop] = field(default_factory=list)

    @property
    def steps(self) -> list[Migration]:
        return [m for h in self.hops for m in h.migrations]

    @property
    def has_contract(self) -> bool:
        return any(m.kind == "contract" for m in self.steps)

    @property
    def releases(self) -> list[str]:
        return [h.release for h in self.hops]

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "from_release": self.from_release, "from_state": self.from_state,
                "to_state": self.to_state, "hops": [h.to_dict() for h in self.hops],
                "steps": [asdict(m) for m in self.steps], "contract": self.has_contract}


def _product(name: str | None) -> str:
    return f"product {name!r}" if name else "a release that names no product"


def pick(candidates: list[ReleaseInfo], preferred: set[str], machine: bool = False) -> ReleaseInfo:
    """Among releases that would do as a hop: one that passed here, then one of the target's kind (a store
    holding the tree and the machine build of one workload has two of each version), then the first built."""
    return sorted(candidates, key=lambda r: (r.release not in preferred, r.machine != machine, r.built_at,
                                             r.release))[0]


def plan(releases: dict[str, ReleaseInfo], current: str, state_version: int | None, target: str,
         preferred: set[str] | None = None, store: str = "the store") -> UpgradePlan:
    """The path for one node running ``current`` with its state at ``state_version`` (None: unknown,
    taken as ``current``'s)."""
    preferred = preferred or set()
    tgt, cur = releases[target], releases[current]
    if tgt.meta is None:  # a release without upgrade metadata: a plain image swap, as before
        return UpgradePlan(target, current, state_version, None)
    if cur.meta is None:
        raise PathBlocked(f"{current} has no upgrade metadata, so the state version of its nodes is unknown: "
                          f"roll {target} out from a release built with upgrade.json", release=current,
                          step="plan")
    if cur.meta.product and tgt.meta.product and cur.meta.product != tgt.meta.product:
        raise PathBlocked(f"{current} is {_product(cur.meta.product)} and {target} is {_product(tgt.meta.product)}: "
                          "versions and state versions mean something only within one product; roll out a "
                          f"release of {_product(cur.meta.product)}", release=target, step="plan")
    have = state_version if state_version is not None else cur.meta.state_version
    if tgt.meta.key < cur.meta.key or tgt.meta.state_version < have:
        raise DowngradeRefused(
            f"{current} (version {cur.meta.version}, state version {have}) -> {target} (version "
            f"{tgt.meta.version}, state version {tgt.meta.state_version}) is a downgrade: use "
            f"'imageupdate rollback' (it restores the state snapshot taken before a contract migration)",
            release=target, step="plan")
    result = UpgradePlan(target, current, have, tgt.meta.state_version)
    # intermediate releases of the same product only: another product's "version 2" migrates other data. A
    # release that names none is of the product of the path's ends (a fleet built before its product had a name)
    products = {tgt.meta.product, cur.meta.product}
    versioned = [r for r in releases.values() if r.meta is not None and r.release != target
                 and r.meta.product in products and cur.meta.key < r.meta.key <= tgt.meta.key]
    hops: dict[str, Hop] = {}
    for sv in range(have + 1, tgt.meta.state_version + 1):
        own = [m for m in tgt.meta.migrations if m.state_version == sv]
        if own:
            src, step = tgt, own[0]
        else:
            makers = [r for r in versioned if r.meta is not None and any(
                m.state_version == sv for m in r.meta.migrations)]
            if not makers:
                raise PathBlocked(
                    f"{current} -> {target} is blocked: no release in {store} migrates the state from version "
                    f"{sv - 1} to {sv}; build the release that introduced state version {sv} "
                    f"(imageupdate build RELEASE --element ELEMENT) and run 'imageupdate plan' again",
                    release=target, step="plan")
            src = pick(makers, preferred, tgt.machine)
            assert src.meta is not None
            step = next(m for m in src.meta.migrations if m.state_version == sv)
        assert src.meta is not None
        hop = hops.setdefault(src.release, Hop(src.release, src.meta.version, []))
        hop.migrations.append(Migration(step.name, step.state_version, step.kind, src.release))
    hops.setdefault(target, Hop(target, tgt.meta.version, []))
    ordered = sorted(hops.values(), key=lambda h: version_key(h.version))
    result.hops = _through_barriers(ordered, releases, versioned, cur, preferred, store, target, current)
    return result


def _through_barriers(hops: list[Hop], releases: dict[str, ReleaseInfo], versioned: list[ReleaseInfo],
                      cur: ReleaseInfo, preferred: set[str], store: str, target: str, current: str) -> list[Hop]:
    """Insert the releases a hop's ``min_from`` demands between it and the release before it."""
    assert cur.meta is not None
    out: list[Hop] = []
    prev = cur.meta.version
    for hop in hops:
        meta = releases[hop.release].meta
        assert meta is not None
        if meta.min_from and version_key(prev) < version_key(meta.min_from):
            between = [r for r in versioned if r.meta is not None
                       and version_key(meta.min_from) <= r.meta.key < meta.key]
            if not between:
                raise PathBlocked(
                    f"{current} -> {target} is blocked: {hop.release} (version {meta.version}) upgrades only from "
                    f"version {meta.min_from} or later and no release of version {meta.min_from} is in {store}; "
                    f"build it (imageupdate build RELEASE --element ELEMENT) and run 'imageupdate plan' again",
                    release=hop.release, step="plan")
            chosen = pick(between, preferred, releases[target].machine)
            assert chosen.meta is not None
            out.append(Hop(chosen.release, chosen.meta.version, [],
                           f"{hop.release} upgrades only from version {meta.min_from} or later"))
        elif meta.min_from and out and version_key(out[-1].version) >= version_key(meta.min_from):
            out[-1].required = f"{hop.release} upgrades only from version {meta.min_from} or later"
        out.append(hop)
        prev = hop.version
    return out
