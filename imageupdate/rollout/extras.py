"""An operation's companions: the operator's resource hooks (create before the first node, verify_noapi and
verify per node, destroy at the end) and the downtime probe that watches the services while nodes change."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from imageupdate.base.text import last_line
from imageupdate.history.db import History, RolloutRow
from imageupdate.rollout.fleet import Fleet
from imageupdate.rollout.model import Outcome, RolloutOptions
from imageupdate.verify.probe import Prober, endpoints_for
from imageupdate.verify.resources import HookRun, ResourceHooks

Say = Callable[[RolloutRow, "str | None", str, str], None]


def short(text: str) -> str:
    return last_line(text, "no output")[:200]


class Extras:
    def __init__(self, fleet: Fleet, history: History, say: Say, opts: RolloutOptions) -> None:
        self.fleet = fleet
        self.history = history
        self.say = say
        self.hooks = self._load(opts)  # BadHooksDir: bad input

    def _load(self, opts: RolloutOptions) -> ResourceHooks | None:
        if opts.resources is None:
            return None
        names = self.fleet.node_names()
        nodes = " ".join(f"{n}={self.fleet.target(n).address}" for n in names)
        first = self.fleet.target(names[0])
        env = {"IMAGEUPDATE_SITE": str(self.fleet.path), "IMAGEUPDATE_NODES": nodes,
               "IMAGEUPDATE_SSH_KEY": str(first.key)}
        if first.known_hosts is not None:  # pinned host keys, under the alias imageupdate-NODE
            env["IMAGEUPDATE_SSH_KNOWN_HOSTS"] = str(first.known_hosts)
        return ResourceHooks(Path(opts.resources), self.fleet.path / "resources" / "kv", opts.hook_timeout, env=env)

    # resource hooks ------------------------------------------------------------------------------

    def phase(self, row: RolloutRow, phase: str, node: str | None, release: str | None) -> list[HookRun]:
        assert self.hooks is not None
        env = {"IMAGEUPDATE_ROLLOUT": str(row.id), "IMAGEUPDATE_RELEASE": release or ""}
        if node is not None:
            env["IMAGEUPDATE_NODE_ADDRESS"] = self.fleet.target(node).address
        runs = self.hooks.run(phase, node, env)
        for r in runs:
            self.history.hook(row.id, r.script, r.phase, r.node, r.ok, r.started, r.seconds, r.output)
            if not r.ok:
                self.say(row, node, "info", f"resource hook {r.script} {phase}"
                         f"{' on ' + node if node else ''} failed: {short(r.output)}")
        return runs

    def create(self, row: RolloutRow) -> str | None:
        """The ``create`` phase, unless it already passed for this operation; the reason it failed, or None."""
        if self.hooks is None or row.kind != "rollout":
            return None
        done = [h for h in self.history.hooks(row.id) if h["phase"] == "create"]
        if done and all(h["ok"] for h in done):
            return None
        failed = [r for r in self.phase(row, "create", None, row.target) if not r.ok]
        if failed:
            return f"resource hook {failed[0].script} create failed: {short(failed[0].output)}"
        return None

    def end(self, outcome: Outcome, opts: RolloutOptions) -> Outcome:
        """``destroy`` once the operation has ended (rolled back or not), unless the operator keeps them."""
        if self.hooks is None or outcome.status == "paused":
            return outcome
        row = outcome.rollout
        if row.kind == "rollback" and row.parent is not None:  # a resumed rollback: its rollout made them
            row = self.history.rollout(row.parent) or row
        ran = {h["phase"] for h in self.history.hooks(row.id)}
        if "create" not in ran or "destroy" in ran:
            return outcome
        if opts.keep_resources:
            outcome.resources = f"kept (--keep-resources); their data: {self.hooks.kv_root}"
            self.say(row, None, "info", f"resources {outcome.resources}")
            return outcome
        failed = [r for r in self.phase(row, "destroy", None, row.target) if not r.ok]
        if failed:
            outcome.resources = f"destroy failed: {failed[0].script}: {short(failed[0].output)}"
            outcome.resources_ok = False
            self.say(row, None, "failed", f"resources {outcome.resources}; their data stays in {self.hooks.kv_root}")
        else:
            self.hooks.forget()
            outcome.resources = "destroyed"
            self.say(row, None, "info", "resources destroyed")
        return outcome

    # the downtime probe --------------------------------------------------------------------------

    def start_probe(self, row: RolloutRow, opts: RolloutOptions) -> Prober | None:
        """The probe of every node the operation changes; a release whose services cannot be read is not
        probed (said in the log): the probe is evidence for the gates, never a reason to stop."""
        if not opts.probe:
            return None
        endpoints = []
        for node in (n for b in row.plan["batches"] for n in b):
            release = row.plan["after"][node]
            try:
                ep = endpoints_for(self.fleet.store.manifest(release).services, node,
                                   self.fleet.target(node).address)
            except Exception as e:  # noqa: BLE001 - a manifest the store cannot give: no probe for the node
                self.say(row, node, "info", f"no downtime probe for {node}: the services of {release} cannot "
                         f"be read ({e})")
                continue
            if ep is not None:
                endpoints.append(ep)
        return Prober(endpoints, opts.probe_interval).start() if endpoints else None

    def stop_probe(self, row: RolloutRow, prober: Prober | None) -> None:
        if prober is None:
            return
        started = prober.started or time.time()
        for probe in prober.stop().values():
            result = probe.to_dict()
            self.history.probe(row.id, result, started, time.time())
            if result["failures"]:
                self.say(row, probe.endpoint.node, "info",
                         f"{probe.endpoint.node} was down {result['downtime']:.2f} s "
                         f"({result['failures']} of {result['requests']} probes failed)")
