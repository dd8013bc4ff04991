"""The downtime probe: outage arithmetic, windows and the gate's probe check, the background loop, and real
requests on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from imageupdate.verify.checks import CheckResult, probe_check
from imageupdate.verify.probe import HOT_RATE, Endpoint, NodeProbe, Prober, ProbeWindow, ask, endpoints_for

EP = Endpoint("node0", "127.0.0.1", (8080,), "/health")


def test_outages_run_from_the_first_failure_to_the_next_success() -> None:
    p = NodeProbe(EP)
    for at, ok in [(0.0, True), (1.0, False), (1.1, False), (1.2, True), (2.0, False), (2.5, True), (3.0, False)]:
        p.record(at, ok)
    p.close(3.4)
    assert p.outages == [[1.0, 1.2], [2.0, 2.5], [3.0, 3.4]]
    assert p.downtime == pytest.approx(1.1) and p.requests == 7 and p.failures == 4
    assert p.to_dict()["target"] == "http://127.0.0.1:8080/health"


def test_a_node_always_up_has_no_downtime() -> None:
    p = NodeProbe(EP)
    p.record(0.0, True)
    p.close(1.0)
    assert p.downtime == 0 and p.outages == []


def test_the_prober_loop_records_what_ask_says() -> None:
    answers = iter([True, False, False, True] + [True] * 10_000)
    seen = threading.Event()

    async def fake_ask(ep: Endpoint) -> bool:
        ok = next(answers)
        seen.set()
        return ok

    prober = Prober([EP], interval=0.01, ask=fake_ask).start()
    seen.wait(5)
    while prober.probes["node0"].requests < 5:
        threading.Event().wait(0.01)
    probe = prober.stop()["node0"]
    assert probe.failures == 2 and len(probe.outages) == 1


def test_endpoints_come_from_the_first_service_with_ports() -> None:
    services = [{"name": "agent"}, {"name": "web", "ports": [8080, 8443], "health": "/health"}]
    assert endpoints_for(services, "n", "10.0.0.1") == Endpoint("n", "10.0.0.1", (8080, 8443), "/health")
    assert endpoints_for([{"name": "db", "ports": [5432]}], "n", "h") == Endpoint("n", "h", (5432,), None)
    assert endpoints_for([{"name": "x", "ports": [1], "health": "health"}], "n", "h") == Endpoint("n", "h", (1,))
    assert endpoints_for([{"name": "agent"}], "n", "h") is None


def test_services_that_say_probe_false_are_not_probed_from_outside() -> None:
    services = [{"name": "app", "ports": [8000], "health": "/health", "probe": False},
                {"name": "nginx", "ports": [80, 443], "health": "/"}, {"name": "db", "ports": [5432]}]
    assert endpoints_for(services, "n", "10.0.0.1") == Endpoint("n", "10.0.0.1", (80, 443), "/")
    assert endpoints_for([services[0], {"name": "db", "ports": [5432], "probe": False}], "n", "h") is None


def probed(*answers: tuple[float, bool]) -> NodeProbe:
    p = NodeProbe(EP)
    for at, ok in answers:
        p.record(at, ok)
    return p


def test_a_window_counts_the_requests_made_in_it_and_those_that_failed() -> None:
    # up every 0.1 s from 0 to 1, down from 1.1 to 3, up again from 3.1 to 4
    p = probed(*[(i / 10, not 11 <= i <= 30) for i in range(41)])
    assert p.window(0.0, 4.0) == ProbeWindow(0.0, 4.0, 41, 20)
    assert p.window(1.1, 3.0) == ProbeWindow(1.1, 3.0, 20, 20) and not p.window(1.1, 3.0).any_ok
    assert p.window(1.5, 2.5) == ProbeWindow(1.5, 2.5, 11, 11)
    w = p.window(0.95, 1.35)  # the end of a run of successes, the start of the outage
    assert (w.requests, w.failures, w.any_ok) == (4, 3, True)
    assert p.window(5.0, 6.0) == ProbeWindow(5.0, 6.0, 0, 0) and len(p.runs) == 3


def test_the_gate_fails_when_the_probe_saw_the_service_down_for_all_of_it() -> None:
    p = probed(*[(10 + i * 0.3, False) for i in range(42)])
    assert probe_check(p, 10.0, 22.3) == CheckResult(
        "probe", False, 0.0, "probe: http://127.0.0.1:8080/health was down for the whole gate (42 of 42 requests "
                             "failed over 12.3 s)")


def test_the_gate_passes_with_the_figures_otherwise() -> None:
    p = probed((10.0, False), (10.5, False), (11.0, True), (11.5, True))
    assert probe_check(p, 10.0, 12.0) == CheckResult(
        "probe", True, 0.0, "probe: http://127.0.0.1:8080/health answered 2 of 4 requests over 2.0 s (2 failed)")
    assert probe_check(p, 11.0, 12.0) == CheckResult(
        "probe", True, 0.0, "probe: http://127.0.0.1:8080/health answered 2 of 2 requests over 1.0 s")
    assert probe_check(p, 10.0, 10.6) == CheckResult(
        "probe", True, 0.0, "probe: http://127.0.0.1:8080/health failed 2 of 2 requests over 0.6 s: too few to judge")
    assert probe_check(p, 20.0, 21.0) == CheckResult(
        "probe", True, 0.0, "probe: http://127.0.0.1:8080/health was not asked during the gate (1.0 s)")
    assert probe_check(None, 10.0, 12.0) is None


@pytest.fixture
def server() -> Iterator[tuple[int, list[int]]]:
    codes = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(codes[0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd.server_address[1], codes
    httpd.shutdown()
    httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def asked(ep: Endpoint) -> bool:
    return asyncio.run(ask(ep))


def test_ask_over_http_and_tcp_on_loopback(server: tuple[int, list[int]]) -> None:
    port, codes = server
    assert asked(Endpoint("n", "127.0.0.1", (port,), "/health"))
    assert asked(Endpoint("n", "127.0.0.1", (port,)))
    codes[0] = 503
    assert not asked(Endpoint("n", "127.0.0.1", (port,), "/health"))
    closed = free_port()
    assert not asked(Endpoint("n", "127.0.0.1", (closed,), "/health"))
    assert not asked(Endpoint("n", "127.0.0.1", (port, closed)))


def test_a_server_that_never_answers_is_a_failed_request_after_the_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepts the connection and never says a word
        ep = Endpoint("n", "127.0.0.1", (s.getsockname()[1],), "/health")
        assert not asyncio.run(ask(ep, timeout=0.2))


def test_one_thread_probes_every_node_and_nodes_out_of_focus_less_often() -> None:
    endpoints = [Endpoint(f"node{i}", "10.0.0.1", (1,)) for i in range(100)]
    counts: dict[str, int] = {}

    async def fake_ask(ep: Endpoint) -> bool:
        counts[ep.node] = counts.get(ep.node, 0) + 1
        return True

    before = threading.active_count()
    prober = Prober(endpoints, interval=0.05, ask=fake_ask, cold_interval=10.0)
    assert prober.interval_of("node0") == 100 / HOT_RATE  # 100 nodes in focus: at most HOT_RATE a second
    prober.focus(["node0", "node1"])
    assert prober.interval_of("node0") == 0.05 and prober.interval_of("node5") == 10.0
    prober.start()
    try:
        assert threading.active_count() == before + 1
        threading.Event().wait(0.5)
    finally:
        probes = prober.stop()
    assert counts["node0"] >= 5 and counts["node1"] >= 5
    assert all(counts[f"node{i}"] == 1 for i in range(2, 100))  # once at the start, then every 10 s
    assert all(p.requests == counts[n] or p.requests == counts[n] - 1 for n, p in probes.items())


def test_a_node_coming_into_focus_is_asked_often_at_once() -> None:
    counts = {"a": 0}

    async def fake_ask(ep: Endpoint) -> bool:
        counts["a"] += 1
        return True

    prober = Prober([Endpoint("a", "10.0.0.1", (1,))], interval=0.01, ask=fake_ask, cold_interval=60.0)
    prober.focus([])
    prober.start()
    try:
        threading.Event().wait(0.3)
        assert counts["a"] == 1
        prober.focus(["a"])
        threading.Event().wait(0.6)
    finally:
        prober.stop()
    assert counts["a"] >= 10


def test_an_ask_that_raises_is_a_failed_request() -> None:
    async def broken(ep: Endpoint) -> bool:
        raise RuntimeError("boom")

    prober = Prober([EP], interval=0.01, ask=broken).start()
    threading.Event().wait(0.1)
    probe = prober.stop()["node0"]
    assert probe.requests >= 1 and probe.failures == probe.requests


def test_a_run_that_changes_pace_is_split_so_windows_count_right() -> None:
    """Down while out of focus (asked every 4 s), then in focus (every 0.2 s): one evenly spaced run would
    put most of its requests before the gate; split, the gate's window counts its own."""
    p = probed(*[(float(t), False) for t in range(0, 20, 4)], *[(20 + i * 0.2, False) for i in range(1, 26)])
    assert len(p.runs) == 2
    assert p.window(20.1, 25.0) == ProbeWindow(20.1, 25.0, 25, 25)


def test_a_prober_stopped_before_its_loop_ran_records_nothing_after() -> None:
    async def fake_ask(ep: Endpoint) -> bool:
        return True

    prober = Prober([EP], interval=0.01, ask=fake_ask)
    prober._stopping.set()  # as if stop() came first
    prober.start()
    probes = prober.stop()
    threading.Event().wait(0.1)
    assert probes["node0"].requests == 0
