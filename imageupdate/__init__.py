"""imageupdate: image-based, immutable fleet updates through OpenStack Heat."""

from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("imageupdate")
    except PackageNotFoundError:  # source checkout on PYTHONPATH, not installed
        return "0+unknown"
