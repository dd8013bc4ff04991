"""A machine node's VM, without booting one: the QEMU command, the state disk, QMP and the stop ladder."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageupdate.site import vm


def spec(tmp_path: Path) -> vm.VmSpec:
    boot = vm.Boot(tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "root.qcow2", "cloudimg-rootfs",
                   "/usr/lib/imageupdate/vm-init")
    return vm.VmSpec("node0", boot, tmp_path / "state.img", "iu-tap0", vm.mac_for(0), "10.250.0.2", "10.250.0.1",
                     24, tmp_path)


def test_the_qemu_command_boots_the_releases_kernel_on_a_read_only_root(tmp_path: Path) -> None:
    cmd = vm.qemu_command(spec(tmp_path))
    assert cmd[0] == "qemu-system-x86_64" and cmd[cmd.index("-accel") + 1] == "tcg,tb-size=64"
    assert cmd.count("-accel") == 1  # a second -accel is silently ignored by QEMU
    append = cmd[cmd.index("-append") + 1].split()
    assert "root=LABEL=cloudimg-rootfs" in append and "ro" in append and "net.ifnames=0" in append
    assert "ip=10.250.0.2::10.250.0.1:255.255.255.0:node0:eth0:off" in append
    assert "init=/usr/lib/imageupdate/vm-init" in append
    drives = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-drive"]
    assert drives[0].endswith(",if=virtio,format=qcow2,readonly=on") and "state.img" in drives[1]
    assert f"file:{tmp_path / 'console.log'}" in cmd and "-no-reboot" in cmd


@pytest.mark.parametrize("prefix,mask", [(24, "255.255.255.0"), (16, "255.255.0.0"), (28, "255.255.255.240")])
def test_netmask(prefix: int, mask: str) -> None:
    assert vm.netmask(prefix) == mask


def test_macs_are_stable_and_distinct() -> None:
    assert vm.mac_for(3) == vm.mac_for(3) != vm.mac_for(4)
    assert int(vm.mac_for(0).split(":")[0], 16) & 2  # locally administered


def test_a_state_disk_is_labelled_and_seeded_without_a_mount(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    (seed / "identity").mkdir(parents=True)
    (seed / "identity" / "authorized_keys").write_text("ssh-ed25519 AAAA test\n")
    disk = tmp_path / "state.img"
    vm.make_state_disk(disk, seed, size=64 << 20)
    label = subprocess.run(["e2label", str(disk)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == vm.STATE_LABEL
    listed = subprocess.run(["debugfs", "-R", "cat /identity/authorized_keys", str(disk)], capture_output=True,
                            text=True, check=True).stdout
    assert "ssh-ed25519 AAAA test" in listed
    assert disk.stat().st_blocks * 512 < 16 << 20  # sparse


@pytest.fixture(params=["short", "deep"])
def qmp_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, list[str]]]:
    """A socket speaking QMP's greeting, capabilities negotiation and an event before each answer. Seen: a
    Nova instance directory under a long test directory put the socket's path past the 107 bytes a unix
    socket's path may hold; QEMU refused to start and the servers never booted. "deep" is such a path."""
    run_dir = tmp_path / ("x" * 120 if request.param == "deep" else "run")
    run_dir.mkdir()
    path = run_dir / "qmp.sock"
    asked: list[str] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(run_dir)  # as QEMU binds it: by name, in its working directory
    try:
        server.bind(path.name)
    finally:
        os.chdir(cwd)
    server.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
                f.flush()
                for line in f:
                    asked.append(json.loads(line)["execute"])
                    f.write(b'{"event": "POWERDOWN"}\n{"return": {}}\n')
                    f.flush()

    threading.Thread(target=serve, daemon=True).start()
    yield path, asked
    server.close()


def test_qmp_negotiates_then_sends_the_command(qmp_server: tuple[Path, list[str]]) -> None:
    path, asked = qmp_server
    assert vm.Qmp(path).command("system_powerdown") == {"return": {}}
    assert asked == ["qmp_capabilities", "system_powerdown"]


def test_stop_powers_down_first_then_quits_then_kills(qmp_server: tuple[Path, list[str]]) -> None:
    path, asked = qmp_server
    lives = iter([True, True, False])
    said = vm.stop(2**22 + 1, vm.Qmp(path), alive=lambda _p: next(lives, False), grace=30, sleep=lambda _s: None)
    assert said == "powered off" and asked[-1] == "system_powerdown"
    asked.clear()
    stubborn = subprocess.Popen(["sleep", "60"])  # a real process of ours: the last rung kills it
    try:
        said = vm.stop(stubborn.pid, vm.Qmp(path), alive=lambda p: stubborn.poll() is None, grace=0.2,
                       quit_grace=0.2)
    finally:
        stubborn.kill()
        stubborn.wait()
    assert asked == ["qmp_capabilities", "system_powerdown", "qmp_capabilities", "quit"]
    assert said == "killed (QMP did not stop it)"


