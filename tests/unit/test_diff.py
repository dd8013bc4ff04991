from __future__ import annotations

from imageupdate.images.store import ImageStore
from tests.fakeroot_tar import DPKG_STATUS

V2_STATUS = DPKG_STATUS.replace("Version: 3.11.2-1+b1", "Version: 3.11.4-1") + """
Package: sqlite3
Status: install ok installed
Architecture: amd64
Version: 3.40.1-2
"""
NO_PYTHON = DPKG_STATUS.replace("Package: python3\n", "Package: python3-gone\n")


def test_identical_releases_need_nothing(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    publish("R1b", extra={"./etc/imageupdate/release.json": b'{"release": "R1"}'})
    d = store.diff("R1", "R1b")
    assert not (d.packages_added or d.packages_removed or d.packages_changed)
    assert d.files_total == {"added": 0, "removed": 0, "changed": 0}
    assert [s.status for s in d.services] == ["unchanged"]
    assert d.action == "none"


def test_package_and_service_changes(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    publish("R2", packages=V2_STATUS, extra={
        "./usr/lib/app/server.py": b"print('v2')\n",
        "./usr/share/imageupdate/migrations/0002-x": b"#!/bin/sh\n",
    })
    d = store.diff("R1", "R2")
    assert [(c.name, c.new) for c in d.packages_added] == [("sqlite3", "3.40.1-2")]
    assert [(c.name, c.old, c.new) for c in d.packages_changed] == [("python3", "3.11.2-1+b1", "3.11.4-1")]
    groups = {g.group: g for g in d.files}
    assert groups["dir:/usr/lib/app"].changed == ["usr/lib/app/server.py"]
    assert groups["dir:/usr/share/imageupdate"].added == [
        "usr/share/imageupdate/migrations", "usr/share/imageupdate/migrations/0002-x"]
    assert groups["dir:/var/lib/dpkg"].changed == ["var/lib/dpkg/status"]
    (svc,) = d.services
    assert svc.status == "changed"
    assert "package python3 changed" in svc.reasons
    assert "1 file(s) under /usr/lib/app changed" in svc.reasons
    assert d.migrations_added == ["0002-x"]
    assert d.action == "restart"
    assert d.to_dict()["action"] == "restart"


def test_file_of_a_package_changed_without_version_change(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    publish("R2", extra={"./usr/bin/python3.11": b"\x7fELF rebuilt"})
    d = store.diff("R1", "R2")
    groups = {g.group: g for g in d.files}
    # the hard link group moves with its content
    assert "usr/bin/a-hardlink" in groups["dir:/usr/bin"].changed
    assert "usr/bin/python3.11" in groups["pkg:python3"].changed
    assert "files of package python3 changed" in d.services[0].reasons


def test_removed_package_and_kernel_change_mean_reboot(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1", kernel="6.1.0-27-amd64")
    publish("R2", kernel="6.1.0-28-amd64", packages=NO_PYTHON)
    d = store.diff("R1", "R2")
    assert [c.name for c in d.packages_removed] == ["python3"]
    assert d.kernel_changed and d.kernel_old == "6.1.0-27-amd64"
    assert d.action == "reboot"


def test_service_added_and_removed(store: ImageStore, publish) -> None:  # type: ignore[no-untyped-def]
    publish("R1")
    publish("R2", extra={"./usr/share/imageupdate/services/web.json": b'{"name": "web", "command": ["/usr/bin/web"]}'})
    statuses = {s.name: s.status for s in store.diff("R1", "R2").services}
    assert statuses == {"app": "unchanged", "web": "added"}
    statuses = {s.name: s.status for s in store.diff("R2", "R1").services}
    assert statuses["web"] == "removed"
