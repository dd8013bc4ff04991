"""Where an API call acts: the image store, the local site, or a fleet on a cloud of clouds.yaml.

Every function of :mod:`imageupdate.api` takes the same three keywords: ``store`` (the image store; default
``$IMAGEUPDATE_STORE``, else the store a site was created with, else /var/lib/imageupdate/images), ``site``
(the local site's directory, or with ``cloud`` where that fleet's history is kept) and ``cloud`` (a cloud of
clouds.yaml: the fleet is that cloud's Nova servers instead of the local site). Nothing here reads
``$OS_CLOUD``: the front doors pass it in as ``cloud``.
"""

from __future__ import annotations

from pathlib import Path

from imageupdate.cloud.fleet import DEFAULT_ROOT as DEFAULT_CLOUD_ROOT
from imageupdate.cloud.fleet import CloudFleet
from imageupdate.images.store import ImageStore
from imageupdate.rollout.fleet import Fleet
from imageupdate.site.fleet import LocalFleet
from imageupdate.site.site import LocalSite

PathLike = Path | str


def _path(p: PathLike | None) -> Path | None:
    return None if p is None else Path(p)


def open_store(store: PathLike | None = None) -> ImageStore:
    return ImageStore(_path(store))


def open_site(site: PathLike | None = None, store: PathLike | None = None) -> LocalSite:
    """The local site (construction touches nothing)."""
    return LocalSite.open(_path(site), _path(store))


def cloud_dir(cloud: str, site: PathLike | None = None) -> Path:
    """Where a cloud fleet's history, lock, trusted keys and reports are kept."""
    return _path(site) or DEFAULT_CLOUD_ROOT / cloud


def open_fleet(site: PathLike | None = None, store: PathLike | None = None, cloud: str | None = None) -> Fleet:
    """The local site's fleet, or with ``cloud`` the fleet on that cloud."""
    if cloud is None:
        return LocalFleet(open_site(site, store))
    return CloudFleet(cloud_dir(cloud, site), open_store(store), cloud)


def fleet_dir(site: PathLike | None = None, store: PathLike | None = None, cloud: str | None = None) -> Path:
    """The directory of the fleet (its history, its trusted keys)."""
    return cloud_dir(cloud, site) if cloud is not None else open_site(site, store).path
