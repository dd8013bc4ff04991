"""Releases in Glance: a machine release goes up as its kernel, initrd and root filesystem image (the root's
kernel_id and ramdisk_id naming the other two), each reused by sha256; a failed upload leaves nothing half
there. Glance here is a recording fake of openstacksdk's image proxy: what is tested is what we ask of it."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imageupdate.base.errors import UntrustedRelease
from imageupdate.cloud import images
from imageupdate.images import signing
from imageupdate.images.manifest import (
    INITRD,
    KERNEL,
    MACHINE_ARTIFACTS,
    MANIFEST,
    ROOT_IMAGE,
    ROOT_QCOW2,
    STATE_LABEL,
    VM_INIT,
    Manifest,
    ManifestInvalid,
    describe_artifact,
    write_checksums,
)
from imageupdate.images.store import ImageStore
from tests.conftest import SIGNING_KEY, staged_release

_ids = itertools.count(1)


@dataclass
class Image:
    name: str
    disk_format: str
    container_format: str
    properties: dict[str, Any]
    data: bytes
    status: str = "active"
    owner: str | None = None
    id: str = field(default_factory=lambda: f"img{next(_ids):04d}-0000")
    kernel_id: str | None = None
    ramdisk_id: str | None = None


class FakeImageProxy:
    def __init__(self) -> None:
        self.all: list[Image] = []
        self.calls: list[tuple[str, str]] = []
        self.fail_on: str | None = None  # an image name whose upload dies half way

    def images(self, name: str) -> list[Image]:
        return [i for i in self.all if i.name == name]

    def create_image(self, name: str, filename: str, disk_format: str, container_format: str,
                     allow_duplicates: bool, wait: bool, timeout: int, **props: Any) -> Image:
        self.calls.append(("create", name))
        image = Image(name, disk_format, container_format, {k: v for k, v in props.items()
                                                            if k not in ("kernel_id", "ramdisk_id")},
                      Path(filename).read_bytes(), kernel_id=props.get("kernel_id"),
                      ramdisk_id=props.get("ramdisk_id"))
        self.all.append(image)
        if name == self.fail_on:
            image.status = "saving"
            raise ConnectionError("Connection reset by peer")
        return image

    def update_image(self, image: Image, **attrs: Any) -> Image:
        self.calls.append(("update", image.name))
        for k, v in attrs.items():
            setattr(image, k, v)
        return image

    def delete_image(self, image: Image, ignore_missing: bool) -> None:
        self.calls.append(("delete", image.name))
        self.all.remove(image)


class FakeConn:
    current_project_id = None

    def __init__(self) -> None:
        self.image = FakeImageProxy()


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    path = tmp_path / "fleet"
    path.mkdir()
    signing.trust_own_key(path)
    return path


def machine_release(store: ImageStore, release: str, kernel: bytes = b"kernel", boot: dict | None = None) -> None:  # type: ignore[type-arg]
    """A synthetic signed release with a (fake) kernel, initrd and root filesystem image beside its tree."""
    with store.staging(release) as stage:
        d = stage / "release"
        m = staged_release(d, release)
        for name, content in ((KERNEL, kernel), (INITRD, b"initrd"), (ROOT_QCOW2, b"QFI\xfb" + release.encode())):
            (d / name).write_bytes(content)
        m.artifacts |= {name: describe_artifact(d / name, fmt) for name, fmt in MACHINE_ARTIFACTS.items()}
        m.boot = boot or {"root_label": "cloudimg-rootfs", "init": VM_INIT, "state_label": STATE_LABEL}
        m.write(d)
        write_checksums(d, [*m.artifacts, MANIFEST])
        signing.sign(d, SIGNING_KEY)
        store.publish(d, release)


def test_a_machine_release_goes_up_as_kernel_initrd_and_a_root_that_names_them(store: ImageStore,
                                                                               fleet: Path) -> None:
    machine_release(store, "M1")
    conn = FakeConn()
    root, uploaded = images.publish(conn, store, "M1", fleet)
    assert uploaded == ["kernel", "ramdisk", "root"]
    by_name = {i.name: i for i in conn.image.all}
    kernel, initrd = by_name["imageupdate-M1-kernel"], by_name["imageupdate-M1-initrd"]
    assert (kernel.disk_format, kernel.container_format, kernel.data) == ("aki", "aki", b"kernel")
    assert (initrd.disk_format, initrd.container_format, initrd.data) == ("ari", "ari", b"initrd")
    assert root is by_name["imageupdate-M1"]
    assert (root.disk_format, root.container_format, root.data) == ("qcow2", "bare", b"QFI\xfbM1")
    assert (root.kernel_id, root.ramdisk_id) == (kernel.id, initrd.id)
    manifest = store.manifest("M1")
    assert root.properties[images.SHA_PROPERTY] == manifest.artifacts[ROOT_QCOW2].sha256
    assert root.properties[images.RELEASE_PROPERTY] == "M1" and root.properties[images.ROLE_PROPERTY] == "root"
    cmdline = root.properties["os_command_line"]
    assert f"init={VM_INIT}" in cmdline and "root=LABEL=cloudimg-rootfs" in cmdline and "ip=" not in cmdline
    assert not list(fleet.glob(".M1.*"))  # the private copies uploaded are gone


def test_a_second_publish_uploads_nothing(store: ImageStore, fleet: Path) -> None:
    machine_release(store, "M1")
    conn = FakeConn()
    first, _ = images.publish(conn, store, "M1", fleet)
    again, uploaded = images.publish(conn, store, "M1", fleet)
    assert again is first and uploaded == []
    assert [c for c in conn.image.calls if c[0] == "create"] == [("create", "imageupdate-M1-kernel"), (
        "create", "imageupdate-M1-initrd"), ("create", "imageupdate-M1")]


def test_a_root_reused_after_its_kernel_was_deleted_is_pointed_at_the_new_one(store: ImageStore,
                                                                              fleet: Path) -> None:
    machine_release(store, "M1")
    conn = FakeConn()
    root, _ = images.publish(conn, store, "M1", fleet)
    conn.image.all.remove(next(i for i in conn.image.all if i.name == "imageupdate-M1-kernel"))
    again, uploaded = images.publish(conn, store, "M1", fleet)
    kernel = next(i for i in conn.image.all if i.name == "imageupdate-M1-kernel")
    assert uploaded == ["kernel"] and again is root and root.kernel_id == kernel.id
    assert ("update", "imageupdate-M1") in conn.image.calls


def test_a_root_upload_that_dies_leaves_no_half_image_and_keeps_the_kernel(store: ImageStore,
                                                                           fleet: Path) -> None:
    machine_release(store, "M1")
    conn = FakeConn()
    conn.image.fail_on = "imageupdate-M1"
    with pytest.raises(images.ImageUploadFailed, match="uploading M1 to Glance failed: Connection reset"):
        images.publish(conn, store, "M1", fleet)
    assert sorted(i.name for i in conn.image.all) == ["imageupdate-M1-initrd", "imageupdate-M1-kernel"]
    assert all(i.status == "active" for i in conn.image.all)
    conn.image.fail_on = None
    _, uploaded = images.publish(conn, store, "M1", fleet)
    assert uploaded == ["root"]  # the complete kernel and initrd are reused


def test_a_kernel_upload_that_dies_names_the_kernel(store: ImageStore, fleet: Path) -> None:
    machine_release(store, "M1")
    conn = FakeConn()
    conn.image.fail_on = "imageupdate-M1-kernel"
    with pytest.raises(images.ImageUploadFailed, match="uploading M1's kernel to Glance failed"):
        images.publish(conn, store, "M1", fleet)
    assert conn.image.all == []


def test_a_rebuilt_release_replaces_the_images_of_the_same_name(store: ImageStore, fleet: Path,
                                                                tmp_path: Path) -> None:
    machine_release(store, "M1")
    conn = FakeConn()
    images.publish(conn, store, "M1", fleet)
    store.delete("M1")
    machine_release(store, "M1", kernel=b"another kernel")
    root, uploaded = images.publish(conn, store, "M1", fleet)
    assert uploaded == ["kernel"]  # the initrd and the root are the same bytes
    names = sorted(i.name for i in conn.image.all)
    assert [n for n in names if n.startswith("imageupdate-M1-kernel-replaced-")] and len(names) == 4
    assert root.kernel_id == next(i.id for i in conn.image.all if i.name == "imageupdate-M1-kernel")


def test_a_tree_only_release_goes_up_as_its_tree(store: ImageStore, fleet: Path, publish: Any) -> None:
    publish("R1")
    conn = FakeConn()
    root, uploaded = images.publish(conn, store, "R1", fleet)
    assert uploaded == ["root"] and [i.name for i in conn.image.all] == ["imageupdate-R1"]
    assert root.disk_format == "raw" and root.properties[images.SHA_PROPERTY] == \
        store.manifest("R1").artifacts[ROOT_IMAGE].sha256


def test_an_unsigned_machine_release_uploads_nothing(store: ImageStore, fleet: Path) -> None:
    machine_release(store, "M1")
    (store.path("M1") / signing.SIGNATURE).unlink()
    conn = FakeConn()
    with pytest.raises(UntrustedRelease):
        images.publish(conn, store, "M1", fleet)
    assert conn.image.calls == []


@pytest.mark.parametrize("boot", [
    {"root_label": "x console=tty0 init=/bin/sh", "init": VM_INIT, "state_label": STATE_LABEL},
    {"root_label": "cloudimg-rootfs", "init": "/usr/../bin/sh", "state_label": STATE_LABEL},
    {"root_label": "cloudimg-rootfs", "init": "sh", "state_label": STATE_LABEL},
    {"root_label": "cloudimg-rootfs", "init": VM_INIT, "state_label": "other"},
    {"root_label": "cloudimg-rootfs", "init": VM_INIT},
])
def test_a_boot_section_that_would_change_the_kernel_command_line_is_refused(tmp_path: Path,
                                                                             boot: dict) -> None:  # type: ignore[type-arg]
    d = tmp_path / "rel"
    m = staged_release(d, "M1")
    m.boot = boot
    m.write(d)
    with pytest.raises(ManifestInvalid, match="boot"):
        Manifest.read(d)


def test_an_upload_interrupted_or_killed_leaves_no_second_image_of_the_name(store: ImageStore,
                                                                            fleet: Path) -> None:
    """Heat finds a server's image by name: a half upload left beside the next complete one would fail every
    rollout to the release. Ctrl-C (KeyboardInterrupt) cleans up at once; a SIGKILL's leftover goes at the
    next upload."""
    machine_release(store, "M1")
    conn = FakeConn()
    real = conn.image.create_image

    def interrupted(*args: Any, **kwargs: Any) -> Image:
        real(*args, **kwargs).status = "saving"
        raise KeyboardInterrupt

    conn.image.create_image = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        images.publish(conn, store, "M1", fleet)
    assert conn.image.all == []
    conn.image.create_image = real  # type: ignore[method-assign]
    conn.image.all.append(Image("imageupdate-M1-kernel", "aki", "aki", {}, b"", status="queued"))  # a SIGKILL's
    images.publish(conn, store, "M1", fleet)
    assert sorted(i.name for i in conn.image.all) == ["imageupdate-M1", "imageupdate-M1-initrd",
                                                      "imageupdate-M1-kernel"]
    assert all(i.status == "active" for i in conn.image.all)
