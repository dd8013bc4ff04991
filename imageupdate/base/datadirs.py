"""Where the project's shipped data lives: ``elements/`` and ``heat_templates/``.

From a source checkout they sit next to the package; from an installed wheel
pbr puts them under ``<prefix>/share/imageupdate/``. ``IMAGEUPDATE_DATA_DIR``
overrides both (a directory that holds ``elements/`` and ``heat_templates/``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from imageupdate.base.errors import StoreError

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # imageupdate/, this file being imageupdate/base/datadirs.py


def _candidates() -> list[Path]:
    found: list[Path] = []
    override = os.environ.get("IMAGEUPDATE_DATA_DIR")
    if override:
        found.append(Path(override))
    found.append(_PACKAGE_DIR.parent)  # source checkout
    # <prefix>/lib/pythonX.Y/site-packages/imageupdate -> <prefix>
    if len(_PACKAGE_DIR.parents) > 3:
        found.append(_PACKAGE_DIR.parents[3] / "share" / "imageupdate")
    found.append(Path(sys.prefix) / "share" / "imageupdate")
    return found


def data_dir(name: str) -> Path:
    """Return the shipped directory ``name`` (``elements`` or ``heat_templates``)."""
    for base in _candidates():
        path = base / name
        if path.is_dir() and (path / "README.rst").is_file():
            return path
    raise StoreError(
        f"cannot find imageupdate's {name}/ directory; reinstall imageupdate "
        f"or set IMAGEUPDATE_DATA_DIR to the directory that holds {name}/"
    )


def elements_dir() -> Path:
    return data_dir("elements")


def heat_templates_dir() -> Path:
    return data_dir("heat_templates")
