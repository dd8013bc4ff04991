"""Which elements a build uses and where DIB finds them.

``ELEMENTS_PATH`` is imageupdate's own ``elements/`` first, then the
operator's ``--elements-path`` directories in the order given; DIB adds its
own elements after those. Names are checked here, before DIB starts, so an
unknown element is a clear error (exit 2) and not a failed build.
DIB expands dependencies itself; the build reads the expanded list from its
log rather than reimplementing DIB's resolver.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base.datadirs import elements_dir
from imageupdate.base.errors import ElementsPathMissing, UnknownElement

NODE_ELEMENT = "imageupdate-node"
DEFAULT_OS_ELEMENT = "imageupdate-debian-slim"
MACHINE_OS_ELEMENT = "imageupdate-debian-machine"
MACHINE_MARKER = "machine-image"  # an empty file in an element's directory: the release boots a kernel


def dib_elements_dir() -> Path | None:
    """DIB's bundled elements (located, not imported)."""
    spec = importlib.util.find_spec("diskimage_builder")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "elements"
    return path if path.is_dir() else None


@dataclass(frozen=True)
class ElementSelection:
    os_element: str
    elements: tuple[str, ...]
    search_path: tuple[Path, ...]  # what goes into ELEMENTS_PATH
    machine: bool = False  # a requested element carries MACHINE_MARKER: DIB also writes qcow2, kernel, initrd

    @property
    def requested(self) -> list[str]:
        """What DIB is asked to build, in order, without duplicates."""
        out: list[str] = []
        for name in (self.os_element, NODE_ELEMENT, *self.elements):
            if name not in out:
                out.append(name)
        return out

    @property
    def elements_path(self) -> str:
        return ":".join(str(p) for p in self.search_path)


def select(
    elements: list[str],
    extra_paths: list[Path],
    os_element: str = DEFAULT_OS_ELEMENT,
) -> ElementSelection:
    paths: list[Path] = [elements_dir()]
    for p in extra_paths:
        if not p.is_dir():
            raise ElementsPathMissing(
                f"elements path {p} does not exist or is not a directory; "
                "pass an existing directory to --elements-path"
            )
        paths.append(p.resolve())
    lookup = list(paths)
    bundled = dib_elements_dir()
    if bundled is not None:
        lookup.append(bundled)
    selection = ElementSelection(os_element, tuple(elements), tuple(paths))
    machine = False
    for name in selection.requested:
        found = [d / name for d in lookup if name and "/" not in name and (d / name).is_dir()]
        if not found:
            where = ", ".join(str(d) for d in lookup)
            raise UnknownElement(
                f"unknown element {name!r}: not found in {where}; "
                "check the name or add its directory with --elements-path",
                step="elements",
            )
        machine = machine or (found[0] / MACHINE_MARKER).is_file()  # the first on the path is what DIB uses
    return ElementSelection(os_element, tuple(elements), tuple(paths), machine)
