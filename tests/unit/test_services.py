"""Service declarations: the build's validator and the node init's own rules (run from its file)."""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from imageupdate.base.datadirs import elements_dir
from imageupdate.images.services import (
    InvalidServiceDeclaration,
    account_problems,
    normalised,
    parse_service,
    refusal,
)
from tests.scripts import load_script

PG = "/usr/share/imageupdate/services/postgresql.json"
FULL: dict[str, Any] = {
    "name": "postgresql",
    "command": ["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/15/main"],
    "user": "postgres",
    "group": "postgres",
    "supplementary_groups": ["ssl-cert"],
    "working_directory": "/var/lib/postgresql",
    "environment": {"PGDATA": "/var/lib/postgresql/15/main"},
    "runtime_directories": [{"path": "/run/postgresql", "owner": "postgres", "group": "postgres", "mode": "2775"}],
    "stop_signal": "SIGINT",
    "stop_timeout": 30,
    "ports": [5432],
    "probe": False,
    "paths": ["/usr/lib/postgresql"],
    "packages": ["postgresql-15"],
}
PASSWD = "root:x:0:0:root:/root:/bin/bash\npostgres:x:104:110:PostgreSQL:/var/lib/postgresql:/bin/bash\n"
GROUP = "root:x:0:\nssl-cert:x:109:postgres\npostgres:x:110:\nadm:x:4:\n"


def test_a_full_declaration_is_kept_as_written() -> None:
    decl, problems = parse_service(PG, FULL)
    assert problems == []
    assert decl == {**FULL, "health": None}


def test_defaults_are_filled() -> None:
    decl, problems = parse_service("/s/app.json", {"name": "app", "command": ["/usr/bin/app"],
                                                   "runtime_directories": [{"path": "/run/app/"}]})
    assert problems == []
    assert decl == {
        "name": "app", "command": ["/usr/bin/app"], "user": "root", "group": None,
        "supplementary_groups": None, "working_directory": "/", "environment": {},
        "runtime_directories": [{"path": "/run/app", "owner": "root", "group": None, "mode": "0755"}],
        "stop_signal": "SIGTERM", "stop_timeout": 5, "ports": [], "health": None, "probe": True,
        "paths": [], "packages": [],
    }


def test_runtime_directory_owner_and_group_default_to_the_service() -> None:
    decl, _ = parse_service(PG, {**FULL, "runtime_directories": [{"path": "/run/postgresql"}]})
    assert decl is not None
    assert decl["runtime_directories"] == [{"path": "/run/postgresql", "owner": "postgres", "group": "postgres",
                                            "mode": "0755"}]


@pytest.mark.parametrize("change, problem", [
    ({"stop_sigal": "SIGINT"}, "unknown key 'stop_sigal' (known: name, command, user,"),
    ({"ports": [0]}, "'ports' must be a list of integers 1..65535"),
    ({"ports": [70000]}, "'ports' must be a list of integers 1..65535"),
    ({"ports": [True]}, "'ports' must be a list of integers 1..65535"),
    ({"ports": "5432"}, "'ports' must be a list of integers 1..65535"),
    ({"ports": [5432, 5432]}, "'ports' repeats a port"),
    ({"name": "pg"}, "'name' must equal the file's name 'postgresql'"),
    ({"command": []}, "'command' must not be empty"),
    ({"command": "postgres -D x"}, "'command' must be a list of non-empty strings"),
    ({"command": ["postgres"]}, "'command' must start with an absolute path"),
    ({"user": 104}, "'user' must be a non-empty string"),
    ({"user": "bad name"}, "'user' must be a user or group name"),
    ({"supplementary_groups": "ssl-cert"}, "'supplementary_groups' must be a list"),
    ({"working_directory": "var/lib"}, "'working_directory' must be an absolute path"),
    ({"environment": ["A=1"]}, "'environment' must be an object of string to string"),
    ({"environment": {"A": 1}}, "'environment' value of 'A' must be a string"),
    ({"environment": {"A=B": "1"}}, "'environment' has an invalid variable name 'A=B'"),
    ({"runtime_directories": ["/run/postgresql"]}, "'runtime_directories[0]' must be an object"),
    ({"runtime_directories": [{"path": "/var/run/pg"}]}, "'runtime_directories[0].path' must be an absolute path "
                                                         "inside /run/"),
    ({"runtime_directories": [{"path": "/run/../etc"}]}, "'runtime_directories[0].path' must be"),
    ({"runtime_directories": [{"path": "/run"}]}, "'runtime_directories[0].path' must be"),
    ({"runtime_directories": [{"path": "/run/imageupdate"}]}, "'runtime_directories[0].path' must be"),
    ({"runtime_directories": [{"path": "/run/a", "mode": 755}]}, "'runtime_directories[0].mode' must be an octal "
                                                                 "string"),
    ({"runtime_directories": [{"path": "/run/a", "mode": "0789"}]}, "'runtime_directories[0].mode' must be"),
    ({"runtime_directories": [{"path": "/run/a", "mood": "0755"}]}, "'runtime_directories[0].mood' is not a known"),
    ({"runtime_directories": [{"path": "/run/a"}, {"path": "/run/a/"}]}, "'runtime_directories[1].path' repeats"),
    ({"stop_signal": "TERM"}, "'stop_signal' must be one of SIGTERM, SIGINT"),
    ({"stop_timeout": 0}, "'stop_timeout' must be between 1 and 60 seconds (got 0)"),
    ({"stop_timeout": 61}, "'stop_timeout' must be between 1 and 60 seconds"),
    ({"stop_timeout": "10"}, "'stop_timeout' must be a number of seconds"),
    ({"stop_timeout": True}, "'stop_timeout' must be a number of seconds"),
    ({"health": "health"}, "'health' must be an HTTP path starting with \"/\""),
    ({"health": "/a b"}, "'health' must be an HTTP path"),
    ({"health": "/health", "ports": []}, "'health' needs 'ports'"),
    ({"probe": "no"}, "'probe' must be true or false"),
    ({"paths": "/usr/lib"}, "'paths' must be a list of non-empty strings"),
    ({"paths": ["usr/lib"]}, "'paths' must be a list of absolute paths"),
    ({"packages": [1]}, "'packages' must be a list of non-empty strings"),
])
def test_bad_declarations_name_the_file_and_key(change: dict[str, Any], problem: str) -> None:
    decl, problems = parse_service(PG, {**FULL, **change})
    assert decl is not None
    assert len(problems) == 1, problems
    assert problems[0].startswith(PG + ": ") and problem in problems[0], problems


