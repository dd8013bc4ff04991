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

import nova.conf
from nova import exception
from nova.compute import power_state, task_states
from nova.image import glance
from nova.virt import fake
from oslo_log import log as logging

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)
RELEASE_PROPERTY = "imageupdate_release"


class LocalSiteDriver(fake.FakeDriverWithoutFakeNodes):
    capabilities = dict(fake.FakeDriver.capabilities, supports_evacuate=False)

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

    def spawn(self, context, instance, image_meta, injected_files, admin_password, allocations,
              network_info=None, block_device_info=None, power_on=True, accel_info=None):
        self._swap(context, instance, image_meta.id)
        super().spawn(context, instance, image_meta, injected_files, admin_password, allocations,
                      network_info, block_device_info, power_on, accel_info)

    def rebuild(self, context, instance, image_meta, injected_files, admin_password, allocations, bdms,
                detach_block_devices, attach_block_devices, network_info=None, evacuate=False,
                block_device_info=None, preserve_ephemeral=False, accel_uuids=None, reimage_boot_volume=False):
        if not preserve_ephemeral:
            raise exception.NovaException("an imageupdate node keeps its state partition: rebuild it with "
                                          "preserve_ephemeral")
        instance.task_state = task_states.REBUILD_SPAWNING
        instance.save(expected_task_state=[task_states.REBUILDING])
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
