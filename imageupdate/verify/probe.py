"""A continuous probe of the workload during a rollout: per node, how long its service was unavailable.

One thread per probed node sends a request every ``interval`` seconds: an HTTP GET of the service's
declared ``health`` path on its first port, or a TCP connect to each declared port when it declares no
health path. A request that fails (refused, reset, timed out, not 2xx) opens an outage; the next success
closes it. A node's downtime is the sum of its outages, each from the start of its first failed request
to the start of the first successful one after it (exact to one interval). Outages still open when the
probe stops are closed at that moment.

The gate asks a probe about its own window (``NodeProbe.window``): how many requests were made and
failed between two instants and whether any succeeded. A probe keeps runs, not requests: consecutive
requests with the same outcome are one run (first and last instant, count), so memory grows with the
number of outages, not with the rollout's length; requests inside a run are counted as evenly spaced,
exact to one interval at the window's edges.

Only services whose declaration leaves ``probe`` true are asked from outside: one bound to loopback
(an app behind nginx) cannot answer there, and the gate checks it from inside the node instead.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from math import ceil, floor
from typing import Any

DEFAULT_INTERVAL = 0.05
REQUEST_TIMEOUT = 0.5


@dataclass(frozen=True)
class Endpoint:
    """How to ask one node whether its workload serves."""

    node: str
    address: str
    ports: tuple[int, ...]
    health: str | None = None  # HTTP path on ports[0]; None: TCP connect to every port

    def describe(self) -> str:
        if self.health:
            return f"http://{self.address}:{self.ports[0]}{self.health}"
        return " ".join(f"tcp://{self.address}:{p}" for p in self.ports)


def endpoints_for(services: list[dict[str, Any]], node: str, address: str) -> Endpoint | None:
    """The endpoint to probe from a release's declared services: the first with ports that does not say
    ``"probe": false``."""
    for svc in services:
        ports = tuple(int(p) for p in svc.get("ports", []))
        if ports and not svc.get("invalid") and svc.get("probe", True) is not False:
            health = svc.get("health")
            return Endpoint(node, address, ports, health if isinstance(health, str) and health.startswith("/")
                            else None)
    return None


def ask(ep: Endpoint, timeout: float = REQUEST_TIMEOUT) -> bool:
    try:
        if ep.health:
            conn = http.client.HTTPConnection(ep.address, ep.ports[0], timeout=timeout)
            try:
                conn.request("GET", ep.health, headers={"Connection": "close"})
                return 200 <= conn.getresponse().status < 300
            finally:
                conn.close()
        for port in ep.ports:
            with socket.create_connection((ep.address, port), timeout=timeout):
                pass
        return True
    except (OSError, http.client.HTTPException):
        return False


@dataclass(frozen=True)
class ProbeWindow:
    """What a probe saw between ``since`` and ``until``."""

    since: float
    until: float
    requests: int
    failures: int

    @property
    def any_ok(self) -> bool:
        return self.requests > self.failures

    @property
    def seconds(self) -> float:
        return round(self.until - self.since, 3)


@dataclass
class NodeProbe:
    endpoint: Endpoint
    requests: int = 0
    failures: int = 0
    outages: list[list[float]] = field(default_factory=list)  # [start, end]; end None while open
    _open: float | None = None
    # [first, last, ok, count]: consecutive requests with one outcome (for windows: see the module doc)
    runs: list[list[Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, at: float, ok: bool) -> None:
        with self._lock:
            self.requests += 1
            if self.runs and self.runs[-1][2] == ok:
                self.runs[-1][1] = at
                self.runs[-1][3] += 1
            else:
                self.runs.append([at, at, ok, 1])
            if ok:
                if self._open is not None:
                    self.outages.append([self._open, at])
                    self._open = None
            else:
                self.failures += 1
                if self._open is None:
                    self._open = at

    def close(self, at: float) -> None:
        with self._lock:
            if self._open is not None:
                self.outages.append([self._open, at])
                self._open = None

    def window(self, since: float, until: float) -> ProbeWindow:
        """How many requests started in [since, until], and how many of them failed."""
        requests = failures = 0
        with self._lock:
            runs = [list(r) for r in self.runs]
        for first, last, ok, count in runs:
            if last < since or first > until:
                continue
            if count == 1 or (first >= since and last <= until):
                n = count
            else:  # evenly spaced: the k-th request of the run started at first + k * step
                step = (last - first) / (count - 1)
                lo = max(0, ceil((since - first) / step - 1e-9)) if step else 0
                hi = min(count - 1, floor((until - first) / step + 1e-9)) if step else count - 1
                n = max(0, hi - lo + 1)
            requests += n
            failures += 0 if ok else n
        return ProbeWindow(since, until, requests, failures)

    @property
    def downtime(self) -> float:
        return round(sum(end - start for start, end in self.outages), 3)

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.endpoint.node, "target": self.endpoint.describe(), "requests": self.requests,
                "failures": self.failures, "downtime": self.downtime,
                "outages": [[round(a, 3), round(b, 3)] for a, b in self.outages]}


class Prober:
    """Probes endpoints in background threads from ``start()`` to ``stop()``."""

    def __init__(self, endpoints: list[Endpoint], interval: float = DEFAULT_INTERVAL,
                 ask: Callable[[Endpoint], bool] = ask, clock: Callable[[], float] = time.time) -> None:
        self.interval = interval
        self.ask = ask
        self.clock = clock
        self.probes = {ep.node: NodeProbe(ep) for ep in endpoints}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started: float | None = None

    def start(self) -> Prober:
        self.started = self.clock()
        for probe in self.probes.values():
            t = threading.Thread(target=self._loop, args=(probe,), name=f"probe-{probe.endpoint.node}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _loop(self, probe: NodeProbe) -> None:
        while not self._stop.is_set():
            at = self.clock()
            ok = self.ask(probe.endpoint)
            probe.record(at, ok)
            self._stop.wait(max(0.0, self.interval - (self.clock() - at)))

    def stop(self) -> dict[str, NodeProbe]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=REQUEST_TIMEOUT * 4)
        now = self.clock()
        for probe in self.probes.values():
            probe.close(now)
        return self.probes
