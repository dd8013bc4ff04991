"""Releases in Glance: ``imageupdate-RELEASE``, with the release and the sha256 of its root image as properties.

An image already uploaded with the same sha256 is reused (a second rollout uploads nothing); an upload that fails
(quota, storage, a dropped connection) leaves no image half there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imageupdate.errors import OperationError
from imageupdate.images.manifest import ROOT_IMAGE
from imageupdate.images.store import ImageStore

RELEASE_PROPERTY = "imageupdate_release"
SHA_PROPERTY = "imageupdate_sha256"


class ImageUploadFailed(OperationError):
    """Glance refused or lost the upload of a release."""


def image_name(release: str) -> str:
    return f"imageupdate-{release}"


def _ours(conn: Any, image: Any) -> bool:
    """An image this project owns: a public or shared image of the same name and property, made by someone
    else, is never taken for the release."""
    project = getattr(conn, "current_project_id", None)
    return project is None or getattr(image, "owner", None) in (None, project)


def find(conn: Any, release: str, sha256: str) -> Any | None:
    for image in conn.image.images(name=image_name(release)):
        props = image.properties or {}
        if props.get(SHA_PROPERTY) == sha256 and image.status == "active" and _ours(conn, image):
            return image
    return None


def publish(conn: Any, store: ImageStore, release: str, fleet_dir: Path) -> tuple[Any, bool]:
    """The release's Glance image, uploaded if no active image has its sha256; (image, uploaded). Refused
    unless a key the cloud fleet (``fleet_dir``) trusts signed it, whether uploaded already or not."""
    manifest = store.require_verified(release, fleet_dir)
    sha = manifest.artifacts[ROOT_IMAGE].sha256
    image = find(conn, release, sha)
    if image is not None:
        return image, False
    stale = [i for i in conn.image.images(name=image_name(release))]
    copy = store.private_copy(release, manifest, ROOT_IMAGE, fleet_dir)  # what is uploaded: hashed as copied
    try:
        image = conn.image.create_image(
            name=image_name(release), filename=str(copy), disk_format="raw",
            container_format="bare", allow_duplicates=True, wait=True, timeout=1800,
            **{RELEASE_PROPERTY: release, SHA_PROPERTY: sha})
    except Exception as e:  # noqa: BLE001 - sdk, keystoneauth and requests errors
        for leftover in conn.image.images(name=image_name(release)):
            if leftover.id not in {s.id for s in stale} and leftover.status != "active":
                conn.image.delete_image(leftover, ignore_missing=True)
        raise ImageUploadFailed(f"uploading {release} to Glance failed: {' '.join(str(e).split())[:300]}",
                                release=release, step="publish") from None
    finally:
        copy.unlink(missing_ok=True)
    for old in stale:  # an image of the same name with other content (a rebuilt release): this one wins
        if (old.properties or {}).get(SHA_PROPERTY) != sha:
            conn.image.update_image(old, name=f"{image_name(release)}-replaced-{old.id[:8]}")
    return image, True
