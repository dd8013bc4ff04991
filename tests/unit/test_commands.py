"""The command layer and its two front doors: the same command gives the same result, the same --json
document and the same exit code through ``imageupdate`` and ``openstack imageupdate``; every option a command
offers reaches the library; the defaults are the library's; SIGTERM exits 130."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from imageupdate import api
from imageupdate.api import operations
from imageupdate.base.errors import EXIT_INTERRUPTED
from imageupdate.base.locks import OwnerLock
from imageupdate.cli.main import build_parser, main
from imageupdate.commands import COMMANDS, by_name
from imageupdate.commands.output import Output
from imageupdate.commands.spec import CLOUD, SITE, STORE, Command, Context, add_arguments, node_list, seconds
from imageupdate.rollout import engine
from imageupdate.rollout.engine import Orchestrator, RolloutOptions
from imageupdate.rollout.path import FleetPlan
from tests.jsondocs import normalised
from tests.unit.fakeheat import FakeFleet, FakeHeat, verdicts

NODES = ("node0", "node1")
OSC_GROUP = "openstack.imageupdate.v1"


def osc_installed() -> bool:
    return any(ep.name == "imageupdate_rollout" for ep in entry_points(group=OSC_GROUP))


needs_osc = pytest.mark.skipif(not osc_installed(), reason="imageupdate's entry points are not installed "
                                                           "(pip install -e .)")


def test_the_openstack_entry_points_are_installed() -> None:
    """The test command installs the package (tools/install.sh: pip install -e .), so the tests marked
    needs_osc run in CI; this one fails there if they would be skipped."""
    assert osc_installed(), "run 'bash tools/install.sh' (pip install -e .) to install imageupdate's entry points"


def osc(*argv: str) -> int:
    from openstackclient.shell import main as openstack

    return int(openstack(["imageupdate", *argv]))


def run(door: Callable[..., int], capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = door(*argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def imageupdate(*argv: str) -> int:
    return main(list(argv))


# a fleet without root, Heat or nodes -----------------------------------------------------------------------


@pytest.fixture
def fake_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeHeat, FakeFleet]:
    """Every fleet the api opens is one fake fleet on a scripted Heat; its orchestrators never wait."""
    heat = FakeHeat({n: "R1" for n in NODES})
    fleet = FakeFleet(tmp_path, heat, {"R1", "R2"})
    monkeypatch.setattr(operations, "open_fleet", lambda site=None, store=None, cloud=None: fleet)
    monkeypatch.setattr(operations, "Orchestrator", lambda f, on_event=None: Orchestrator(
        f, on_event=on_event, sleep=lambda s: None, poll=0.01, verify=verdicts()))
    monkeypatch.setattr(engine, "plan_fleet", lambda fleet, target, nodes=None: FleetPlan(target, {}, []))
    monkeypatch.setattr(engine, "check_fleet_config", lambda fleet, fp, given=None: [])
    return heat, fleet


@needs_osc
def test_both_doors_roll_out_alike(fake_fleet: tuple[FakeHeat, FakeFleet], capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path) -> None:
    heat, _fleet = fake_fleet
    site = ("--site", str(tmp_path / "site"))
    docs, human = [], []
    for door in (imageupdate, osc):
        rc, out, _ = run(door, capsys, "rollout", "R2", "--no-probe", "--json", *site)
        assert rc == 0 and heat.releases == {n: "R2" for n in NODES}
        said = {imageupdate: "imageupdate rollout R2 --no-probe", osc: "openstack imageupdate rollout R2 --no-probe"}
        assert OwnerLock.process.startswith(said[door])  # the front door names the process in its locks
        docs.append(json.loads(out))
        rc, out, _ = run(door, capsys, "status", *site)  # the human rendering, the same renderer
        assert rc == 0
        human.append(out)
        rc, _, _ = run(door, capsys, "rollback", "--json", *site)
        assert rc == 0 and heat.releases == {n: "R1" for n in NODES}
    assert docs[0]["status"] == "succeeded" and docs[0]["rollout"]["id"] != docs[1]["rollout"]["id"]
    assert normalised(docs[0]) == normalised(docs[1])
    assert re.sub(r"\d", "#", human[0]) == re.sub(r"\d", "#", human[1])  # ids and clock times differ


@needs_osc
def test_both_doors_fail_alike(fake_fleet: tuple[FakeHeat, FakeFleet], capsys: pytest.CaptureFixture[str],
                               tmp_path: Path) -> None:
    site = ("--site", str(tmp_path / "site"))
    results = []
    for door in (imageupdate, osc):
        rc, out, err = run(door, capsys, "rollout", "R9", "--json", *site)  # not in the store: bad input
        results.append((rc, json.loads(out), [x for x in err.splitlines() if x.startswith("imageupdate:")]))
    assert results[0] == results[1] and results[0][0] == 2 and results[0][1]["error"] == "ReleaseNotFound"


@needs_osc
def test_every_command_is_an_openstack_command_with_the_same_options() -> None:
    eps = {ep.name: ep for ep in entry_points(group=OSC_GROUP)}
    assert sorted(eps) == sorted(f"imageupdate_{c.name.replace(' ', '_')}" for c in COMMANDS)
    app = argparse.Namespace(parser=argparse.ArgumentParser(), options=argparse.Namespace(cloud=None))
    app.parser.add_argument("--os-cloud")  # openstack's own parser, in short: it would take --os
    cli = build_parser()
    for name, ep in eps.items():
        cls = ep.load()
        command: Command = cls.command
        assert name == f"imageupdate_{command.name.replace(' ', '_')}" and cls.auth_required is False
        theirs = cls(app, None).get_parser(f"openstack {command.name}")
        mine = cli_parser(cli, command.name)
        assert options_of(theirs) == options_of(mine) - {"--os"}, command.name


def cli_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for word in name.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings} | {a.dest for a in parser._actions
                                                                     if not a.option_strings}


def test_the_plugin_module_has_the_shape_osc_asks_for() -> None:
    from imageupdate.osc import plugin

    assert plugin.API_NAME == "imageupdate" and plugin.API_VERSION_OPTION == "os_imageupdate_api_version"
    assert plugin.DEFAULT_API_VERSION in plugin.API_VERSIONS and plugin.make_client(object()) is None
    parser = plugin.build_option_parser(argparse.ArgumentParser())
    assert parser.parse_args([]).os_imageupdate_api_version == "1"


# every option offered is honoured ----------------------------------------------------------------------------


class Calls:
    """Stands for every function of imageupdate.api: records how it was called, returns a result."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        for name in api.__all__:
            fn = getattr(api, name)
            if inspect.isfunction(fn) and name not in ("open_site", "open_store", "open_fleet", "fleet_dir"):
                monkeypatch.setattr(api, name, self._recorder(name, fn))
        monkeypatch.setattr(api, "open_site", lambda site=None, store=None: argparse.Namespace(path=site))

    def _recorder(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        def record(*args: Any, **kwargs: Any) -> Any:
            signature.bind(*args, **kwargs)  # the command calls the api as it is declared
            kwargs.pop("on_event", None)
            self.calls.append((name, args, kwargs))
            return argparse.Namespace(to_dict=dict)
        return record


def value_for(option: dict[str, Any], default: Any) -> list[str]:
    """Words that give an option a value other than its default."""
    if option.get("action") == "store_true":
        return []
    if "choices" in option:
        return [next(c for c in option["choices"] if c != default)]
    kind = option.get("type")
    if kind in (int, seconds):
        return ["7"]
    if kind is node_list:
        return ["node9"]
    return ["/tmp/other"]


POSITIONAL = {"release": "R2", "node": "node0", "old": "R1", "new": "R2", "public_key": "/k.pub", "key": "k1",
              "rollout": "3", "nodes": "node1", "configs": "/etc/app.conf"}


def required_words(command: Command) -> list[str]:
    words: list[str] = []
    for a in command.args:
        if not a.flags[0].startswith("-"):
            words.append(POSITIONAL[a.dest])
        elif a.options.get("required"):
            words += [a.flags[0], *value_for(a.options, None)]
    return words


def call_of(command: Command, argv: list[str], monkeypatch: pytest.MonkeyPatch,
            default_cloud: str | None = None) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    parser = argparse.ArgumentParser()
    add_arguments(parser, command)
    args = parser.parse_args(argv)
    calls = Calls(monkeypatch)
    ctx = Context(Output(False), default_cloud=default_cloud).for_command(args, command.honours)
    command.run(args, ctx)
    assert calls.calls, f"{command.name} calls no function of imageupdate.api"
    return calls.calls[-1]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_every_option_a_command_offers_reaches_the_library(command: Command,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base = required_words(command)
    if command.name.startswith("cloud"):
        base += ["--cloud", "c1"]
    plain = call_of(command, base, monkeypatch)
    for a in command.args:
        if not a.flags[0].startswith("-") or a.options.get("required"):
            continue
        changed = call_of(command, [*base, a.flags[0], *value_for(a.options, a.options.get("default"))],
                          monkeypatch)
        assert changed != plain, f"{command.name} offers {a.flags[0]} but the library never sees it"
    for option, key, value in (("--site", "site", Path("/s1")), ("--store", "store", Path("/st1")),
                               ("--cloud", "cloud", "c2")):
        honoured = {"--site": SITE, "--store": STORE, "--cloud": CLOUD}[option] in command.honours
        if honoured:
            _, args, kwargs = call_of(command, [*base, option, str(value)], monkeypatch)
            assert kwargs.get(key) == value or value in args, f"{command.name} {option} does not reach the library"
        else:  # not offered at all: argparse refuses it
            with pytest.raises(SystemExit):
                call_of(command, [*base, option, str(value)], monkeypatch)


@pytest.mark.parametrize("name", ["rehearse", "check-config", "site status", "site rebuild", "heat stop"])
def test_a_local_site_command_has_no_cloud_and_ignores_os_cloud(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    command = by_name(name)
    assert CLOUD not in command.honours
    _, _, kwargs = call_of(command, required_words(command), monkeypatch, default_cloud="from-env")
    assert "cloud" not in kwargs


@pytest.mark.parametrize("name", ["plan", "rollout", "status", "images verify", "keys list"])
def test_the_front_doors_default_cloud_reaches_a_fleet_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    command = by_name(name)
    assert call_of(command, required_words(command), monkeypatch, default_cloud="from-env")[2]["cloud"] == "from-env"
    assert call_of(command, [*required_words(command), "--cloud", "given"], monkeypatch,
                   default_cloud="from-env")[2]["cloud"] == "given"


def test_os_cloud_is_the_default_cloud_of_imageupdate(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(api, "plan", lambda to, **kw: seen.append(kw) or api.Plan(FleetPlan(to, {}, []), []))
    monkeypatch.setenv("OS_CLOUD", "envcloud")
    assert main(["plan", "--to", "R2"]) == 0 and seen[-1]["cloud"] == "envcloud"
    monkeypatch.setenv("OS_CLOUD", "")
    assert main(["plan", "--to", "R2"]) == 0 and seen[-1]["cloud"] is None


# defaults are the library's -----------------------------------------------------------------------------------

ALIASES = {"wait_lock": "wait", "os_element": "os_element", "key": "signing_key"}


def library_default(command: Command, dest: str) -> Any:
    if command.name in ("rollout", "rollback") and dest in {f.name for f in fields(RolloutOptions)}:
        return getattr(RolloutOptions(), dest)
    fn = {"build": api.build, "site rebuild": api.site_rebuild, "cloud up": api.cloud_up}.get(command.name)
    if fn is not None:
        param = inspect.signature(fn).parameters.get(ALIASES.get(dest, dest))
        if param is not None:
            return param.default
    raise LookupError(dest)


def test_every_default_an_option_shows_is_the_librarys() -> None:
    checked = 0
    for command in COMMANDS:
        for a in command.args:
            default = a.options.get("default")
            if default in (None, False, []) or a.options.get("action") == "store_true":
                continue
            assert default == library_default(command, a.dest), f"{command.name} {a.flags[0]}"
            if a.options.get("help"):
                assert f"{default:g}" if isinstance(default, float) else str(default) in a.options["help"]
            checked += 1
    assert checked >= 8  # batch size, gate timeout (twice), hook timeout, probe interval, os, wait, ssh user...


# SIGTERM ------------------------------------------------------------------------------------------------------


def sigterm_during(monkeypatch: pytest.MonkeyPatch) -> None:
    def terminated(**_kw: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the command")
    monkeypatch.setattr(api, "releases", terminated)


@pytest.mark.parametrize("door", [imageupdate, pytest.param(osc, marks=needs_osc)], ids=["imageupdate", "openstack"])
def test_sigterm_exits_130_with_its_error_document(door: Callable[..., int], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sigterm_during(monkeypatch)
    before = signal.getsignal(signal.SIGTERM)
    rc, out, err = run(door, capsys, "images", "list", "--store", str(tmp_path), "--json")
    assert rc == EXIT_INTERRUPTED == 130
    assert json.loads(out)["error"] == "Interrupted" and "interrupted (SIGINT or SIGTERM)" in err
    assert signal.getsignal(signal.SIGTERM) == before  # the front door puts the handler back


def test_the_library_installs_no_signal_handler() -> None:
    import imageupdate.api as library

    for path in Path(library.__file__).parent.glob("*.py"):
        code = path.read_text()
        assert "import signal" not in code and "sys.argv[" not in code and "import sys" not in code, path


# exceptions no step expected -------------------------------------------------------------------------------


def _raising(exc: Exception) -> Callable[..., Any]:
    def fail(**_kw: Any) -> Any:
        raise exc
    return fail


@pytest.mark.parametrize("door", [imageupdate, pytest.param(osc, marks=needs_osc)], ids=["imageupdate", "openstack"])
def test_an_exception_no_step_expected_is_one_line_not_a_traceback(door: Callable[..., int],
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    tmp_path: Path) -> None:
    """Seen in CI: 'cloud up' printed openstacksdk's traceback ("The image service ... exists but does not
    have any supported versions") when Glance was slow to start. Now a cloud library's exception is a
    CloudAPIError and any other an InternalError: one line, exit 1, one --json document."""
    from openstack import exceptions as sdk

    monkeypatch.delenv("IMAGEUPDATE_DEBUG", raising=False)
    for exc, kind, said in ((sdk.NotSupported("The image service exists but does not have any supported versions."),
                             "CloudAPIError", "the cloud failed: The image service exists"),
                            (KeyError("boom"), "InternalError", "internal error: KeyError: 'boom'; this is a bug")):
        monkeypatch.setattr(api, "releases", _raising(exc))
        rc, out, err = run(door, capsys, "images", "list", "--store", str(tmp_path), "--json")
        assert rc == 1 and json.loads(out)["error"] == kind
        # under 'openstack', its plugin loader may log (even a traceback) about other plugins: ours is the last
        # line, and no traceback passes through the command's code
        last = err.strip().splitlines()[-1]
        assert last.startswith("imageupdate: error: ") and said in last and "in fail" not in err, err
        assert door is osc or "Traceback" not in err
    monkeypatch.setenv("IMAGEUPDATE_DEBUG", "1")  # a developer asks for the traceback
    with pytest.raises(KeyError):
        imageupdate("images", "list", "--store", str(tmp_path))
