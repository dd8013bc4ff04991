"""IMAGEUPDATE_BREAK=STEP kills this process at STEP: how the tests prove crash safety (like DIB's break=).

Steps: ``after-intent``, ``after-stop``, ``after-switch`` (a node rebuild), ``before-signal`` (the
orchestrator has a gate's verdict and has not signalled it yet), ``before-update`` (the orchestrator has
recorded the template it is about to send and has not sent it).
"""

from __future__ import annotations

import os
import signal


def crashpoint(step: str) -> None:
    if os.environ.get("IMAGEUPDATE_BREAK") == step:
        os.kill(os.getpid(), signal.SIGKILL)
