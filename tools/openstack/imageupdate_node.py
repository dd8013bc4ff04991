"""A Nova virt driver whose instances are imageupdate local-site nodes (test-only).

Installed by ``controlplane.py`` into the ``nova.virt`` package (Nova loads drivers only from there) and
selected with ``compute_driver = imageupdate_node.LocalSiteDriver``. A server named like a node of the local site
``$IMAGEUPDATE_SITE`` (store ``$IMAGEUPDATE_STORE``) *is* that node: spawning it or rebuilding it with an image swaps
the node to the image's release (Glance property ``imageupdate_release``) with ``imageupdate site rebuild``, which
keeps the node's state partition: the preserve-ephemeral rebuild a real hypervisor does. Instances are recorded in
``$state_path/imageupdate-instances.json`` so a restart of nova-compute finds them again.

No eventlet here: Nova 34 runs its services on native threads and refuses ``import eventlet``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nova.conf
from nova import exception
from nova.compute import power_state, task_states
from nova.image import glance
from nova.virt import fake
from oslo_log import log as logging

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)
RELEASE_PROPERTY = "imageupdate_release"


class _NodeDriver(fake.FakeDriverWithoutFakeNodes):
    """What both test drivers share: Nova's spawn and rebuild entry points around two hooks, ``_create`` (a new
    server from ``image_meta``) and ``_replace`` (a rebuild that keeps the node's state: only with
    preserve_ephemeral)."""

    capabilities = dict(fake.FakeDriver.capabilities, supports_evacuate=False)
    keeps = "state"  # what a rebuild keeps, for its refusal

    def _create(self, context, instance, image_meta, injected_files, admin_password) -> None:
        raise NotImplementedError

    def _replace(self, context, instance, image_meta, injected_files, admin_password) -> None:
        raise NotImplementedError

    def spawn(self, context, instance, image_meta, injected_files, admin_password, allocations,
              network_info=None, block_device_info=None, power_on=True, accel_info=None):
        self._create(context, instance, image_meta, injected_files, admin_password)
        super().spawn(context, instance, image_meta, injected_files, admin_password, allocations,
                      network_info, block_device_info, power_on, accel_info)

    def rebuild(self, context, instance, image_meta, injected_files, admin_password, allocations, bdms,
                detach_block_devices, attach_block_devices, network_info=None, evacuate=False,
                block_device_info=None, preserve_ephemeral=False, accel_uuids=None, reimage_boot_volume=False):
        if not preserve_ephemeral:
            raise exception.NovaException(f"an imageupdate node keeps its {self.keeps}: rebuild it with "
                                          "preserve_ephemeral")
        instance.task_state = task_states.REBUILD_SPAWNING
        instance.save(expected_task_state=[task_states.REBUILDING])
        self._replace(context, instance, image_meta, injected_files, admin_password)


class LocalSiteDriver(_NodeDriver):
    keeps = "state partition"

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        self._lock = threading.Lock()
        self._registry = os.path.join(CONF.state_path, "imageupdate-instances.json")
        for uuid, rec in self._load().items():
            self.instances[uuid] = fake.FakeInstance(rec["name"], power_state.RUNNING, uuid)

    # registry ------------------------------------------------------------------------------------------------

    def _load(self) -> dict:
        try:
            with open(self._registry) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _record(self, uuid: str, rec: dict | None) -> None:
        with self._lock:
            data = self._load()
            if rec is None:
                data.pop(uuid, None)
            else:
                data[uuid] = rec
            tmp = self._registry + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self._registry)

    # the node behind an instance -----------------------------------------------------------------------------

    def _release(self, context, image_id: str) -> str:
        image = glance.API().get(context, image_id)
        release = (image.get("properties") or {}).get(RELEASE_PROPERTY)
        if not release:
            raise exception.InvalidImageRef(image_href=f"{image_id} (no {RELEASE_PROPERTY} property)")
        return release

    def _swap(self, context, instance, image_id: str) -> None:
        node, release = instance.hostname or instance.display_name, self._release(context, image_id)
        cmd = [sys.executable, "-m", "imageupdate", "site", "rebuild", node, release, "--json", "--wait-lock", "600"]
        LOG.info("instance %s is node %s: swapping it to %s", instance.uuid, node, release)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            said = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise exception.NovaException(f"node {node} could not be swapped to {release}: {said}")
        try:
            address = json.loads(proc.stdout).get("address")
        except ValueError:
            address = None
        if address and instance.access_ip_v4 != address:  # how the orchestrator reaches the node (no Neutron here)
            instance.access_ip_v4 = address
            instance.save()
        self._record(instance.uuid, {"name": instance.name, "node": node, "release": release})

    # the driver interface ------------------------------------------------------------------------------------

    def _create(self, context, instance, image_meta, injected_files, admin_password) -> None:
        self._swap(context, instance, image_meta.id)

    def _replace(self, context, instance, image_meta, injected_files, admin_password) -> None:
        self._swap(context, instance, image_meta.id)

    def get_console_output(self, context, instance):
        """The node's console: what its init and node-firstboot printed (the host key block among it)."""
        node = instance.hostname or instance.display_name
        path = os.path.join(os.environ["IMAGEUPDATE_SITE"], "nodes", os.path.basename(node), "console.log")
        try:
            with open(path, "rb") as f:
                return f.read(4 * 1024 * 1024)
        except OSError:
            raise exception.ConsoleNotAvailable() from None

    def destroy(self, context, instance, network_info, block_device_info=None, destroy_disks=True,
                destroy_secrets=True):
        super().destroy(context, instance, network_info, block_device_info, destroy_disks, destroy_secrets)
        self._record(instance.uuid, None)  # the node stays with its site


