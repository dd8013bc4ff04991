"""One self-contained HTML page for a rollout: no scripts, no external files, readable offline.

Sections: a summary (status, reason, downtime), per node a timeline (stop, state migrations, boot, checks,
gate, and the probe's outages drawn over them), the state migrations (rehearsal, snapshot, steps, restore),
the checks of each node with their output (failed ones first and open), the resource hooks, the rollback if
there was one, and the log.
"""

from __future__ import annotations

import os
import time
from html import escape
from pathlib import Path
from typing import Any

from imageupdate.base.text import last_line

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em;margin:0 0 .3em} h2{font-size:1.2em;margin:1.6em 0 .4em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.4em 0 1em;width:100%} td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#f4f4f4}
.ok{color:#17692e;font-weight:600} .fail{color:#b3261e;font-weight:600} .muted{color:#777}
.status{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff}
.status.ok{background:#17692e;color:#fff} .status.fail{background:#b3261e;color:#fff}
pre{background:#f7f7f7;padding:6px;margin:0;white-space:pre-wrap;max-height:16em;overflow:auto;font-size:12px}
.legend span{display:inline-block;margin-right:1.2em} .sw{display:inline-block;width:12px;height:10px;
margin-right:4px;vertical-align:middle}
svg text{font:11px system-ui,sans-serif}
"""
COLOURS = {"stop": "#9e9e9e", "migrate": "#7b3fb5", "boot": "#1e6fd9", "checks": "#e0a100", "gate": "#17692e",
           "gate-failed": "#b3261e", "down": "#b3261e"}


def _t(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int((at % 1) * 10)}" if at else "-"


def _secs(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f} s"


def _ok(ok: bool | None, yes: str = "passed", no: str = "failed") -> str:
    if ok is None:
        return '<span class="muted">-</span>'
    return f'<span class="ok">{yes}</span>' if ok else f'<span class="fail">{no}</span>'


def _segments(n: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(kind, start, end) bars of one node's timeline."""
    segs: list[tuple[str, float, float]] = []
    rb, gate, verdict = n.get("rebuild") or {}, n.get("gate") or {}, n.get("verdict") or {}
    phases = rb.get("phases") or {}
    begun = phases.get("begun") or rb.get("started")
    if begun and phases.get("switched") and phases.get("migrated") and phases.get("stopped"):
        segs.append(("stop", begun, phases["stopped"]))
        segs.append(("migrate", phases["stopped"], phases["switched"]))
        segs.append(("boot", float(phases["switched"]), float(phases.get("ready") or phases["switched"])))
    elif begun and phases.get("switched"):
        segs.append(("stop", begun, phases["switched"]))
        ready = phases.get("ready") or rb.get("finished") or phases["switched"]
        segs.append(("boot", float(phases["switched"]), float(ready)))
    elif rb.get("started") and rb.get("finished"):
        segs.append(("boot", rb["started"], rb["finished"]))
    c0 = verdict.get("started") or gate.get("started")
    c1 = verdict.get("finished")
    if c0 and c1:
        segs.append(("checks", float(c0), float(c1)))
    gate_from = c1 or c0
    if gate.get("finished") and gate_from:
        segs.append(("gate" if gate.get("status") == "succeeded" else "gate-failed", float(gate_from),
                     float(gate["finished"])))
    return [(k, a, max(a, b)) for k, a, b in segs]


def _timeline(nodes: list[dict[str, Any]], title: str) -> str:
    rows = [(n, _segments(n), (n.get("probe") or {}).get("outages") or []) for n in nodes]
    times = [t for _, segs, outs in rows for s in segs for t in s[1:]] + \
            [t for _, _, outs in rows for o in outs for t in o]
    if not times:
        return '<p class="muted">no timings recorded</p>'
    t0, t1 = min(times), max(times)
    span = max(t1 - t0, 0.001)
    left, width, row_h = 90, 1000, 26
    height = 30 + row_h * len(rows)

    def x(t: float) -> float:
        return float(left + (t - t0) / span * width)
    parts = [f'<svg role="img" aria-label="{escape(title)}" width="{left + width + 20}" height="{height}" '
             f'viewBox="0 0 {left + width + 20} {height}">']
    for k in range(6):
        tx = left + k * width / 5
        parts.append(f'<line x1="{tx:.1f}" y1="14" x2="{tx:.1f}" y2="{height}" stroke="#eee"/>'
                     f'<text x="{tx:.1f}" y="11" text-anchor="middle">+{span * k / 5:.1f}s</text>')
    for i, (n, segs, outs) in enumerate(rows):
        y = 20 + i * row_h
        parts.append(f'<text x="4" y="{y + 14}">{escape(n["node"])}</text>')
        for kind, a, b in segs:
            parts.append(f'<rect class="seg {kind}" x="{x(a):.1f}" y="{y + 3}" width="{max(1.5, x(b) - x(a)):.1f}" '
                         f'height="14" fill="{COLOURS[kind]}"><title>{kind}: {b - a:.2f} s</title></rect>')
        for a, b in outs:
            parts.append(f'<rect class="seg down" x="{x(a):.1f}" y="{y + 18}" width="{max(1.5, x(b) - x(a)):.1f}" '
                         f'height="4" fill="{COLOURS["down"]}"><title>service down {b - a:.2f} s</title></rect>')
    parts.append("</svg>")
    legend = "".join(f'<span><i class="sw" style="background:{c}"></i>{k}</span>'
                     for k, c in COLOURS.items() if k != "gate-failed")
    return "".join(parts) + f'<div class="legend">{legend} (thin red line: the probe saw the service down)</div>'


def _probes(probe: dict[str, Any] | None) -> str:
    return f"{probe['failures']}/{probe['requests']}" if probe else "-"


def _node_table(nodes: list[dict[str, Any]]) -> str:
    out = ['<table class="nodes"><tr><th>node</th><th>from</th><th>to</th><th>rebuild</th><th>checks</th>'
           '<th>gate</th><th>downtime</th><th>probes failed</th><th>reason</th></tr>']
    for n in nodes:
        rb, gate, probe = n.get("rebuild") or {}, n.get("gate") or {}, n.get("probe")
        passed = sum(1 for c in n["checks"] if c["ok"])
        gate_ok = None if not gate else gate.get("status") == "succeeded"
        out.append(
            f'<tr data-node="{escape(n["node"])}"><td>{escape(n["node"])}</td><td>{escape(str(n["from"]))}</td>'
            f'<td>{escape(str(n["to"]))}</td><td>{escape(rb.get("status", "-"))} {_secs(rb.get("seconds"))}</td>'
            f'<td>{passed}/{len(n["checks"])}</td><td>{_ok(gate_ok, gate.get("status", ""), gate.get("status", ""))}'
            f'</td><td class="downtime">{_secs(probe["downtime"]) if probe else "-"}</td>'
            f'<td>{_probes(probe)}</td>'
            f'<td>{escape(gate.get("reason") or (n.get("verdict") or {}).get("reason") or "")}</td></tr>')
    out.append("</table>")
    return "".join(out)


def _checks(nodes: list[dict[str, Any]]) -> str:
    out = []
    for n in nodes:
        if not n["checks"]:
            continue
        out.append(f'<h3>{escape(n["node"])} on {escape(str(n["to"]))}</h3><table class="checks">'
                   '<tr><th>check</th><th>result</th><th>seconds</th><th>output</th></tr>')
        for c in sorted(n["checks"], key=lambda c: c["ok"]):  # failures first
            cls = "check failed" if not c["ok"] else "check passed"
            out.append(f'<tr class="{cls}"><td>{escape(c["name"])}</td><td>{_ok(c["ok"])}</td>'
                       f'<td>{c["seconds"]:.2f}</td><td><pre>{escape(c["output"] or "")}</pre></td></tr>')
        out.append("</table>")
    return "".join(out) or '<p class="muted">no checks ran</p>'


def _hooks(hooks: list[dict[str, Any]]) -> str:
    if not hooks:
        return '<p class="muted">no resource hooks</p>'
    out = ['<table class="hooks"><tr><th>at</th><th>script</th><th>phase</th><th>node</th><th>result</th>'
           '<th>seconds</th><th>output</th></tr>']
    for h in hooks:
        out.append(f'<tr><td>{_t(h["started"])}</td><td>{escape(h["script"])}</td><td>{escape(h["phase"])}</td>'
                   f'<td>{escape(h["node"] or "-")}</td><td>{_ok(h["ok"])}</td><td>{h["seconds"]:.2f}</td>'
                   f'<td><pre>{escape(h["output"] or "")}</pre></td></tr>')
    out.append("</table>")
    return "".join(out)


def _migrations(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">no state migrations</p>'
    out = ['<table class="migrations"><tr><th>at</th><th>node</th><th>phase</th><th>release</th><th>migration</th>'
           '<th>kind</th><th>state version</th><th>result</th><th>seconds</th><th>output</th></tr>']
    for m in rows:
        result = _ok(m["ok"], "done", "failed") if m["ok"] is not None else '<span class="fail">interrupted</span>'
        out.append(f'<tr><td>{_t(m["started"])}</td><td>{escape(m["node"])}</td><td>{escape(m["phase"])}</td>'
                   f'<td>{escape(m["release"] or "-")}</td><td>{escape(m["migration"] or "-")}</td>'
                   f'<td>{escape(m["kind"] or "-")}</td><td>{m["state_version"] if m["state_version"] else "-"}</td>'
                   f'<td>{result}</td><td>{_secs(m["seconds"])}</td><td><pre>{escape(m["output"] or "")}</pre></td>'
                   '</tr>')
    out.append("</table>")
    return "".join(out)


def _log(log: list[dict[str, Any]]) -> str:
    rows = "".join(f'<tr><td>{_t(e["at"])}</td><td>{escape(e["node"] or "")}</td><td>{escape(e["message"])}</td></tr>'
                   for e in log)
    return f'<table class="log"><tr><th>at</th><th>node</th><th>message</th></tr>{rows}</table>'


def _operation(op: dict[str, Any], heading: str) -> str:
    r = op["rollout"]
    title = f'{r["kind"]} {r["id"]}' + (f' to {r["target"]}' if r["target"] else " to the last good releases")
    ok = r["status"] in ("succeeded",)
    return (f'<section class="operation" id="op-{r["id"]}"><h2>{escape(heading)}: {escape(title)} '
            f'<span class="status {"ok" if ok else "fail"}">{escape(r["status"])}</span></h2>'
            + (f'<p class="reason">{escape(r["reason"])}</p>' if r["reason"] else "")
            + "<h3>Timeline</h3>" + _timeline(op["nodes"], f"timeline of {title}")
            + "<h3>Nodes</h3>" + _node_table(op["nodes"])
            + "<h3>State migrations</h3>" + _migrations(op.get("migrations") or [])
            + "<h3>Checks</h3>" + _checks(op["nodes"])
            + "<h3>Resource hooks</h3>" + _hooks(op["hooks"])
            + "<h3>Log</h3>" + _log(op["log"]) + "</section>")


def render_page(doc: dict[str, Any]) -> str:
    r, s = doc["rollout"], doc["summary"]
    title = f'imageupdate {r["kind"]} {r["id"]}' + (f' to {r["target"]}' if r["target"] else "")
    failed = "".join(f'<li class="failed-check"><b>{escape(c["node"])}</b>: {escape(c["name"])}: '
                     f'{escape(last_line(c["output"] or ""))}'
                     f'</li>' for c in s["failed_checks"])
    summary = (f'<table class="summary"><tr><th>status</th><td>{escape(s["status"])}</td></tr>'
               f'<tr><th>site</th><td>{escape(doc.get("site") or "-")}</td></tr>'
               f'<tr><th>started</th><td>{escape(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])))}'
               f'</td></tr><tr><th>took</th><td>{_secs(s["seconds"])}</td></tr>'
               f'<tr><th>nodes</th><td>{s["nodes"]}</td></tr>'
               f'<tr><th>downtime</th><td>total {_secs(s["downtime_total"])}, worst node {_secs(s["downtime_max"])}'
               f'</td></tr></table>')
    body = [f"<h1>{escape(title)}</h1>", summary]
    if failed:
        body.append(f'<h2>Failed checks</h2><ul class="failed-checks">{failed}</ul>')
    body.append(_operation(doc, "Operation"))
    if doc.get("rollback"):
        body.append(_operation(doc["rollback"], "Rollback"))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{CSS}</style></head><body>{"".join(body)}'
            f'<p class="muted">written by imageupdate at {escape(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>'
            "</body></html>\n")


def write_page(path: Path, html: str) -> Path:
    """Write atomically: a reader never sees half a page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path
