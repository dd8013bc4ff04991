"""One authenticated connection to a cloud named in clouds.yaml, with the errors a cloud user meets said in one
line: an unknown cloud name, an authentication failure, a missing Heat or Glance endpoint."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_fixed

from imageupdate.base.errors import InputError, OperationError


class UnknownCloud(InputError):
    """A cloud name that no clouds.yaml on openstacksdk's search path defines."""


class CloudAuthFailed(InputError):
    """The cloud refused the credentials of its clouds.yaml entry."""


class MissingEndpoint(InputError):
    """The cloud's catalog has no endpoint for a service imageupdate needs (Heat, Glance, Nova)."""


class CloudUnreachable(OperationError):
    """The cloud's identity endpoint does not answer."""


NEEDED = {"orchestration": "Heat", "image": "Glance", "compute": "Nova"}
API_WAIT = 60.0  # seconds an endpoint in the catalog has to answer with its API versions (one starting up)


def connect(name: str, sleep: Callable[[float], None] = time.sleep) -> Any:
    """An ``openstack.Connection`` to ``name``, authenticated, with every needed endpoint in its catalog."""
    import openstack
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as sdk

    logging.getLogger("keystoneauth").setLevel(logging.ERROR)  # its warnings would add lines to our one-line error

    check_clouds_yaml(name)
    try:
        conn = openstack.connect(cloud=name)
    except sdk.ConfigException as e:
        raise UnknownCloud(f"no cloud named {name!r} in clouds.yaml ({_first(e)}); add it to clouds.yaml "
                           "(./clouds.yaml, ~/.config/openstack/ or /etc/openstack/) or set OS_CLIENT_CONFIG_FILE",
                           step="connect") from None
    try:
        conn.authorize()
    except (ksa.ClientException, sdk.SDKException) as e:
        cause = e.__cause__ or e.__context__ or e
        if isinstance(cause, ksa.Unauthorized) or isinstance(e, ksa.Unauthorized) or "(HTTP 401)" in str(e):
            raise CloudAuthFailed(f"cloud {name!r} refused its credentials ({_first(cause)}); check auth in "
                                  "clouds.yaml", step="connect") from None
        if isinstance(cause, ksa.ConnectFailure) or isinstance(e, ksa.ConnectFailure):
            raise CloudUnreachable(f"cloud {name!r} does not answer at its auth_url ({_first(cause)})",
                                   step="connect") from None
        raise CloudUnreachable(f"cloud {name!r}: {_first(e)}", step="connect") from None
    for kind, what in NEEDED.items():
        try:
            found = conn.endpoint_for(kind)  # None when the catalog has no such entry in the cloud's region
        except Exception:  # noqa: BLE001 - keystoneauth raises several kinds for a missing entry
            found = None
        if not found:
            raise MissingEndpoint(f"cloud {name!r} has no {what} ({kind}) endpoint in its catalog; imageupdate "
                                  f"needs {', '.join(NEEDED.values())}", step="connect")
    require_apis(conn, name, sleep)
    return conn


def _transient(e: BaseException) -> bool:
    """What an API that is starting, restarting or overloaded gives: no version document (openstacksdk's
    NotSupported), a refused or reset connection, a 5xx. Not 4xx: asking again would not change it."""
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as sdk

    if isinstance(e, sdk.HttpException):
        return e.status_code is None or e.status_code >= 500
    return isinstance(e, (sdk.NotSupported, ksa.ConnectionError, ksa.DiscoveryFailure, ksa.HttpServerError))


def require_apis(conn: Any, name: str, sleep: Callable[[float], None] = time.sleep,
                 wait: float = API_WAIT) -> None:
    """Each needed API answers with a version it speaks: openstacksdk discovers it the first time a proxy
    (``conn.image``...) is used, and a Glance still starting gave a traceback from inside openstacksdk halfway
    through ``cloud up``. Asked again every 2 s for ``wait`` seconds, then one line naming the service."""
    for kind, what in NEEDED.items():
        try:
            for attempt in Retrying(retry=retry_if_exception(_transient), wait=wait_fixed(2), sleep=sleep,
                                    stop=stop_after_attempt(int(wait // 2) + 1) | stop_after_delay(wait)):
                with attempt:
                    getattr(conn, kind)
        except RetryError as e:
            failed = e.last_attempt.exception()
            raise CloudUnreachable(f"cloud {name!r}: {what} ({kind}) answered no API version it speaks for "
                                   f"{wait:.0f} s ({_first(failed) if failed else 'no answer'}); check that it "
                                   "runs and its catalog URL is right", step="connect") from None
        except Exception as e:  # noqa: BLE001 - openstacksdk and keystoneauth raise many kinds
            raise CloudUnreachable(f"cloud {name!r}: {what} ({kind}) refused version discovery ({_first(e)})",
                                   step="connect") from None


def _first(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


class BadCloudsYaml(InputError):
    """A clouds.yaml that does not parse, or whose entries are not mappings."""


def clouds_yaml_files() -> list[Path]:
    """Where openstacksdk looks, in its order (OS_CLIENT_CONFIG_FILE first)."""
    given = os.environ.get("OS_CLIENT_CONFIG_FILE")
    found = [Path(given)] if given else []
    for d in (Path.cwd(), Path.home() / ".config/openstack", Path("/etc/xdg/openstack"), Path("/etc/openstack")):
        found += [d / f"clouds.{ext}" for ext in ("yaml", "yml", "json")]
    return [p for p in found if p.is_file()]


def check_clouds_yaml(name: str) -> None:
    """The clouds.yaml openstacksdk will use (the first it can read and parse; one named by
    OS_CLIENT_CONFIG_FILE must parse) maps cloud names to mappings: otherwise one line naming the file,
    not a traceback from inside openstacksdk or a misleading 'no cloud named'."""
    import yaml

    given = os.environ.get("OS_CLIENT_CONFIG_FILE")
    for path in clouds_yaml_files():
        try:
            data = yaml.safe_load(path.read_text(errors="replace"))
        except PermissionError:
            continue  # openstacksdk skips it too
        except (OSError, yaml.YAMLError) as e:
            if given is None or path != Path(given):
                continue  # openstacksdk skips a file that does not parse and reads the next
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise BadCloudsYaml(f"{path} does not parse{at}: {str(getattr(e, 'problem', e))}; fix it or point "
                                "OS_CLIENT_CONFIG_FILE at another", step="connect") from None
        clouds = data.get("clouds") if isinstance(data, dict) else None
        if not isinstance(clouds, dict):
            raise BadCloudsYaml(f"{path} has no 'clouds:' mapping of cloud names to settings", step="connect")
        entry = clouds.get(name)
        if entry is not None and not isinstance(entry, dict):
            raise BadCloudsYaml(f"{path}: cloud {name!r} is a {type(entry).__name__}, not a mapping of settings "
                                "(auth, region_name, ...)", step="connect")
        return  # the file openstacksdk uses
