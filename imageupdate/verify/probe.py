"""A continuous probe of the workload during a rollout: per node, how long its service was unavailable.

One event loop in one thread probes every node (a task each, not a thread each): an HTTP GET of the
service's declared ``health`` path on its first port, or a TCP connect to each declared port when it
declares no health path. Nodes in ``focus`` (those the operation is changing now; all of them until the
watch says otherwise) are asked every ``interval`` seconds; the rest, which nothing is changing, every
``cold_interval`` (an outage there is still seen, to that precision). Both stretch so that the whole
probe makes at most ``HOT_RATE`` and ``COLD_RATE`` requests a second: a batch of 20 is probed every 0.2 s,
200 nodes at rest every 4 s, and a 200-node fleet costs the probe what a 20-node one does.

A request that fails (refused, reset, timed out, not 2xx) opens an outage; the next success closes it. A
node's downtime is the sum of its outages, each from the start of its first failed request to the start of
the first successful one after it (exact to one interval). Outages still open when the probe stops are
closed at that moment.

The gate asks a probe about its own window (``NodeProbe.window``): how many requests were made and
failed between two instants and whether any succeeded. A probe keeps runs, not requests: consecutive
requests with the same outcome are one run (first and last instant, count), so memory grows with the
number of outages, not with the rollout's length; requests inside a run are counted as evenly spaced,
exact to one interval at the window's edges.

Only services whose declaration leaves ``probe`` true are asked from outside: one bound to loopback
(an app behind nginx) cannot answer there, and the gate checks it from inside the node instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from math import ceil, floor
from typing import Any

DEFAULT_INTERVAL = 0.05
COLD_INTERVAL = 1.0  # seconds between requests to a node out of focus, at least
HOT_RATE = 100.0  # requests a second to the nodes in focus, together, at most
COLD_RATE = 50.0  # requests a second to the nodes out of focus, together, at most
REQUEST_TIMEOUT = 0.5
WAKE = 0.25  # a node waiting out a long interval looks this often whether it came into focus


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


async def ask(ep: Endpoint, timeout: float = REQUEST_TIMEOUT) -> bool:
    """Whether the node's workload answers: a 2xx to ``GET health`` on the first port, or every port
    accepting a connection. On bare non-blocking sockets: asyncio's streams cost twice the CPU per request,
    and the probe makes hundreds a second."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in ep.address else socket.AF_INET
    try:
        async with asyncio.timeout(timeout):
            for port in ep.ports[:1] if ep.health else ep.ports:
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, (ep.address, port))
                    if not ep.health:
                        continue
                    host = f"[{ep.address}]" if family == socket.AF_INET6 else ep.address
                    await loop.sock_sendall(sock, f"GET {ep.health} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                                                  "Connection: close\r\n\r\n".encode())
                    head = b""
                    while b"\r\n" not in head and len(head) < 1024:
                        chunk = await loop.sock_recv(sock, 1024)
                        if not chunk:
                            break
                        head += chunk
                    status = head.split(b"\r\n", 1)[0].split()
                    return len(status) >= 2 and status[0].startswith(b"HTTP/") and status[1].isdigit() \
                        and 200 <= int(status[1]) < 300
            return True
    except (OSError, TimeoutError, ValueError):
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
            if self.runs and self.runs[-1][2] == ok and self._same_pace(self.runs[-1], at):
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

    @staticmethod
    def _same_pace(run: list[Any], at: float) -> bool:
        """Whether a request at ``at`` keeps the run evenly spaced: a node coming into focus (or leaving it) is
        asked twenty times as often (or as rarely), and a run that spans both would miscount a window."""
        first, last, _, count = run
        if count < 2:
            return True
        step = (last - first) / (count - 1)
        gap = at - last
        return bool(step / 5 - 0.01 <= gap <= step * 5 + 0.05)  # jitter under load is not a new pace

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
    """Probes endpoints from ``start()`` to ``stop()``, in one background thread."""

    def __init__(self, endpoints: list[Endpoint], interval: float = DEFAULT_INTERVAL,
                 ask: Callable[[Endpoint], Awaitable[bool]] = ask, clock: Callable[[], float] = time.time,
                 cold_interval: float = COLD_INTERVAL) -> None:
        self.interval = interval
        self.cold_interval = max(interval, cold_interval)
        self.ask = ask
        self.clock = clock
        self.probes = {ep.node: NodeProbe(ep) for ep in endpoints}
        self._focus: frozenset[str] | None = None  # None: every node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()  # set by stop(): no request starts or is recorded after it
        self.started: float | None = None

    def focus(self, nodes: Iterable[str]) -> None:
        """The nodes the operation is changing now: asked every ``interval``, the rest less often."""
        self._focus = frozenset(nodes)

    def interval_of(self, node: str) -> float:
        focus = self._focus
        if focus is None or node in focus:
            hot = len(self.probes) if focus is None else len(focus & self.probes.keys())
            return max(self.interval, hot / HOT_RATE)
        cold = len(self.probes) - len(focus & self.probes.keys())
        return max(self.cold_interval, cold / COLD_RATE)

    def start(self) -> Prober:
        self.started = self.clock()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._main = loop.create_task(self._all())
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._main)
        finally:
            loop.close()

    async def _all(self) -> None:
        await asyncio.gather(*(self._node(p) for p in self.probes.values()))

    async def _node(self, probe: NodeProbe) -> None:
        node = probe.endpoint.node
        while not self._stopping.is_set():
            at = self.clock()
            began = time.monotonic()
            try:
                ok = await self.ask(probe.endpoint)
            except Exception:  # noqa: BLE001 - an ask that breaks is a failed request, not a dead probe
                ok = False
            if self._stopping.is_set():
                return
            probe.record(at, ok)
            while (left := began + self.interval_of(node) - time.monotonic()) > 0 and not self._stopping.is_set():
                await asyncio.sleep(min(left, WAKE))

    def stop(self) -> dict[str, NodeProbe]:
        self._stopping.set()  # a loop that started late stops at its first step
        if self._thread is not None:
            self._ready.wait(10)
        if self._loop is not None and self._main is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._main.cancel)
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT * 4)
        now = self.clock()
        for probe in self.probes.values():
            probe.close(now)
        return self.probes
