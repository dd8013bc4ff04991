"""imageupdate as a Python library: build releases and roll them onto a fleet without the command line.

Each function does what the ``imageupdate`` command of the same name does and returns a typed result; every
result has ``to_dict()``, the very document ``imageupdate ... --json`` prints. Errors are
:class:`~imageupdate.base.errors.ImageUpdateError` subclasses carrying ``release``, ``node``, ``step`` and
an ``exit_code`` (:class:`InputError`: nothing was started). Progress comes as events, not text::

    from imageupdate import api
    from imageupdate.api import RolloutEvent, RolloutOptions

    def seen(e: RolloutEvent) -> None:
        print(e.rollout, e.node, e.what, e.message)

    site = "/var/lib/imageupdate/site"
    api.build("R2", ["sample-workload-v2"])                  # -> BuildResult
    print(api.plan("R2", site=site).to_dict())              # the migrations each node goes through
    outcome = api.rollout("R2", RolloutOptions(canary=True), site=site, on_event=seen)
    if not outcome.ok:                                       # failed, rolled back, cancelled
        print(outcome.status, outcome.reason, outcome.nodes)
    print(api.status(site=site).to_dict()["nodes"])
    print(api.report(outcome.rollout.id, site=site).page)  # an HTML page of the rollout
    api.rollback(site=site)                                  # the nodes it touched go back

Where a call acts: ``site`` (the local site's directory), ``store`` (the image store) and ``cloud`` (a cloud
of clouds.yaml instead of the local site); see :mod:`imageupdate.api.fleets`. The library installs no signal
handler and reads no ``sys.argv``: a program that wants SIGTERM to stop a build or a rollout cleanly turns it
into ``KeyboardInterrupt`` itself (an interrupted build raises :class:`Interrupted` and publishes nothing; an
interrupted rollout stays open for :func:`resume` or :func:`cancel`). Locks record who holds them; name your
program in them with ``imageupdate.base.locks.describe_process("my-deployer")``.
"""

from __future__ import annotations

from imageupdate.api.fleets import fleet_dir, open_fleet, open_site, open_store
from imageupdate.api.images import (
    Deleted,
    KeyMade,
    KeyRevoked,
    KeyTrusted,
    Releases,
    Signed,
    TrustedKeys,
    Verification,
    build,
    create_key,
    delete,
    diff,
    releases,
    revoke_key,
    show,
    sign,
    trust_key,
    trusted_keys,
    verify,
)
from imageupdate.api.operations import (
    CancelRequested,
    Checks,
    ConfigCheck,
    Plan,
    RehearsalReport,
    Report,
    cancel,
    check,
    check_config,
    plan,
    rehearse,
    report,
    resume,
    rollback,
    rollout,
    status,
)
from imageupdate.api.sites import (
    CloudFleetMade,
    HeatEnv,
    HeatInfo,
    HeatStopped,
    HostKeyForgotten,
    NodeView,
    Recovered,
    SiteDestroyed,
    SiteView,
    cloud_up,
    forget_host_key,
    heat_env,
    heat_start,
    heat_status,
    heat_stop,
    operation_open,
    site_destroy,
    site_down,
    site_rebuild,
    site_recover,
    site_status,
    site_up,
)
from imageupdate.base.errors import ImageUpdateError, InputError, Interrupted, OperationError
from imageupdate.build.builder import BuildEvent, BuildResult
from imageupdate.images.diff import ReleaseDiff
from imageupdate.images.manifest import Manifest
from imageupdate.rollout.engine import Outcome, RolloutEvent, RolloutOptions
from imageupdate.rollout.status import FleetStatus

__all__ = [
    # the operations
    "build", "plan", "rollout", "rollback", "resume", "cancel", "status", "report", "check", "rehearse",
    "check_config",
    # releases and keys
    "releases", "show", "diff", "delete", "verify", "sign", "create_key", "trusted_keys", "trust_key",
    "revoke_key",
    # the local site, its Heat, a cloud fleet
    "site_up", "site_status", "site_down", "site_destroy", "site_recover", "site_rebuild", "operation_open",
    "heat_start", "heat_status", "heat_stop", "heat_env", "cloud_up", "forget_host_key",
    "open_store", "open_site", "open_fleet", "fleet_dir",
    # options, events, results
    "RolloutOptions", "RolloutEvent", "BuildEvent", "BuildResult", "Outcome", "CancelRequested", "FleetStatus",
    "Checks", "Plan", "RehearsalReport", "ConfigCheck", "Report", "Releases", "Manifest", "ReleaseDiff",
    "Deleted", "Verification", "Signed", "KeyMade", "TrustedKeys", "KeyTrusted", "KeyRevoked", "SiteView",
    "NodeView", "SiteDestroyed", "Recovered", "HeatInfo", "HeatStopped", "HeatEnv", "CloudFleetMade",
    "HostKeyForgotten",
    # errors
    "ImageUpdateError", "InputError", "OperationError", "Interrupted",
]
