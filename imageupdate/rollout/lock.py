"""One operation per site: ``SITE/rollout.lock``, an flock(2) that records its owner (``OwnerLock``)."""

from __future__ import annotations

import time
from pathlib import Path

from imageupdate.base.errors import InputError
from imageupdate.base.locks import Owner, OwnerLock

__all__ = ["Owner", "RolloutInProgress", "RolloutLock"]


class RolloutInProgress(InputError):
    """Another imageupdate process is operating on the site's fleet."""


class RolloutLock(OwnerLock):
    def __init__(self, site: Path) -> None:
        super().__init__(Path(site) / "rollout.lock")

    def acquire(self, rollout: int | None = None) -> None:
        if self.try_acquire(rollout):
            return
        o = self.owner()
        who = f"process {o.pid} ('{o.command}', since {time.strftime('%H:%M:%S', time.localtime(o.since))})" \
            if o else "another process"
        raise RolloutInProgress(f"{who} is operating this site's fleet; wait for it, or stop it with "
                                "'imageupdate cancel'")

    def __enter__(self) -> RolloutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