def test_missing_keys_and_non_objects() -> None:
    _, problems = parse_service(PG, {})
    assert problems == [f"{PG}: missing required key 'name'", f"{PG}: missing required key 'command'"]
    decl, problems = parse_service(PG, ["postgres"])
    assert decl is None and problems == [f"{PG}: must be a JSON object (got a list)"]


def test_float_stop_timeout_and_short_mode_are_normalised() -> None:
    decl, problems = parse_service(PG, {**FULL, "stop_timeout": 2.5,
                                        "runtime_directories": [{"path": "/run/postgresql", "mode": "755"}]})
    assert problems == [] and decl is not None
    assert decl["stop_timeout"] == 2.5 and decl["runtime_directories"][0]["mode"] == "0755"


def test_accounts_are_checked_against_the_image() -> None:
    decl, _ = parse_service(PG, FULL)
    assert decl is not None
    assert account_problems(PG, decl, PASSWD, GROUP) == []
    decl = {**decl, "supplementary_groups": ["ssl-cert", "nogroup"],
            "runtime_directories": [{"path": "/run/x", "owner": "www-data", "group": "postgres", "mode": "0755"}]}
    problems = account_problems(PG, decl, PASSWD, GROUP)
    assert problems == [
        f"{PG}: 'supplementary_groups' names group 'nogroup', which the image's /etc/group does not define "
        "(create it in the element's install.d)",
        f"{PG}: 'runtime_directories[0].owner' names user 'www-data', which the image's /etc/passwd does not "
        "define (create it in the element's install.d)",
    ]


def test_refusal_is_bad_input_naming_the_first_problem() -> None:
    err = refusal("R2", ["a.json: x", "b.json: y"])
    assert isinstance(err, InvalidServiceDeclaration) and err.exit_code == 2
    assert str(err) == "release R2 ships an invalid service declaration: a.json: x (and 1 more)"


def test_old_manifest_declarations_normalise_to_the_current_form() -> None:
    old = {"name": "web", "command": ["/usr/bin/web"], "ports": [80], "health": "/h"}
    assert normalised(old) == parse_service("web.json", old)[0]
    assert normalised({"name": "web", "invalid": True})["invalid"] is True


def test_the_shipped_sample_declaration_is_valid() -> None:
    for path in sorted(elements_dir().glob("*/static/usr/share/imageupdate/services/*.json")):
        decl, problems = parse_service("/" + str(path).split("/static/", 1)[1], json.loads(path.read_text()))
        assert problems == [], problems


# The node's init, loaded from its file (it is stdlib-only Python that runs inside the image) -------------

@pytest.fixture(scope="module")
def init() -> ModuleType:
    return load_script("imageupdate-node/static/usr/lib/imageupdate/init", "imageupdate_node_init")


