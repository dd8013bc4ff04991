"""Load a script an element ships (a Python file with no .py suffix) as a module, to unit-test its functions."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ELEMENTS = Path(__file__).resolve().parents[1] / "elements"


def load_script(relpath: str, name: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name, str(ELEMENTS / relpath))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # no __pycache__ beside it: static/ is copied into every image, and a build must not depend on a test run
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module
