#!/usr/bin/env python3
"""A real OpenStack control plane on this machine, for tests: ``controlplane.py start|stop|status DIR``.

Keystone, Glance (file store), Placement, Nova (api, conductor, scheduler, compute) and Heat (api, engine) from
PyPI in imageupdate's venv, on MariaDB and RabbitMQ from Debian; the APIs served by gunicorn on 127.0.0.1 only;
a minimal fake Neutron (test-only, empty lists). Every process starts in its own process group, recorded in
``DIR/processes.json``; ``stop`` kills each group and checks none survives. ``DIR/clouds.yaml`` is the cloud
``imageupdate-test`` (admin). Everything the plane keeps is under DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = Path(sys.executable).parent
PASSWORD = "imageupdate-test"  # loopback-only test plane
SERVICES = ("keystone", "glance", "placement", "nova", "heat", "neutron")
REGION = "RegionOne"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"controlplane: {what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def wait_api(port: int, what: str, timeout: float = 180) -> None:
    """Until the API's root answers below 500 (its version document: 200 or 300). A listening port is not
    enough: gunicorn binds before its worker has loaded the service, and a client discovering the API's
    versions then (openstacksdk) gets none. A port that does not listen yet is refused: asked again."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10):
                return  # 2xx
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return  # 300 Multiple Choices: the version list
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise SystemExit(f"controlplane: {what} on 127.0.0.1:{port} gave no version document within {timeout:.0f} s "
                     f"({last})")


