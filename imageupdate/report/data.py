"""Everything a report shows about one operation, gathered from the history as one JSON-able document.

A rollout that failed and was rolled back is reported together with its rollback (the rollback's steps,
checks and probes follow the rollout's), so one page tells the whole story.
"""

from __future__ import annotations

from typing import Any

from imageupdate.base.errors import InputError
from imageupdate.history.db import History, RolloutRow


class UnknownRollout(InputError):
    """A report for a rollout id the history does not hold."""


def pick(history: History, rid: int | None) -> RolloutRow:
    if rid is not None:
        row = history.rollout(rid)
        if row is None:
            newest = history.rollouts(1)
            hint = f"the newest is {newest[0].id}" if newest else "the history holds none yet"
            raise UnknownRollout(f"no rollout {rid} in {history.path} ({hint}; see 'imageupdate status')")
        return row
    for row in history.rollouts(200):
        if row.kind == "rollback" and row.parent is not None:  # the rollout it undid tells the whole story
            return history.rollout(row.parent) or row
        if row.kind in ("rollout", "rollback"):
            return row
    raise UnknownRollout(f"no rollout in {history.path} yet: run 'imageupdate rollout RELEASE' first")


def _node(node: str, from_release: str | None, to_release: str | None) -> dict[str, Any]:
    return {"node": node, "from": from_release, "to": to_release, "rebuild": None, "gate": None, "verdict": None,
            "checks": [], "probe": None}


def _operation(history: History, row: RolloutRow) -> dict[str, Any]:
    steps = [s.to_dict() for s in history.steps(row.id)]
    checks = history.checks(row.id)
    nodes = {node: _node(node, row.plan["before"].get(node), row.plan["after"].get(node))
             for node in (n for b in row.plan.get("batches", []) for n in b)}
    for s in steps:
        entry = nodes.setdefault(s["node"], _node(s["node"], s["from_release"], s["to_release"]))
        entry[s["step"]] = {k: s[k] for k in ("status", "started", "finished", "seconds", "reason")}
        if s["step"] == "rebuild" and s["data"]:
            entry["rebuild"]["phases"] = s["data"].get("phases")
        if s["step"] == "gate" and s["data"]:
            entry["verdict"] = {k: s["data"].get(k) for k in ("ok", "reason", "started", "finished")}
    for c in checks:
        if c["node"] in nodes:
            nodes[c["node"]]["checks"].append({k: c[k] for k in ("name", "seconds", "output", "at")}
                                              | {"ok": bool(c["ok"])})
    for p in history.probes(row.id):
        if p["node"] in nodes:
            prev = nodes[p["node"]]["probe"]
            if prev is None:
                nodes[p["node"]]["probe"] = {k: p[k] for k in ("target", "requests", "failures", "downtime",
                                                               "outages", "started", "finished")}
            else:  # a resumed operation probes again: add up
                for k in ("requests", "failures"):
                    prev[k] += p[k]
                prev["downtime"] = round(prev["downtime"] + p["downtime"], 3)
                prev["outages"] += p["outages"]
                prev["finished"] = p["finished"]
    hooks = [{k: h[k] for k in ("script", "phase", "node", "started", "seconds", "output")} | {"ok": bool(h["ok"])}
             for h in history.hooks(row.id)]
    migrations = [{k: m[k] for k in ("node", "phase", "release", "migration", "kind", "state_version", "started",
                                     "seconds", "output")} | {"ok": None if m["ok"] is None else bool(m["ok"])}
                  for m in history.migrations(row.id)]
    return {"rollout": row.to_dict(), "nodes": list(nodes.values()), "hooks": hooks, "migrations": migrations,
            "log": [{k: e[k] for k in ("at", "node", "message")} for e in history.log(row.id)]}


def collect(history: History, rid: int | None, site: str | None = None) -> dict[str, Any]:
    row = pick(history, rid)
    doc = _operation(history, row)
    doc["site"] = site
    rollbacks = [r for r in history.rollouts(200) if r.kind == "rollback" and r.parent == row.id]
    doc["rollback"] = _operation(history, sorted(rollbacks, key=lambda r: r.id)[0]) if rollbacks else None
    downs = [n["probe"]["downtime"] for n in doc["nodes"] if n["probe"]]
    failed = [c | {"node": n["node"]} for n in doc["nodes"] for c in n["checks"] if not c["ok"]]
    doc["summary"] = {
        "status": row.status, "reason": row.reason,
        "nodes": len(doc["nodes"]),
        "seconds": (row.finished - row.started) if row.finished else None,
        "downtime_total": round(sum(downs), 3) if downs else None,
        "downtime_max": max(downs) if downs else None,
        "failed_checks": [{"node": c["node"], "name": c["name"], "output": c["output"]} for c in failed],
    }
    return doc