class VmDriver(_NodeDriver):
    """Each server is a QEMU machine booting what Glance holds for it (test-only; the plane's ``--vm`` mode).

    What a libvirt compute host does, in the few steps an imageupdate node needs: the root image, kernel and
    initrd are downloaded through Glance's API (``nova.virt.images.fetch``: this process is given no store) and
    checked (the root a qcow2 with no backing file; each image's bytes the sha256 imageupdate recorded on
    it); the kernel boots with the image's ``os_command_line``; the flavor's ephemeral disk is the node's
    state disk (ext4 labelled ``iu-state``), made at spawn and kept by a rebuild with preserve_ephemeral;
    the network, hostname and keypair reach the guest on a config drive made by Nova's own builder
    (iso9660, genisoimage). Each VM runs in a network namespace of its own on this plane's bridge, as a
    local site's VM node does; the address is what the plane hands out, put on the server as
    ``access_ip_v4`` (no Neutron here). Instances are recorded in ``$state_path/imageupdate-vms.json``.
    """

    keeps = "state disk"

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        from imageupdate.site import network  # noqa: PLC0415 - the plane's venv has imageupdate

        self._lock = threading.Lock()
        self._registry = os.path.join(CONF.state_path, "imageupdate-vms.json")
        net_file = os.path.join(CONF.state_path, "imageupdate-net.json")
        if os.path.exists(net_file):
            with open(net_file) as f:
                saved = json.load(f)
        else:
            with network.picking():
                saved = {"site_id": "cp" + os.urandom(2).hex(), "subnet": network.pick_subnet()}
                self.net = network.SiteNet(**saved)
                self.net.create_bridge()  # holds the subnet for the next picker
            with open(net_file, "w") as f:
                json.dump(saved, f)
        self.net = network.SiteNet(**saved)
        self.net.create_bridge()
        for uuid, rec in self._load().items():
            state = power_state.RUNNING if self._alive(rec.get("pid")) else power_state.SHUTDOWN
            self.instances[uuid] = fake.FakeInstance(rec["name"], state, uuid)

    # registry ------------------------------------------------------------------------------------------------

    def _load(self) -> dict:
        try:
            with open(self._registry) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _update(self, uuid: str, **fields) -> dict:
        with self._lock:
            data = self._load()
            if fields.get("gone"):
                rec = data.pop(uuid, {})
            else:
                rec = data.setdefault(uuid, {})
                rec.update(fields)
            self._save(data)
            return rec

    def _save(self, data: dict) -> None:
        tmp = self._registry + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self._registry)

    @staticmethod
    def _alive(pid) -> bool:
        from imageupdate.base import procs  # noqa: PLC0415

        return isinstance(pid, int) and procs.alive(pid)

    def _dir(self, instance) -> str:
        path = os.path.join(CONF.instances_path, instance.uuid)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    # images from Glance --------------------------------------------------------------------------------------

    def _download(self, context, image_id: str, dest: str, want_format: str | None) -> None:
        """``image_id`` from Glance into ``dest`` (atomically), checked: its format (qemu-img's own reading)
        and the sha256 imageupdate recorded on the image."""
        import hashlib  # noqa: PLC0415

        from nova.virt import images  # noqa: PLC0415

        if os.path.exists(dest):
            return
        meta = glance.API().get(context, image_id)
        want_sha = (meta.get("properties") or {}).get("imageupdate_sha256")
        if not want_sha:
            raise exception.ImageUnacceptable(image_id=image_id, reason="no imageupdate_sha256 property")
        tmp = f"{dest}.part"
        if os.path.exists(tmp):
            os.unlink(tmp)
        images.fetch(context, image_id, tmp)
        try:
            if want_format is not None:
                info = images.qemu_img_info(tmp)
                if info.file_format != want_format or info.backing_file:
                    raise exception.ImageUnacceptable(
                        image_id=image_id, reason=f"not a plain {want_format} (qemu-img: {info.file_format}, "
                                                  f"backing file {info.backing_file!r})")
                try:  # Nova's own inspection: no external data file, no backing file, sane header
                    images.get_image_format(tmp).safety_check()
                except Exception as e:  # noqa: BLE001 - whatever the inspector refuses, the image is refused
                    raise exception.ImageUnacceptable(image_id=image_id, reason=f"unsafe {want_format}: {e}") from e
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != want_sha:
                raise exception.ImageUnacceptable(image_id=image_id, reason="its bytes are not the sha256 recorded")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _fetch(self, context, instance, image_id: str):
        """The root image (shared, read-only, cached per image as libvirt's _base), kernel and initrd."""
        import fcntl  # noqa: PLC0415

        from imageupdate.site import vm  # noqa: PLC0415

        if not instance.kernel_id or not instance.ramdisk_id:
            raise exception.ImageUnacceptable(image_id=image_id, reason="an imageupdate node boots a kernel: "
                                              "the image has no kernel_id/ramdisk_id (a tree-only release?)")
        base = os.path.join(CONF.instances_path, "_base")
        os.makedirs(base, mode=0o700, exist_ok=True)
        paths = {}
        for what, iid, fmt in (("root", image_id, "qcow2"), ("kernel", instance.kernel_id, None),
                               ("ramdisk", instance.ramdisk_id, None)):
            paths[what] = os.path.join(base, f"{iid}.{what}")
            with open(os.path.join(base, f"{iid}.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._download(context, iid, paths[what], fmt)
        return vm.Boot(Path(paths["kernel"]), Path(paths["ramdisk"]), Path(paths["root"]), "", "")

    # the machine ---------------------------------------------------------------------------------------------

    def _slot(self, instance) -> int:
        """The instance's index on the plane's network (its address, MAC and namespace), taken and recorded
        in one step: Heat creates a fleet's servers at once, and two spawns must not pick the same one."""
        with self._lock:
            data = self._load()
            mine = data.get(instance.uuid, {}).get("index")
            if isinstance(mine, int):
                return mine
            used = {rec.get("index") for rec in data.values()}
            index = next(i for i in range(250) if i not in used)
            data.setdefault(instance.uuid, {})["index"] = index
            self._save(data)
            return index

    def _config_drive(self, context, instance, index: int, injected_files, admin_password) -> str:
        from nova.api.metadata import base as metadata  # noqa: PLC0415
        from nova.network import model as network_model  # noqa: PLC0415
        from nova.virt import configdrive  # noqa: PLC0415

        from imageupdate.site import vm  # noqa: PLC0415

        address = self.net.address(index)
        network_metadata = {
            "links": [{"id": "eth0", "type": "phy", "ethernet_mac_address": vm.mac_for(index), "mtu": 1500}],
            "networks": [{"id": "net0", "link": "eth0", "type": "ipv4", "ip_address": address,
                          "netmask": vm.netmask(24), "routes": [
                              {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": self.net.gateway}]}],
            "services": []}
        md = metadata.InstanceMetadata(instance, content=injected_files or [],
                                       extra_md={"admin_pass": admin_password} if admin_password else {},
                                       network_info=network_model.NetworkInfo([]),
                                       network_metadata=network_metadata)
        path = os.path.join(self._dir(instance), "disk.config")
        with configdrive.ConfigDriveBuilder(instance_md=md) as cdb:
            cdb.make_drive(path)
        return path

    def _launch(self, context, instance, image_meta, injected_files=None, admin_password=None) -> None:
        from imageupdate.site import vm  # noqa: PLC0415

        boot = self._fetch(context, instance, image_meta.id)
        index = self._slot(instance)
        node = f"vm{index}"
        inst_dir = self._dir(instance)
        state = os.path.join(inst_dir, "disk.eph0")
        if not os.path.exists(state):
            if not instance.flavor.ephemeral_gb:
                raise exception.NovaException("an imageupdate node keeps its state on the flavor's ephemeral disk: "
                                              "use a flavor with one")
            vm.make_state_disk(Path(state), size=instance.flavor.ephemeral_gb << 30)
        drive = self._config_drive(context, instance, index, injected_files, admin_password)
        cmdline = image_meta.properties.get("os_command_line")
        if not cmdline:
            raise exception.ImageUnacceptable(image_id=image_meta.id, reason="no os_command_line")
        spec = vm.VmSpec(node, boot, Path(state), self.net.tap(), vm.mac_for(index), self.net.address(index),
                         self.net.gateway, 24, Path(inst_dir), memory_mb=instance.flavor.memory_mb,
                         accel=vm.accel(), cmdline=cmdline,
                         extra_drives=(f"file={drive},if=virtio,format=raw,readonly=on",))
        self.net.create_vm_node(node, index)
        pid = vm.launch(spec, self.net.netns(node), Path(inst_dir) / "qemu.log")
        self._update(instance.uuid, name=instance.name, index=index, node=node, pid=pid, image=image_meta.id)
        address = self.net.address(index)
        if instance.access_ip_v4 != address:  # how the orchestrator reaches the node (no Neutron here)
            instance.access_ip_v4 = address
            instance.save()
        LOG.info("instance %s: VM %s (pid %s) booting image %s at %s", instance.uuid, node, pid, image_meta.id,
                 address)

    def _stop(self, instance) -> str:
        from imageupdate.base import procs  # noqa: PLC0415
        from imageupdate.site import vm  # noqa: PLC0415

        rec = self._load().get(instance.uuid, {})
        pid = rec.get("pid")
        if not self._alive(pid):
            return "not running"
        qmp = vm.Qmp(Path(CONF.instances_path) / instance.uuid / "qmp.sock")
        how = vm.stop(pid, qmp, procs.alive, grace=60.0)
        self._update(instance.uuid, pid=None)
        return how

    # the driver interface ------------------------------------------------------------------------------------

    def _create(self, context, instance, image_meta, injected_files, admin_password) -> None:
        self._launch(context, instance, image_meta, injected_files, admin_password)

    def _replace(self, context, instance, image_meta, injected_files, admin_password) -> None:
        self._fetch(context, instance, image_meta.id)  # the new images first, while the old release still runs
        how = self._stop(instance)
        LOG.info("instance %s: stopped for the rebuild (%s)", instance.uuid, how)
        self._launch(context, instance, image_meta, injected_files, admin_password)
        if instance.uuid in self.instances:
            self.instances[instance.uuid].state = power_state.RUNNING

    def power_off(self, instance, timeout=0, retry_interval=0):
        self._stop(instance)
        super().power_off(instance, timeout, retry_interval)

    def power_on(self, context, instance, network_info, block_device_info=None, accel_info=None,
                 share_info=None):
        if not self._alive(self._load().get(instance.uuid, {}).get("pid")):
            self._launch(context, instance, instance.image_meta)
        super().power_on(context, instance, network_info, block_device_info, accel_info, share_info)

    def get_info(self, instance, use_cache=True):
        from nova.virt import hardware  # noqa: PLC0415

        if instance.uuid not in self.instances:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        alive = self._alive(self._load().get(instance.uuid, {}).get("pid"))
        return hardware.InstanceInfo(state=power_state.RUNNING if alive else power_state.SHUTDOWN)

    def get_console_output(self, context, instance):
        path = os.path.join(CONF.instances_path, instance.uuid, "console.log")
        try:
            with open(path, "rb") as f:
                return f.read(4 * 1024 * 1024)
        except OSError:
            raise exception.ConsoleNotAvailable() from None

    def destroy(self, context, instance, network_info, block_device_info=None, destroy_disks=True,
                destroy_secrets=True):
        import shutil  # noqa: PLC0415

        self._stop(instance)
        rec = self._load().get(instance.uuid, {})
        if isinstance(rec.get("index"), int):
            self.net.delete_node(rec["node"], rec["index"])
        if destroy_disks:
            shutil.rmtree(os.path.join(CONF.instances_path, instance.uuid), ignore_errors=True)
        self._update(instance.uuid, gone=True)
        super().destroy(context, instance, network_info, block_device_info, destroy_disks, destroy_secrets)
