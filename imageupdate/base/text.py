"""Text that came from elsewhere (a check, a command, a guest's console), cut down to what a person reads."""

from __future__ import annotations

import re


def last_line(text: str, default: str = "") -> str:
    """The last line of what a check or command said (its conclusion), or ``default`` if it said nothing."""
    return text.strip().splitlines()[-1] if text.strip() else default



def tail_of(console: str, lines: int = 3, width: int = 160) -> str:
    """What a node that did not boot said last (a kernel panic, a missing root), as one line. The guest wrote
    it: bounded, control characters and escape sequences dropped. A kernel panic's own line is kept though a
    stack trace came after it."""
    text = _ESCAPES.sub("", console[-8192:])
    kept = [line for line in ("".join(c for c in raw_line if c.isprintable()).strip()[:width]
                              for raw_line in text.splitlines()) if line]
    last = kept[-lines:]
    panics = [line for line in kept if "Kernel panic" in line]
    if panics and panics[-1] not in last:  # its stack trace follows: the reason first, then how it ended
        last = [panics[-1], *last[-(lines - 1):]] if lines > 1 else [panics[-1]]
    return " | ".join(last)


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b.")
