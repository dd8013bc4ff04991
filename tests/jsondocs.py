"""Compare two --json documents of one command run twice (two front doors, or two runs of one)."""
from __future__ import annotations

import re
from typing import Any

# what differs between two runs besides every float (times and durations): ids, stack ids, tags, pids
VOLATILE = re.compile(r"^(id|parent|rollout|stack_id|tag|pid)$")


def normalised(doc: Any) -> Any:
    """``doc`` with what differs between two runs (ids, times, durations) replaced by ``"*"``."""
    if isinstance(doc, dict):
        return {k: ("*" if VOLATILE.match(k) and not isinstance(v, (dict, list)) else normalised(v))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [normalised(v) for v in doc]
    return "*" if isinstance(doc, float) else doc
