"""IMAGEUPDATE_BREAK=POINT kills this process at POINT: how the tests prove crash safety (like DIB's break=).

A point is a step name, optionally qualified: ``STEP`` (the first time any operation reaches it),
``KIND:STEP`` (only in an operation of that kind: ``rollout`` or ``rollback``) and ``STEP@NODE`` (only
for that node), or both (``rollback:before-signal@node1``).

Node rebuild steps: ``after-intent``, ``after-stop``, ``after-switch``, ``in-start`` (the node started,
its pid not recorded); ``migration:NAME`` as a state migration starts. Orchestrator steps, in order:
``after-start`` (the operation is recorded, nothing else done), ``after-rehearsal``, ``after-create-hooks``,
``before-update`` (the template is recorded, not sent), ``before-signal`` (a gate's verdict is known, not
signalled). ``in-freeze``: a node is frozen for the rehearsal's copy.
"""

from __future__ import annotations

import os
import signal


def crashpoint(step: str, kind: str | None = None, node: str | None = None) -> None:
    wanted = os.environ.get("IMAGEUPDATE_BREAK")
    if not wanted:
        return
    names = {step}
    if node is not None:
        names.add(f"{step}@{node}")
    if kind is not None:
        names |= {f"{kind}:{n}" for n in names}
    if wanted in names:
        os.kill(os.getpid(), signal.SIGKILL)
