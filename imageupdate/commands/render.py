"""Human views of library results (rich renderables). No logic beyond layout."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from imageupdate.base.text import last_line
from imageupdate.build.builder import BuildResult
from imageupdate.commands.output import table
from imageupdate.images.diff import ReleaseDiff
from imageupdate.images.manifest import Manifest
from imageupdate.images.store import VerifyResult
from imageupdate.rollout.engine import Outcome
from imageupdate.rollout.path import FleetPlan
from imageupdate.rollout.status import FleetStatus
from imageupdate.site.node import NodeStatus
from imageupdate.site.site import SiteStatus
from imageupdate.upgrade.config import ConfigFinding
from imageupdate.upgrade.rehearse import Rehearsal
from imageupdate.verify.checks import Verdict


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def build_result(r: BuildResult) -> Group:
    root = r.manifest.artifacts["root.tar.zst"]
    return Group(
        Text(f"built {r.release} in {r.seconds:.1f}s (DIB {r.dib_seconds:.1f}s, packing {r.pack_seconds:.1f}s)"
             + (f" after {r.lock_wait_seconds:.1f}s waiting for the DIB cache lock" if r.lock_wait_seconds >= 0.05
                else "")),
        Text(f"  {r.path}"),
        Text(f"  root.tar.zst {_mib(root.size)}, sha256 {root.sha256}"),
        Text(f"  {len(r.manifest.packages)} packages, {r.manifest.files['count']} files, log {r.log}"),
    )


def release_list(manifests: list[Manifest], damaged: dict[str, str] | None = None) -> RenderableType:
    if not manifests and not damaged:
        return Text("no releases in the store; build one with 'imageupdate build RELEASE'")
    t = table("RELEASE", "BUILT", "ELEMENTS", "PACKAGES", "SIZE", "KERNEL")
    for m in manifests:
        root = m.artifacts.get("root.tar.zst")
        t.add_row(
            m.release,
            m.built_at,
            " ".join(e for e in m.elements if e != "imageupdate-node"),
            str(len(m.packages)),
            _mib(root.size) if root else "-",
            m.kernel or "-",
        )
    for r, why in (damaged or {}).items():
        t.add_row(r, "damaged", why, "", "", "")
    return t


def manifest(m: Manifest) -> Group:
    lines = [
        Text(f"release      {m.release}"),
        Text(f"built        {m.built_at} in {m.build_seconds:.1f}s with {m.dib_version}"),
        Text(f"elements     {' '.join(m.elements)}"),
        Text(f"kernel       {m.kernel or 'none'}"),
        Text(f"packages     {len(m.packages)}"),
        Text(f"files        {m.files.get('count', 0)} ({_mib(m.files.get('total_size', 0))})"),
        Text(f"state paths  {' '.join(m.state_paths) or 'none'}"),
        Text(f"services     {' '.join(s['name'] for s in m.services) or 'none'}"),
        Text(f"tests        {' '.join(t['name'] for t in m.tests) or 'none'}"),
        Text(f"migrations   {' '.join(x['name'] for x in m.migrations) or 'none'}"),
    ]
    up = m.upgrade
    if up:
        steps = ", ".join(f"{x['name']} ({x['kind']})" for x in up.get("migrations", [])) or "no migrations"
        lines.append(Text(f"upgrade      version {up['version']}, state version {up['state_version']}"
                          + (f", upgrades from {up['min_from']} or later" if up.get("min_from") else "")
                          + f"; {steps}"))
    else:
        lines.append(Text("upgrade      no upgrade metadata (a plain image swap)"))
    arts = table("ARTIFACT", "SIZE", "SHA256")
    for name, a in sorted(m.artifacts.items()):
        arts.add_row(name, _mib(a.size), a.sha256)
    return Group(*lines, Text(""), arts)


def diff(d: ReleaseDiff, max_paths: int = 3) -> Group:
    parts: list[RenderableType] = [Text(f"{d.old} -> {d.new}", style="bold")]
    pk = table("PACKAGE", "CHANGE", d.old, d.new)
    for c in d.packages_added:
        pk.add_row(c.name, "added", "", c.new or "")
    for c in d.packages_removed:
        pk.add_row(c.name, "removed", c.old or "", "")
    for c in d.packages_changed:
        pk.add_row(c.name, "changed", c.old or "", c.new or "")
    if pk.row_count:
        parts += [Text("\npackages"), pk]
    else:
        parts.append(Text("\npackages: no change"))
    totals = d.files_total
    parts.append(
        Text(f"\nfiles: {totals['added']} added, {totals['removed']} removed, {totals['changed']} changed")
    )
    ft = table("GROUP", "ADDED", "REMOVED", "CHANGED", "EXAMPLES")
    for g in d.files:
        examples = (g.changed + g.added + g.removed)[:max_paths]
        more = g.total - len(examples)
        ft.add_row(
            g.group,
            str(len(g.added)),
            str(len(g.removed)),
            str(len(g.changed)),
            " ".join("/" + p for p in examples) + (f" (+{more})" if more > 0 else ""),
        )
    if ft.row_count:
        parts.append(ft)
    kernel = (
        f"changed {d.kernel_old or 'none'} -> {d.kernel_new or 'none'}"
        if d.kernel_changed
        else f"unchanged ({d.kernel_old or 'none'})"
    )
    parts.append(Text(f"\nkernel: {kernel}"))
    st = table("SERVICE", "STATUS", "WHY")
    for s in d.services:
        st.add_row(s.name, s.status, "; ".join(s.reasons))
    if st.row_count:
        parts += [Text("services"), st]
    if d.tests_changed:
        parts.append(Text(f"post-deploy tests changed: {' '.join(d.tests_changed)}"))
    if d.migrations_added:
        parts.append(Text(f"migrations added: {' '.join(d.migrations_added)}"))
    parts.append(Text(f"\nafter the swap a node needs: {d.action}", style="bold"))
    return Group(*parts)


def verify(r: VerifyResult) -> Text:
    if r.ok:
        return Text(f"{r.release}: ok ({', '.join(sorted(r.checked))} match; signed by {r.signer})")
    return Text(f"{r.release}: FAILED: " + "; ".join(r.problems))


def node_line(n: NodeStatus) -> Text:
    state = ("paused" if n.paused else "running") if n.running else "stopped"
    reach = "reachable" if n.reachable else "unreachable"
    extra = f" (rebuild to {n.pending} pending)" if n.pending else ""
    return Text(f"{n.name} {n.address} {n.current} {state} {reach}{extra}")


def site_status(s: SiteStatus) -> Group:
    t = table("NODE", "ADDRESS", "RELEASE", "PREVIOUS", "STATE", "SSH")
    for n in s.nodes:
        state = ("paused" if n.paused else "running") if n.running else "stopped"
        state += f", rebuild to {n.pending} pending" if n.pending else ""
        t.add_row(n.name, n.address, n.current, n.previous or "-", state, "yes" if n.reachable else "no")
    head = Text(f"site {s.path}: {'up' if s.up else 'down'}, {len(s.nodes)} nodes on {s.subnet}")
    return Group(head, t)


def _clock(t: float | None) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def outcome_line(o: Outcome) -> str:
    r = o.rollout
    what = f"{r.kind} {r.id}" + (f" to {r.target}" if r.target else "")
    line = f"{what} {o.status}" + (f": {o.reason}" if o.reason else "")
    if o.rollback is not None:
        rb = o.rollback
        line += (f"; rolled back ({', '.join(f'{n} on {v}' for n, v in rb.nodes.items())})" if rb.ok
                 else f"; rollback {rb.rollout.id} {rb.status}: {rb.reason}")
    elif o.status in ("failed", "cancelled") and r.kind == "rollout" and not r.options.get("rollback", True):
        line += "; fleet left as it is (--no-rollback): 'imageupdate rollback' returns it to the last good releases"
    if o.resources:
        line += f"; resources {o.resources}"
    return line


def verdicts(vs: list[Verdict]) -> Group:
    t = table("NODE", "RELEASE", "CHECK", "RESULT", "SECONDS", "SAYS")
    for v in vs:
        for r in v.results:
            t.add_row(v.node, v.release, r.name, "passed" if r.ok else "FAILED", f"{r.seconds:.2f}",
                      last_line(r.output)[:120])
    return Group(t, *(Text(v.reason) for v in vs))


def outcome(o: Outcome) -> Group:
    t = table("NODE", "RELEASE")
    for n, rel in o.nodes.items():
        t.add_row(n, rel)
    after = [Text(f"next: {o.next}")] if o.next else []
    return Group(Text(outcome_line(o)), t, *after)


def fleet_status(s: FleetStatus) -> Group:
    parts: list[RenderableType] = []
    if s.heat.get("cloud"):
        heat = f"cloud {s.heat['cloud']}, Heat {s.heat['endpoint']}"
    else:
        heat = f"Heat {s.heat['endpoint']} (pid {s.heat['pid']})" if s.heat.get("running") else "Heat not running"
    stack = f", stack {s.stack['name']} {s.stack['state']}" if s.stack else ""
    parts.append(Text(f"site {s.site}: {heat}{stack}"))
    t = table("NODE", "ADDRESS", "RELEASE", "LAST GOOD", "STATE", "CHANGE")
    for n in s.nodes:
        change = f"-> {n.target}: {n.step}" if n.target and n.step else ""
        t.add_row(n.name, n.address, n.release, n.last_good or "-", n.state + (", unproven" if n.unproven else ""),
                  change)
    parts.append(t)
    if any(n.unproven for n in s.nodes):
        parts.append(Text("unproven: no passed gate on the release it runs (a rollback failed, was cancelled or "
                          "killed there); the next rollout or rollback that includes it gates it again"))
    if s.active:
        a = s.active
        stage = f", at {a['stage']}" if a.get("stage") else ""
        parts.append(Text(f"{a['kind']} {a['id']} to {a['target'] or 'last good'}: {a['state']}{stage}"
                          + (f" ({a['next']})" if a.get("next") else "")))
    if s.last:
        last = s.last
        parts.append(Text(f"{last['kind']} {last['id']}" + (f" to {last['target']}" if last["target"] else "")
                          + f": {last['state']}" + (f" ({last['reason']})" if last["reason"] else "")))
        st = table("NODE", "STEP", "FROM", "TO", "STATUS", "START", "SECONDS", "REASON")
        for step in last["steps"]:
            secs = f"{step['seconds']:.1f}" if step["seconds"] is not None else "-"
            st.add_row(step["node"], step["step"], step["from_release"] or "-", step["to_release"] or "-",
                       step["status"], _clock(step["started"]), secs, step["reason"] or "")
        parts.append(st)
    return Group(*parts)


def config_findings(target: str, findings: list[ConfigFinding]) -> Group:
    if not findings:
        return Group(Text(f"config: nothing removed, deprecated or unknown up to {target}"))
    lines = [Text(f"{f.level:8} {f.source}: {f.message}", style="red" if f.level == "error" else "yellow")
             for f in findings]
    return Group(*lines)


def fleet_plan(fp: FleetPlan, findings: list[ConfigFinding]) -> Group:
    if not fp.nodes:
        return Group(Text(f"every node already runs {fp.target}"))
    parts: list[RenderableType] = []
    for names, p in fp.groups():
        if p.to_state is None:
            parts.append(Text(f"{', '.join(names)}: {p.from_release} -> {p.target}: an image swap "
                              f"({p.target} declares no state version)"))
            continue
        parts.append(Text(f"{', '.join(names)}: {p.from_release} -> {p.target}, state version {p.from_state} -> "
                          f"{p.to_state}" + (" (a contract step: rollback restores a snapshot)"
                                             if p.has_contract else "")))
        t = table("RELEASE", "VERSION", "MIGRATION", "KIND", "STATE", "NOTE")
        for hop in p.hops:
            note = f"cannot be skipped: {hop.required}" if hop.required else ""
            if not hop.migrations:
                t.add_row(hop.release, hop.version, "-", "-", "-", note or "no migrations")
            for m in hop.migrations:
                t.add_row(hop.release, hop.version, m.name, m.kind, str(m.state_version), note)
                note = ""
        parts.append(t)
    parts.append(config_findings(fp.target, findings))
    return Group(*parts)


def rehearsal(r: Rehearsal, path: object) -> Group:
    t = table("RELEASE", "MIGRATION", "KIND", "STATE", "RESULT", "JUDGED BY", "SECONDS", "RERUN+COMPARE")
    for s in r.steps:
        result = "failed" if not s.ok else ("NOT idempotent" if s.idempotent is False else "ok, idempotent")
        t.add_row(s.release, s.migration, s.kind, str(s.state_version), result, s.digest, f"{s.seconds:.2f}",
                  "-" if s.rerun_seconds is None else f"{s.rerun_seconds:.2f}")
    head = (f"rehearsal of {r.target} on a copy of {r.node}'s state ({r.state_bytes / 1e6:.1f} MB, copied in "
            f"{r.copy_seconds:.2f} s; images unpacked in {r.prepare_seconds:.2f} s): state version {r.from_state} "
            f"-> {r.to_state} in {r.seconds:.2f} s")
    lines: list[RenderableType] = [Text(head), t]
    lines += [Text(p, style="red") for p in r.problems]
    lines.append(Text(f"report: {path}"))
    return Group(*lines)
