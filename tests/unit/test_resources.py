"""Resource survival hooks with real scripts: phases, the key-value store, timeouts, bad directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from imageupdate.base.errors import EXIT_BAD_INPUT
from imageupdate.verify.resources import BadHooksDir, ResourceHooks, scripts

RECORDER = """#!/bin/sh
set -eu
echo "$1 ${IMAGEUPDATE_NODE:-} $IMAGEUPDATE_SITE" >> "$LOG"
case "$1" in
  create) echo "id-42" > "$IMAGEUPDATE_KV/id"; echo created ;;
  verify|verify_noapi)
    test "$(cat "$IMAGEUPDATE_KV/id")" = "id-42" || { echo "lost the id"; exit 3; }
    echo "id intact" ;;
  destroy) cat "$IMAGEUPDATE_KV/id" ;;
esac
"""


def hook(directory: Path, name: str, text: str, mode: int = 0o755) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / name
    p.write_text(text)
    p.chmod(mode)
    return p


def test_phases_run_in_order_and_share_the_key_value_store(tmp_path: Path) -> None:
    log = tmp_path / "log"
    hook(tmp_path / "hooks", "10-rec", RECORDER)
    hook(tmp_path / "hooks", "20-rec", RECORDER)
    hooks = ResourceHooks(tmp_path / "hooks", tmp_path / "kv", env={"IMAGEUPDATE_SITE": "s", "LOG": str(log)})
    runs = hooks.run("create") + hooks.run("verify_noapi", "node0") + hooks.run("verify", "node0") \
        + hooks.run("destroy")
    assert all(r.ok for r in runs), [r.output for r in runs]
    assert [(r.script, r.phase, r.node) for r in runs] == [
        ("10-rec", "create", None), ("20-rec", "create", None),
        ("10-rec", "verify_noapi", "node0"), ("20-rec", "verify_noapi", "node0"),
        ("10-rec", "verify", "node0"), ("20-rec", "verify", "node0"),
        ("10-rec", "destroy", None), ("20-rec", "destroy", None)]
    assert runs[-1].output == "id-42"
    assert log.read_text().splitlines()[:3] == ["create  s", "create  s", "verify_noapi node0 s"]
    assert (tmp_path / "kv" / "10-rec" / "id").read_text() == "id-42\n"
    assert runs[4].as_check().name == "resources:10-rec:verify" and runs[4].as_check().ok
    hooks.forget()
    assert not (tmp_path / "kv").exists()


def test_a_failing_hook_fails_with_its_output_and_exit_status(tmp_path: Path) -> None:
    hook(tmp_path / "hooks", "rec", RECORDER)
    hooks = ResourceHooks(tmp_path / "hooks", tmp_path / "kv", env={"IMAGEUPDATE_SITE": "s",
                                                                      "LOG": str(tmp_path / "log")})
    (run,) = hooks.run("verify", "node1")  # no create: the id was never saved
    assert not run.ok and run.output.endswith("lost the id (exit status 3)")


def test_a_hanging_hook_is_killed_at_its_timeout_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook(tmp_path / "hooks", "hang", f"#!/bin/sh\necho starting\nsleep 300 &\necho $! > {pidfile}\nwait\n")
    hooks = ResourceHooks(tmp_path / "hooks", tmp_path / "kv", timeout=0.5)
    t0 = time.monotonic()
    (run,) = hooks.run("verify", "node0")
    assert time.monotonic() - t0 < 30
    assert not run.ok and run.output == "starting\ntimed out after 0.5 s (killed)"
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(") ")[1][0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the hook's child {child} survived its timeout")


@pytest.mark.parametrize("setup, says", [
    (lambda d: None, "does not exist: create it or drop --resources"),
    (lambda d: d.mkdir(), "holds no scripts"),
    (lambda d: hook(d, "x", "#!/bin/sh\n", 0o644), "is not executable: chmod +x"),
    (lambda d: (d / "sub").mkdir(parents=True), "is not a regular file"),
])
def test_a_bad_hooks_directory_is_bad_input(tmp_path: Path, setup, says: str) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "hooks"
    setup(d)
    with pytest.raises(BadHooksDir) as exc:
        scripts(d)
    assert says in str(exc.value) and exc.value.exit_code == EXIT_BAD_INPUT


def test_editor_backups_and_dotfiles_are_not_hooks(tmp_path: Path) -> None:
    d = tmp_path / "hooks"
    hook(d, "10-a", "#!/bin/sh\n")
    hook(d, "10-a~", "#!/bin/sh\n", 0o644)
    hook(d, ".hidden", "x", 0o644)
    assert [p.name for p in scripts(d)] == ["10-a"]


def test_unknown_phase_is_a_programming_error(tmp_path: Path) -> None:
    hook(tmp_path / "hooks", "a", "#!/bin/sh\n")
    with pytest.raises(ValueError):
        ResourceHooks(tmp_path / "hooks", tmp_path / "kv").run("upgrade")
    assert os.access(tmp_path / "hooks" / "a", os.X_OK)
