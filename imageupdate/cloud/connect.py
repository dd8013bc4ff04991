"""One authenticated connection to a cloud named in clouds.yaml, with the errors a cloud user meets said in one
line: an unknown cloud name, an authentication failure, a missing Heat or Glance endpoint."""

from __future__ import annotations

import logging
from typing import Any

from imageupdate.errors import InputError, OperationError


class UnknownCloud(InputError):
    """A cloud name that no clouds.yaml on openstacksdk's search path defines."""


class CloudAuthFailed(InputError):
    """The cloud refused the credentials of its clouds.yaml entry."""


class MissingEndpoint(InputError):
    """The cloud's catalog has no endpoint for a service imageupdate needs (Heat, Glance, Nova)."""


class CloudUnreachable(OperationError):
    """The cloud's identity endpoint does not answer."""


NEEDED = {"orchestration": "Heat", "image": "Glance", "compute": "Nova"}


def connect(name: str) -> Any:
    """An ``openstack.Connection`` to ``name``, authenticated, with every needed endpoint in its catalog."""
    import openstack
    from keystoneauth1 import exceptions as ksa
    from openstack import exceptions as sdk

    logging.getLogger("keystoneauth").setLevel(logging.ERROR)  # its warnings would add lines to our one-line error

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
    return conn


def _first(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
