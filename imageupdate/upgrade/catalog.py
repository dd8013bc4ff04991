"""What the store knows about upgrades: every release's metadata, for the planner."""

from __future__ import annotations

from imageupdate.images import upgrade_meta
from imageupdate.images.manifest import ROOT_QCOW2
from imageupdate.images.store import ImageStore
from imageupdate.upgrade.plan import ReleaseInfo


def catalog(store: ImageStore) -> dict[str, ReleaseInfo]:
    out: dict[str, ReleaseInfo] = {}
    for release in store.releases():
        manifest = store.manifest(release)
        out[release] = ReleaseInfo(release, upgrade_meta.from_manifest(manifest.upgrade), manifest.built_at,
                                   machine=ROOT_QCOW2 in manifest.artifacts)
    return out
