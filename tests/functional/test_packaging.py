"""The installed package finds elements/ and heat_templates/ (wheel, not checkout)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.functional


def test_wheel_install_finds_shipped_data(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "whl"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "whl").glob("imageupdate-*.whl")
    prefix = tmp_path / "prefix"
    # --ignore-installed: never uninstall the imageupdate of the running venv
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                    "--prefix", str(prefix), str(wheel)], check=True, capture_output=True)
    assert (Path(sys.executable).parent / "imageupdate").exists(), "the running venv lost imageupdate"
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    env = {k: v for k, v in os.environ.items() if k != "IMAGEUPDATE_DATA_DIR"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [sys.executable, "-c", "import imageupdate.base.datadirs as r; print(r.elements_dir()); "
         "print(r.heat_templates_dir()); print(r.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0] == str(prefix / "share/imageupdate/elements")
    assert out[1] == str(prefix / "share/imageupdate/heat_templates")
    assert out[2].startswith(str(site)), "imported the checkout, not the wheel"
    hook = Path(out[0]) / "imageupdate-node/install.d/50-imageupdate-node"
    assert os.access(hook, os.X_OK), "element hooks lost their executable bit"
    for shipped in ("environments/local.yaml", "environments/openstack.yaml", "openstack/server.yaml",
                    "plugins/imageupdate_local.py"):
        assert (Path(out[1]) / shipped).is_file(), f"{shipped} is not installed"
