"""Releases in Glance: ``imageupdate-RELEASE``, with the release and the sha256 of its root image as properties.

A machine release (built with ``--os imageupdate-debian-machine``) goes up as what TripleO's
``overcloud-full`` was, three images: its kernel (``imageupdate-RELEASE-kernel``, ``aki``), its initrd
(``imageupdate-RELEASE-initrd``, ``ari``) and its root filesystem (``imageupdate-RELEASE``, ``qcow2``, no
partition table) whose ``kernel_id`` and ``ramdisk_id`` name the other two and whose ``os_command_line`` is
the release's own (Nova's libvirt driver boots that directly). A tree-only release goes up as its root tree
(``raw``), which only the test control plane's namespace nodes can run.

Each image already uploaded with the same sha256 is reused (a second rollout uploads nothing); an upload that
fails (quota, storage, a dropped connection) leaves no image half there. Every upload is a private copy of the
artifact checked against the signed manifest as it was copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageupdate.base.errors import OperationError
from imageupdate.images.manifest import (
    INITRD,
    KERNEL,
    MACHINE_ARTIFACTS,
    ROOT_IMAGE,
    ROOT_QCOW2,
    Manifest,
    boot_command_line,
)
from imageupdate.images.store import ImageStore

RELEASE_PROPERTY = "imageupdate_release"
SHA_PROPERTY = "imageupdate_sha256"
ROLE_PROPERTY = "imageupdate_role"


@dataclass(frozen=True)
class Role:
    """One Glance image of a release: which artifact, in which formats, under which name."""

    name: str  # root | kernel | ramdisk
    artifact: str
    disk_format: str
    container_format: str
    suffix: str  # of the image name


KERNEL_ROLE = Role("kernel", KERNEL, "aki", "aki", "-kernel")
RAMDISK_ROLE = Role("ramdisk", INITRD, "ari", "ari", "-initrd")
MACHINE_ROOT = Role("root", ROOT_QCOW2, "qcow2", "bare", "")
TREE_ROOT = Role("root", ROOT_IMAGE, "raw", "bare", "")


class ImageUploadFailed(OperationError):
    """Glance refused or lost the upload of a release."""


def image_name(release: str, role: Role = TREE_ROOT) -> str:
    return f"imageupdate-{release}{role.suffix}"


def is_machine(manifest: Manifest) -> bool:
    return manifest.boot is not None and set(MACHINE_ARTIFACTS) <= set(manifest.artifacts)


def root_role(manifest: Manifest) -> Role:
    """The artifact a server on this release is built from: the root filesystem image of a machine release,
    else the root tree."""
    return MACHINE_ROOT if is_machine(manifest) else TREE_ROOT


def _ours(conn: Any, image: Any) -> bool:
    """An image this project owns: a public or shared image of the same name and property, made by someone
    else, is never taken for the release."""
    project = getattr(conn, "current_project_id", None)
    return project is None or getattr(image, "owner", None) in (None, project)


def find(conn: Any, release: str, sha256: str, role: Role = TREE_ROOT) -> Any | None:
    for image in conn.image.images(name=image_name(release, role)):
        props = image.properties or {}
        if props.get(SHA_PROPERTY) == sha256 and image.status == "active" and _ours(conn, image):
            return image
    return None


def _drop_unfinished(conn: Any, name: str) -> None:
    """Our images named ``name`` that never became active (an upload that failed or was killed): two images
    of one name would make Heat's lookup by name fail on every rollout to the release."""
    for leftover in conn.image.images(name=name):
        if leftover.status != "active" and _ours(conn, leftover):
            conn.image.delete_image(leftover, ignore_missing=True)


def _upload(conn: Any, store: ImageStore, manifest: Manifest, role: Role, fleet_dir: Path,
            properties: dict[str, str]) -> tuple[Any, bool]:
    """Role ``role`` of the release in Glance: the active image with its sha256, else a new upload; (image,
    uploaded). Older images of the same name with other content are renamed out of the way after."""
    release, sha = manifest.release, manifest.artifacts[role.artifact].sha256
    image = find(conn, release, sha, role)
    if image is not None:
        return image, False
    name = image_name(release, role)
    _drop_unfinished(conn, name)  # an upload killed earlier (SIGKILL) left its image queued or saving
    stale = list(conn.image.images(name=name))
    copy = store.private_copy(release, manifest, role.artifact, fleet_dir)  # what is uploaded: hashed as copied
    try:
        image = conn.image.create_image(
            name=name, filename=str(copy), disk_format=role.disk_format, container_format=role.container_format,
            allow_duplicates=True, wait=True, timeout=1800,
            **{RELEASE_PROPERTY: release, SHA_PROPERTY: sha, ROLE_PROPERTY: role.name, **properties})
    except BaseException as e:  # sdk, keystoneauth and requests errors, and Ctrl-C or SIGTERM half way
        _drop_unfinished(conn, name)  # the stale ones are all active: the unfinished went just before
        if not isinstance(e, Exception):
            raise
        what = release if role.name == "root" else f"{release}'s {role.name}"
        raise ImageUploadFailed(f"uploading {what} to Glance failed: {' '.join(str(e).split())[:300]}",
                                release=release, step="publish") from None
    finally:
        copy.unlink(missing_ok=True)
    for old in stale:  # an image of the same name with other content (a rebuilt release): this one wins
        if (old.properties or {}).get(SHA_PROPERTY) != sha:
            conn.image.update_image(old, name=f"{name}-replaced-{old.id[:8]}")
    return image, True


def publish(conn: Any, store: ImageStore, release: str, fleet_dir: Path) -> tuple[Any, list[str]]:
    """The release's root image in Glance, with its kernel and initrd for a machine release, each uploaded
    unless an active image has its sha256; (root image, the roles uploaded). Refused unless a key the cloud
    fleet (``fleet_dir``) trusts signed it, whether uploaded already or not."""
    manifest = store.require_verified(release, fleet_dir)
    if not is_machine(manifest):
        image, uploaded = _upload(conn, store, manifest, TREE_ROOT, fleet_dir, {})
        return image, ["root"] if uploaded else []
    assert manifest.boot is not None
    kernel, kernel_new = _upload(conn, store, manifest, KERNEL_ROLE, fleet_dir, {})
    ramdisk, ramdisk_new = _upload(conn, store, manifest, RAMDISK_ROLE, fleet_dir, {})
    links = {"kernel_id": kernel.id, "ramdisk_id": ramdisk.id}
    root, root_new = _upload(conn, store, manifest, MACHINE_ROOT, fleet_dir, {
        **links, "os_command_line": boot_command_line(manifest.boot["root_label"], manifest.boot["init"]),
        "hw_disk_bus": "virtio", "hw_vif_model": "virtio", "os_type": "linux"})
    if not root_new and any(getattr(root, k, None) != v for k, v in links.items()):
        # reused, but its kernel or initrd was deleted and uploaded again: point it at the new ones
        root = conn.image.update_image(root, **links)
    return root, [role for role, new in (("kernel", kernel_new), ("ramdisk", ramdisk_new), ("root", root_new)) if new]
