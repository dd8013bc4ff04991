"""The package layers in ``.importlinter`` hold, and the check fails on an import that breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(REPO / ".importlinter"), "--no-cache"],
                          check=False, cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_its_layers() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "why"), [
    ("base/text.py", "import imageupdate.cli.main", "imageupdate.base is not allowed to import imageupdate.cli"),
    ("cloud/hostkeys.py", "from imageupdate.site import node", "imageupdate.cloud is not allowed to import "
                                                              "imageupdate.site"),
    ("images/store.py", "from imageupdate.upgrade import plan", "imageupdate.images is not allowed to import "
                                                               "imageupdate.upgrade"),
    ("api/fleets.py", "import imageupdate.commands.run", "imageupdate.api is not allowed to import "
                                                         "imageupdate.commands"),
    ("commands/spec.py", "import imageupdate.osc.plugin", "imageupdate.commands is not allowed to import "
                                                          "imageupdate.osc"),
    ("cli/main.py", "import imageupdate.osc.commands", "imageupdate.cli is not allowed to import imageupdate.osc"),
])
def test_an_upward_or_sideways_import_fails_the_check(tmp_path: Path, module: str, line: str, why: str) -> None:
    shutil.copytree(REPO / "imageupdate", tmp_path / "imageupdate",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "imageupdate" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and why in done.stdout, done.stdout
