"""What an operation is given and what it ends with: options, events, outcomes, and their errors."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from imageupdate.base.errors import InputError, OperationError
from imageupdate.history.db import RolloutRow
from imageupdate.verify.probe import DEFAULT_INTERVAL
from imageupdate.verify.resources import DEFAULT_TIMEOUT as HOOK_TIMEOUT

CANCELLED = "cancelled by operator"
DEFAULT_GATE_TIMEOUT = 600
MAX_GATE_TIMEOUT = 24 * 3600  # Heat keeps a whole update under one timeout: a day per gate is plenty
MAX_HOOK_TIMEOUT = 24 * 3600
MAX_BATCH = 10_000
OPTIONS_VERSION = 2  # 1: before the history recorded a version (same fields, fewer of them)


class RolloutInterrupted(InputError):
    """An earlier operation is paused or was interrupted: resume or cancel it first."""


class NothingToResume(InputError):
    pass


class HeatLost(OperationError):
    """Heat stopped answering while an operation ran; the operation stays open for ``resume``."""


@dataclass
class RolloutOptions:
    batch_size: int = 1
    canary: bool = False
    limit: list[str] | None = None
    pause_between_batches: bool = False
    gate_timeout: int = DEFAULT_GATE_TIMEOUT
    rollback: bool = True
    resources: str | None = None  # the operator's resource hooks directory
    keep_resources: bool = False
    hook_timeout: float = HOOK_TIMEOUT
    probe: bool = True
    probe_interval: float = DEFAULT_INTERVAL
    rehearse: bool = True  # run the state migrations on a copy of the first node's state before anything

    def validate(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise InputError(f"--batch-size must be at least 1, not {self.batch_size}" if self.batch_size < 1
                             else f"--batch-size must be at most {MAX_BATCH}, not {self.batch_size}")
        if self.gate_timeout < 1:
            raise InputError(f"--gate-timeout must be at least 1 second, not {self.gate_timeout}")
        if self.gate_timeout > MAX_GATE_TIMEOUT:
            raise InputError(f"--gate-timeout must be at most {MAX_GATE_TIMEOUT} seconds (a day), "
                             f"not {self.gate_timeout}")
        if not self.hook_timeout > 0:  # written so that NaN is refused too
            raise InputError(f"--hook-timeout must be above 0 seconds, not {self.hook_timeout:g}")
        if self.hook_timeout > MAX_HOOK_TIMEOUT:
            raise InputError(f"--hook-timeout must be at most {MAX_HOOK_TIMEOUT} seconds, not {self.hook_timeout:g}")
        if not 0.01 <= self.probe_interval <= 10:
            raise InputError(f"--probe-interval must be between 0.01 and 10 seconds, not {self.probe_interval:g}")

    def to_stored(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_stored(cls, stored: dict[str, Any], version: int = 1) -> RolloutOptions:
        """The options an operation was started with, as its history row keeps them: fields a later
        imageupdate added take their defaults, fields it dropped are ignored, wrong types fall back."""
        defaults = cls()
        kept: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in stored:
                continue
            value, default = stored[f.name], getattr(defaults, f.name)
            if f.name == "limit":
                ok = value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            elif f.name == "resources":
                ok = value is None or isinstance(value, str)
            elif isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = True
            if ok:
                kept[f.name] = value
        return cls(**kept)


@dataclass(frozen=True)
class RolloutEvent:
    rollout: int
    node: str | None
    what: str  # plan | rebuild | rebuilt | checking | checked | passed | failed | paused | finished | info
    message: str
    at: float = field(default_factory=time.time)


@dataclass
class Outcome:
    rollout: RolloutRow
    status: str  # succeeded | failed | rolled-back | paused | cancelled | nothing-to-do
    reason: str | None
    nodes: dict[str, str]  # the release each node runs at the end
    rollback: Outcome | None = None
    resources: str | None = None  # what became of the operator's resources, if there were hooks
    resources_ok: bool = True
    next: str | None = None  # what the operator runs next, when the fleet is left mixed

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "paused", "nothing-to-do") and self.resources_ok

    def to_dict(self) -> dict[str, Any]:
        return {"rollout": self.rollout.to_dict(), "status": self.status, "reason": self.reason,
                "nodes": self.nodes, "rollback": self.rollback.to_dict() if self.rollback else None,
                "resources": self.resources, "next": self.next}
