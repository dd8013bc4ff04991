"""imageupdate: image-based, immutable fleet updates through OpenStack Heat."""

from __future__ import annotations


def version() -> str:
    try:
        from importlib.metadata import version as _v

        return _v("imageupdate")
    except Exception:  # not installed (source checkout on PYTHONPATH)
        return "0+unknown"