def test_stop_without_a_qmp_socket_kills(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        said = vm.stop(proc.pid, vm.Qmp(tmp_path / "none.sock"), alive=lambda p: proc.poll() is None,
                       quit_grace=1.0)
    finally:
        proc.kill()
        proc.wait()
    assert said == "killed (QMP did not stop it)"


def test_the_console_tail_is_the_last_printable_lines_bounded(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    assert vm.console_tail(console) == ""  # no console yet
    console.write_bytes(b"x" * 20000 + b"\n[    1.2] Loading, please wait...\n\n\x1b[1;31m[    2.0] VFS: Cannot open "
                        b"root device \"LABEL=cloudimg-rootfs\"\x1b[0m\r\n[    2.1] Kernel panic - not syncing: "
                        b"VFS: Unable to mount root fs\x07\x00 on unknown-block(0,0)\n" + b"y" * 500 + b"\n")
    tail = vm.console_tail(console)
    assert tail.startswith('[    2.0] VFS: Cannot open root device "LABEL=cloudimg-rootfs" | [    2.1] Kernel panic')
    assert "\x1b" not in tail and "\x07" not in tail and "\x00" not in tail and "Loading" not in tail
    assert tail.endswith(" | " + "y" * 160)  # each line cut to its width
    assert "\n" not in tail


def test_the_console_tail_keeps_a_kernel_panic_above_its_stack_trace(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("[ 2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n"
                       + "".join(f"[ 2.2] frame {i}\n" for i in range(30)) + "[ 2.4] Rebooting in 1 seconds..\n")
    assert vm.console_tail(console) == ("[ 2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on "
                                        "unknown-block(0,0) | [ 2.2] frame 29 | [ 2.4] Rebooting in 1 seconds..")


def test_a_cloud_vm_boots_its_images_command_line_and_gets_its_config_drive(tmp_path: Path) -> None:
    from dataclasses import replace
    cloud = replace(spec(tmp_path), cmdline="root=LABEL=cloudimg-rootfs ro init=/usr/lib/imageupdate/vm-init",
                    extra_drives=(f"file={tmp_path / 'disk.config'},if=virtio,format=raw,readonly=on",))
    cmd = vm.qemu_command(cloud)
    assert cmd[cmd.index("-append") + 1] == "root=LABEL=cloudimg-rootfs ro init=/usr/lib/imageupdate/vm-init"
    drives = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-drive"]
    assert len(drives) == 3 and drives[2].startswith(f"file={tmp_path / 'disk.config'},")


def without_netns(monkeypatch: pytest.MonkeyPatch) -> None:
    """``launch`` runs QEMU through ``ip netns exec NS``: run the command after those four words instead."""
    popen = subprocess.Popen
    monkeypatch.setattr(vm.subprocess, "Popen", lambda args, **kw: popen(args[4:], **kw))


needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")


def test_launch_says_when_qemu_exits_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm, "qemu_command", lambda s: ["false"])  # stands for a QEMU that refuses its options
    without_netns(monkeypatch)
    with pytest.raises(vm.OperationError, match="QEMU exited at once for node0"):
        vm.launch(spec(tmp_path), "iu-x-node0", tmp_path / "qemu.log")


def fake_qemu(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return [str(script)]


def test_a_qemu_that_exits_after_its_pid_file_did_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what QEMU does when a drive, the kernel or the tap cannot be opened: the pid file is written first, then
    # the error, the pid file removed and exit 1 (strace of qemu-system-x86_64 8.2 with a missing drive)
    s = spec(tmp_path)
    monkeypatch.setattr(vm, "qemu_command", lambda _s: fake_qemu(tmp_path, (
        f"echo $$ > {s.pidfile}; sleep 0.3; echo \"qemu-system-x86_64: -drive file=/gone.img: Could not open "
        f"'/gone.img': No such file or directory\" >&2; rm -f {s.pidfile}; exit 1")))
    without_netns(monkeypatch)
    with pytest.raises(vm.OperationError, match="QEMU exited at once for node0: .*Could not open '/gone.img'"):
        vm.launch(s, "iu-x-node0", tmp_path / "qemu.log")


@needs_qemu
def test_a_real_qemu_that_cannot_open_its_drive_did_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = spec(tmp_path)  # no kernel, no root image, no state disk: QEMU fails after writing its pid file
    monkeypatch.setattr(vm, "qemu_command", lambda _s: ["qemu-system-x86_64", "-nodefaults", "-display", "none",
                                                         "-drive", f"file={tmp_path / 'gone.img'},format=raw",
                                                         "-qmp", f"unix:{s.qmp.name},server=on,wait=off",
                                                         "-pidfile", str(s.pidfile)])
    without_netns(monkeypatch)
    with pytest.raises(vm.OperationError, match="QEMU exited at once for node0: .*gone.img"):
        vm.launch(s, "iu-x-node0", tmp_path / "qemu.log")


@needs_qemu
def test_a_qemu_whose_monitor_answers_has_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = spec(tmp_path)
    monkeypatch.setattr(vm, "qemu_command", lambda _s: ["qemu-system-x86_64", "-nodefaults", "-display", "none",
                                                         "-accel", "tcg", "-S",  # made, never run
                                                         "-qmp", f"unix:{s.qmp.name},server=on,wait=off",
                                                         "-pidfile", str(s.pidfile)])
    without_netns(monkeypatch)
    pid = vm.launch(s, "iu-x-node0", tmp_path / "qemu.log")
    try:
        assert vm.Qmp(s.qmp).command("query-status")["return"]["status"] == "prelaunch"  # made, not run
    finally:
        os.kill(pid, signal.SIGKILL)