class Plane:
    def __init__(self, root: Path, site: str = "", store: str = "", vm: bool = False) -> None:
        self.root = root.resolve()
        self.site, self.store = site, store
        self.vm = vm  # servers are QEMU machines booting what Glance holds (imageupdate_node.VmDriver)
        self.logs = self.root / "logs"
        self.conf = self.root / "conf"
        self.state_file = self.root / "processes.json"
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    # processes -----------------------------------------------------------------------------------------------

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})}, cwd=self.root)
        log.close()
        self.state.setdefault("groups", {})[name] = proc.pid
        self.save()
        return proc.pid

    def save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=1) + "\n")

    def run(self, *cmd: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env={**os.environ, **(env or {})},
                              cwd=self.root, check=False)
        with open(self.logs / "setup.log", "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            raise SystemExit(f"controlplane: {' '.join(cmd[:3])} failed ({proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}; see {self.logs / 'setup.log'}")
        return proc.stdout

    # start ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.state.get("groups"):
            raise SystemExit(f"controlplane: {self.root} already runs; stop it first")
        t0 = time.monotonic()
        for d in (self.logs, self.conf, self.root / "mysql", self.root / "rabbit", self.root / "images",
                  self.root / "nova", self.root / "lock"):
            d.mkdir(parents=True, exist_ok=True)
        ports = {n: free_port() for n in ("mysql", "rabbit", *SERVICES)}
        self.state = {"ports": ports, "groups": {}, "started": time.time(), "vm": self.vm}
        self.save()
        self.mariadb(ports["mysql"])
        self.rabbitmq(ports["rabbit"])
        self.write_configs(ports)
        self.sync_databases()
        self.spawn("keystone", [sys.executable, str(HERE / "wsgi.py"), "keystone", str(ports["keystone"]),
                                str(self.conf / "keystone")])
        wait_api(ports["keystone"], "keystone")
        self.register(ports)
        self.spawn("neutron", [sys.executable, str(HERE / "fake_neutron.py"), str(ports["neutron"])])
        for svc in ("glance", "placement", "nova", "heat"):
            self.spawn(f"{svc}-api", [sys.executable, str(HERE / "wsgi.py"), svc, str(ports[svc]),
                                      str(self.conf / svc)])
        nova_conf = str(self.conf / "nova" / "nova.conf")
        self.install_driver()
        for svc in ("conductor", "scheduler", "compute"):
            self.spawn(f"nova-{svc}", [str(VENV / f"nova-{svc}"), "--config-file", nova_conf],
                       {"IMAGEUPDATE_SITE": self.site, "IMAGEUPDATE_STORE": self.store}
                       if svc == "compute" and not self.vm else None)  # a VM compute host is given no store
        self.spawn("heat-engine", [str(VENV / "heat-engine"), "--config-file", str(self.conf / "heat" / "heat.conf")])
        for svc in ("glance", "placement", "nova", "heat"):
            wait_api(ports[svc], svc)
        wait_port(ports["neutron"], "neutron")  # the fake: no version document
        self.discover_hosts()
        self.write_clouds_yaml(ports)
        self.flavor()
        self.state["ready_seconds"] = round(time.monotonic() - t0, 1)
        self.save()
        print(f"control plane up in {self.state['ready_seconds']} s: {self.root / 'clouds.yaml'}")

    def install_driver(self) -> None:
        """Nova loads drivers only from its nova.virt package: link ours in."""
        import nova.virt

        target = Path(nova.virt.__file__).parent / "imageupdate_node.py"
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(HERE / "imageupdate_node.py")

    def mariadb(self, port: int) -> None:
        data = self.root / "mysql"
        if not (data / "mysql").exists():
            self.run("mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                     "--auth-root-authentication-method=normal", "--skip-test-db")
        sock = self.root / "mysql.sock"
        self.spawn("mariadb", ["mariadbd", "--no-defaults", "--user=root", f"--datadir={data}", f"--socket={sock}",
                               "--bind-address=127.0.0.1", f"--port={port}", f"--pid-file={self.root / 'mysql.pid'}",
                               "--skip-log-bin", "--innodb-buffer-pool-size=128M", "--max-connections=500",
                               "--innodb-flush-log-at-trx-commit=2"])
        wait_port(port, "mariadb", 60)
        sql = "".join(f"CREATE DATABASE IF NOT EXISTS {db};" for db in
                      ("keystone", "glance", "placement", "nova_api", "nova", "nova_cell0", "heat"))
        sql += (f"CREATE USER IF NOT EXISTS 'os'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';"
                "GRANT ALL PRIVILEGES ON *.* TO 'os'@'127.0.0.1';FLUSH PRIVILEGES;")
        self.run("mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql)

    def rabbitmq(self, port: int) -> None:
        base = self.root / "rabbit"
        env = {"RABBITMQ_NODENAME": f"imageupdate{port}@localhost",  # two planes on one machine do not collide
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
               "RABBITMQ_NODE_PORT": str(port), "RABBITMQ_DIST_PORT": str(free_port()),
               "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
               "RABBITMQ_LOG_BASE": str(base / "log"), "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
               "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"), "HOME": str(base)}
        (base / "rabbitmq.conf").write_text("loopback_users = none\n")
        self.state["rabbit_env"] = env
        # the server script itself, as root: Debian's wrapper would switch to the rabbitmq user (in a session of
        # its own, and unable to reach a directory under a private temporary directory)
        self.spawn("rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env)
        wait_port(port, "rabbitmq", 120)

    def db(self, name: str) -> str:
        return f"mysql+pymysql://os:{PASSWORD}@127.0.0.1:{self.state['ports']['mysql']}/{name}?charset=utf8"

    def write_configs(self, p: dict[str, int]) -> None:
        ks = f"http://127.0.0.1:{p['keystone']}"
        transport = f"rabbit://guest:guest@127.0.0.1:{p['rabbit']}/"

        def authtoken(user: str) -> str:
            return (f"[keystone_authtoken]\nwww_authenticate_uri = {ks}\nauth_url = {ks}\nauth_type = password\n"
                    f"project_domain_name = Default\nuser_domain_name = Default\nproject_name = service\n"
                    f"username = {user}\npassword = {PASSWORD}\nregion_name = {REGION}\n"
                    "service_token_roles_required = true\n")

        def creds(section: str, user: str) -> str:
            return (f"[{section}]\nauth_type = password\nauth_url = {ks}/v3\nusername = {user}\npassword = {PASSWORD}\n"
                    f"project_name = service\nuser_domain_name = Default\nproject_domain_name = Default\n"
                    f"region_name = {REGION}\n")

        files = {
            "keystone/keystone.conf": (
                f"[DEFAULT]\nlog_file = {self.logs / 'keystone-app.log'}\n"
                f"[database]\nconnection = {self.db('keystone')}\n"
                f"[fernet_tokens]\nkey_repository = {self.conf / 'keystone' / 'fernet-keys'}\n"
                f"[credential]\nkey_repository = {self.conf / 'keystone' / 'credential-keys'}\n"),
            "glance/glance-api.conf": (
                f"[DEFAULT]\nenabled_backends = fs:file\nlog_file = {self.logs / 'glance-app.log'}\n"
                f"[database]\nconnection = {self.db('glance')}\n" + authtoken("glance")
                + f"[paste_deploy]\nflavor = keystone\nconfig_file = {self.conf / 'glance' / 'glance-api-paste.ini'}\n"
                f"[glance_store]\ndefault_backend = fs\n[fs]\nfilesystem_store_datadir = {self.root / 'images'}\n"
                f"[os_glance_staging_store]\nfilesystem_store_datadir = {self.root / 'images' / 'staging'}\n"
                f"[os_glance_tasks_store]\nfilesystem_store_datadir = {self.root / 'images' / 'tasks'}\n"),
            "placement/placement.conf": (
                f"[DEFAULT]\nlog_file = {self.logs / 'placement-app.log'}\n"
                f"[placement_database]\nconnection = {self.db('placement')}\n[api]\nauth_strategy = keystone\n"
                + authtoken("placement")),
            "nova/nova.conf": (
                f"[DEFAULT]\ntransport_url = {transport}\ncompute_driver = imageupdate_node."
                f"{'VmDriver' if self.vm else 'LocalSiteDriver'}\n"
                + ("mkisofs_cmd = genisoimage\nconfig_drive_format = iso9660\nforce_config_drive = true\n"
                   if self.vm else "") +
                f"state_path = {self.root / 'nova'}\ninstances_path = {self.root / 'nova' / 'instances'}\n"
                "host = imageupdate-compute\nlog_dir = " + str(self.logs) + "\n"
                f"[api_database]\nconnection = {self.db('nova_api')}\n[database]\nconnection = {self.db('nova')}\n"
                + authtoken("nova")
                + "[service_user]\nsend_service_user_token = true\n" + creds("service_user", "nova")[15:]
                + creds("placement", "placement") + creds("neutron", "nova")
                + f"[oslo_concurrency]\nlock_path = {self.root / 'lock'}\n"
                "[conductor]\nworkers = 1\n[scheduler]\nworkers = 1\ndiscover_hosts_in_cells_interval = 2\n"
                "[api]\nauth_strategy = keystone\n"),
            "heat/heat.conf": (
                f"[DEFAULT]\ntransport_url = {transport}\nnum_engine_workers = 1\n"
                "auth_encryption_key = 0123456789abcdef0123456789abcdef\n"
                "stack_user_domain_name = heat\nstack_domain_admin = heat_domain_admin\n"
                f"stack_domain_admin_password = {PASSWORD}\n"
                f"log_file = {self.logs / 'heat-app.log'}\n"
                f"[database]\nconnection = {self.db('heat')}\n" + authtoken("heat")
                + creds("trustee", "heat").replace("project_name = service\n", "")
                + f"[clients_keystone]\nauth_uri = {ks}\n"
                f"[paste_deploy]\napi_paste_config = {self.conf / 'heat' / 'api-paste.ini'}\n"
                f"[heat_api]\nbind_host = 127.0.0.1\nbind_port = {p['heat']}\n"),
        }
        for rel, text in files.items():
            path = self.conf / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        etc = VENV.parent / "etc"
        shutil.copy(etc / "glance" / "glance-api-paste.ini", self.conf / "glance")
        shutil.copy(etc / "nova" / "api-paste.ini", self.conf / "nova")
        shutil.copy(etc / "heat" / "api-paste.ini", self.conf / "heat")

    def sync_databases(self) -> None:
        k, g = str(self.conf / "keystone" / "keystone.conf"), str(self.conf / "glance" / "glance-api.conf")
        p, n, h = (str(self.conf / "placement" / "placement.conf"), str(self.conf / "nova" / "nova.conf"),
                   str(self.conf / "heat" / "heat.conf"))
        m = lambda tool: str(VENV / tool)  # noqa: E731
        self.run(m("keystone-manage"), "--config-file", k, "db_sync")
        for what in ("fernet_setup", "credential_setup"):
            self.run(m("keystone-manage"), "--config-file", k, what, "--keystone-user", "root",
                     "--keystone-group", "root")
        ks = f"http://127.0.0.1:{self.state['ports']['keystone']}/v3/"
        self.run(m("keystone-manage"), "--config-file", k, "bootstrap", "--bootstrap-password", PASSWORD,
                 "--bootstrap-admin-url", ks, "--bootstrap-internal-url", ks, "--bootstrap-public-url", ks,
                 "--bootstrap-region-id", REGION)
        self.run(m("glance-manage"), "--config-file", g, "db_sync")
        self.run(m("placement-manage"), "--config-file", p, "db", "sync")
        self.run(m("nova-manage"), "--config-file", n, "api_db", "sync")
        self.run(m("nova-manage"), "--config-file", n, "cell_v2", "map_cell0")
        self.run(m("nova-manage"), "--config-file", n, "cell_v2", "create_cell", "--name", "cell1")
        self.run(m("nova-manage"), "--config-file", n, "db", "sync")
        self.run(m("heat-manage"), "--config-file", h, "db_sync")

    def admin(self) -> Any:
        import openstack

        return openstack.connect(auth_url=f"http://127.0.0.1:{self.state['ports']['keystone']}/v3",
                                 username="admin", password=PASSWORD, project_name="admin",
                                 user_domain_name="Default", project_domain_name="Default", region_name=REGION)

    def register(self, p: dict[str, int]) -> None:
        """Service users and the catalog, through keystone's API (openstacksdk)."""
        ident = self.admin().identity
        service_project = ident.create_project(name="service", domain_id="default")
        admin_role = ident.find_role("admin")
        service_role = ident.find_role("service") or ident.create_role(name="service")
        for user in ("glance", "placement", "nova", "heat"):
            u = ident.create_user(name=user, password=PASSWORD, domain_id="default")
            for role in (admin_role, service_role):
                ident.assign_project_role_to_user(service_project, u, role)
        heat_domain = ident.create_domain(name="heat", description="Heat's stack users (wait condition handles)")
        domain_admin = ident.create_user(name="heat_domain_admin", password=PASSWORD, domain_id=heat_domain.id)
        ident.assign_domain_role_to_user(heat_domain, domain_admin, admin_role)
        for role in ("heat_stack_owner", "heat_stack_user", "member"):
            if ident.find_role(role) is None:
                ident.create_role(name=role)
        catalog = {"image": ("glance", f"http://127.0.0.1:{p['glance']}"),
                   "placement": ("placement", f"http://127.0.0.1:{p['placement']}"),
                   "compute": ("nova", f"http://127.0.0.1:{p['nova']}/v2.1"),
                   "network": ("neutron", f"http://127.0.0.1:{p['neutron']}"),
                   "orchestration": ("heat", f"http://127.0.0.1:{p['heat']}/v1/%(tenant_id)s")}
        for kind, (name, url) in catalog.items():
            svc = ident.create_service(name=name, type=kind)
            for interface in ("public", "internal", "admin"):
                ident.create_endpoint(service_id=svc.id, interface=interface, url=url, region_id=REGION)

    def flavor(self) -> None:
        """``imageupdate-node``: what the tests' servers use; the ephemeral disk stands for the state partition
        (a VM's state disk: sparse). A VM gets the flavor's memory; its root image must fit the flavor's disk."""
        ram, disk = (384, 2) if self.vm else (64, 1)
        self.admin().compute.create_flavor(name="imageupdate-node", vcpus=1, ram=ram, disk=disk, ephemeral=1)

    def discover_hosts(self) -> None:
        n = str(self.conf / "nova" / "nova.conf")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            out = self.run(str(VENV / "nova-manage"), "--config-file", n, "cell_v2", "discover_hosts", "--verbose")
            if "imageupdate-compute" in out or "Found 0 unmapped" in out and self._compute_mapped(n):
                return
            time.sleep(2)
        raise SystemExit("controlplane: nova-compute never registered (see logs/nova-compute.log)")

    def _compute_mapped(self, conf: str) -> bool:
        out = self.run(str(VENV / "nova-manage"), "--config-file", conf, "cell_v2", "list_hosts")
        return "imageupdate-compute" in out

    def write_clouds_yaml(self, p: dict[str, int]) -> None:
        (self.root / "clouds.yaml").write_text(
            "clouds:\n  imageupdate-test:\n    auth:\n"
            f"      auth_url: http://127.0.0.1:{p['keystone']}/v3\n      username: admin\n"
            f"      password: {PASSWORD}\n      project_name: admin\n      user_domain_name: Default\n"
            f"      project_domain_name: Default\n    region_name: {REGION}\n    identity_api_version: 3\n")

    # stop -----------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        groups = dict(self.state.get("groups", {}))
        if "rabbitmq" in groups:  # a clean stop flushes its state; the group kill below is the backstop
            rabbit_env = self.state.get("rabbit_env", {})
            subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n",
                            rabbit_env.get("RABBITMQ_NODENAME", "rabbit@localhost"), "stop"],
                           capture_output=True, check=False,
                           timeout=60, env={**os.environ, **rabbit_env})
        for _name, pgid in reversed(list(groups.items())):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_group_alive(g) for g in groups.values()):
            time.sleep(0.2)
        for pgid in groups.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for pid in self.stragglers():  # anything else that carries this plane's directory
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["epmd", "-kill"], capture_output=True, check=False)
        self.delete_vm_network()
        time.sleep(0.5)
        left = [n for n, g in groups.items() if _group_alive(g)] + [f"pid {p}" for p in self.stragglers()]
        self.state["groups"] = {}
        self.save()
        if left:
            raise SystemExit(f"controlplane: processes of {', '.join(left)} survived")
        print(f"control plane in {self.root} stopped; nothing left running")


    def delete_vm_network(self) -> None:
        """The VM driver's namespaces, veths and bridge (its QEMUs are stragglers: their command lines name
        this plane's directory)."""
        net_file = self.root / "nova" / "imageupdate-net.json"
        if not net_file.exists():
            return
        from imageupdate.site import network

        net = network.SiteNet(**json.loads(net_file.read_text()))
        for ns in network.ip("netns", "list").stdout.split():
            if ns.startswith(net.netns("vm")):
                index = int(ns[len(net.netns("vm")):])
                net.delete_node(f"vm{index}", index)
        net.delete_bridge()
        net_file.unlink()

    def stragglers(self) -> list[int]:
        """Live processes whose command line names this plane's directory, and RabbitMQ's (its environment
        does). Not any process whose environment mentions the directory: nodes the Nova driver started belong
        to their site and outlive the plane."""
        me, found = os.getpid(), []
        needle = str(self.root).encode()
        rabbit = f"RABBITMQ_MNESIA_BASE={self.root / 'rabbit' / 'mnesia'}".encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                if needle in (d / "cmdline").read_bytes() or rabbit in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
        return found


def _group_alive(pgid: int) -> bool:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                return True
    return False


def main() -> None:
    vm = sys.argv[3:] == ["--vm"]
    if not (len(sys.argv) in (3, 5) or vm) or sys.argv[1] not in ("start", "stop", "status"):
        raise SystemExit("usage: controlplane.py start DIR SITE STORE | start DIR --vm | stop DIR | status DIR")
    plane = Plane(Path(sys.argv[2]), vm=True) if vm else Plane(Path(sys.argv[2]), *sys.argv[3:5])
    if sys.argv[1] == "start":
        if plane.state.get("groups"):
            raise SystemExit(f"controlplane: {plane.root} already runs; stop it first")
        try:
            plane.start()
        except BaseException:
            plane.stop()  # a plane that did not come up leaves nothing running
            raise
    elif sys.argv[1] == "stop":
        plane.stop()
    else:
        print(json.dumps(plane.state, indent=1))


if __name__ == "__main__":
    main()