def test_init_resolves_groups_like_initgroups(init: ModuleType) -> None:
    users, groups = init.parse_accounts(PASSWD, GROUP)
    # Default: the primary group, and every group that lists the user (postgres keeps ssl-cert).
    assert init.resolve_identity("postgres", None, None, users, groups) == (104, 110, [110, 109],
                                                                            "/var/lib/postgresql")
    # Explicit: exactly those; a group other than the primary.
    assert init.resolve_identity("postgres", "adm", ["ssl-cert"], users, groups) == (104, 4, [109],
                                                                                     "/var/lib/postgresql")
    assert init.resolve_identity("postgres", None, [], users, groups)[2] == []
    assert init.resolve_identity("root", None, None, users, groups) == (0, 0, [0], "/root")
    for args, missing in ((("nobody", None, None), "user 'nobody'"), (("postgres", "x", None), "group 'x'"),
                          (("postgres", None, ["x"]), "supplementary group 'x'")):
        with pytest.raises(ValueError, match=missing):
            init.resolve_identity(*args, users, groups)


def test_init_runtime_directory_specs(init: ModuleType) -> None:
    users, groups = init.parse_accounts(PASSWD, GROUP)
    decl = {"runtime_directories": [{"path": "/run/postgresql", "mode": "2775"},
                                    {"path": "/run/pg/sub/", "owner": "root", "group": "ssl-cert"}]}
    assert init.runtime_specs(decl, 104, 110, users, groups) == [("/run/postgresql", 104, 110, 0o2775),
                                                                 ("/run/pg/sub", 0, 109, 0o755)]
    for bad in ({"path": "/etc/x"}, {"path": "/run/../etc"}, {"path": "/run"}, {"path": "/run/imageupdate/x"},
                {"path": "/run/x", "mode": 755}, {"path": "/run/x", "owner": "nobody"}):
        with pytest.raises(ValueError):
            init.runtime_specs({"runtime_directories": [bad]}, 0, 0, users, groups)


def test_init_skips_what_it_cannot_run(init: ModuleType) -> None:
    init.check_declaration(FULL, "postgresql.json")
    for bad in ({**FULL, "command": "postgres"}, {**FULL, "name": "pg"}, {**FULL, "stop_signal": "SIGSTOP"},
                {**FULL, "environment": {"A": 1}}, {**FULL, "runtime_directories": [{"path": "/tmp/x"}]}, []):
        with pytest.raises(ValueError):
            init.check_declaration(bad, "postgresql.json")
    assert init.stop_timeout(30) == 30.0 and init.stop_timeout(600) == init.DEFAULT_STOP_TIMEOUT
    assert init.stop_timeout(None) == init.DEFAULT_STOP_TIMEOUT


def test_init_reads_a_process_start_time(init: ModuleType) -> None:
    import os
    mine = Path(f"/proc/{os.getpid()}/stat").read_text()
    assert init.proc_start_time(os.getpid()) == int(mine.rsplit(")", 1)[1].split()[19])
    assert init.proc_start_time(2**22 + 7) is None


def test_init_makes_runtime_dirs_and_refuses_symlinks(init: ModuleType, tmp_path: Path) -> None:
    import os
    run = tmp_path / "run"
    run.mkdir()
    init.make_runtime_dir("/run/a/b", os.getuid(), os.getgid(), 0o2770, root=str(tmp_path))
    assert (run / "a").stat().st_mode & 0o7777 == 0o755
    assert (run / "a/b").stat().st_mode & 0o7777 == 0o2770
    (run / "a/b/sock").write_text("")
    init.make_runtime_dir("/run/a/b", os.getuid(), os.getgid(), 0o750, root=str(tmp_path))
    assert (run / "a/b/sock").exists() and (run / "a/b").stat().st_mode & 0o7777 == 0o750
    (run / "evil").symlink_to(tmp_path)
    with pytest.raises(OSError, match="/run/evil exists and is not a directory"):
        init.make_runtime_dir("/run/evil/x", os.getuid(), os.getgid(), 0o755, root=str(tmp_path))


def test_sshd_is_the_nodes_own_name() -> None:
    parsed, problems = parse_service("usr/share/imageupdate/services/sshd.json",
                                     {"name": "sshd", "command": ["/usr/sbin/sshd", "-D"]})
    assert "'sshd' is the node's own" in problems[0], (parsed, problems)


def test_a_trailing_newline_is_no_valid_mode_health_or_account() -> None:
    for key, value in (("health", "/h\n"), ("user", "web\n"), ("environment", {"A\n": "x"})):
        data = {"name": "web", "command": ["/usr/bin/web"], "ports": [80], key: value}
        assert parse_service("web.json", data)[1], key
    data = {"name": "web", "command": ["/usr/bin/web"], "runtime_directories": [{"path": "/run/web", "mode": "0755\n"}]}
    assert parse_service("web.json", data)[1]
