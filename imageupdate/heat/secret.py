"""Only imageupdate talks to a site's local Heat: a per-site secret in front of its API.

The local Heat listens on loopback with ``noauth`` (no Keystone on one machine), so without this any
local user who can reach the port could signal SUCCESS for a gate whose checks failed. The secret lives
in ``SITE/heat/secret`` (mode 0600, in a site directory of mode 0700); imageupdate sends it as
``X-Auth-Token``; this paste filter, first in Heat's pipeline, answers 401 to any request without it.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def ensure(path: Path) -> str:
    """The site's secret, made on first use: written whole under a temporary name and linked into place,
    so a reader never sees it empty and two first users agree on one."""
    try:
        found = path.read_text().strip()
        if found:
            return found
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    try:
        os.link(tmp, path)  # fails if another made it first: theirs stands
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


class SecretAuth:
    def __init__(self, app: Wsgi, secret: str) -> None:
        self.app = app
        self.secret = secret.encode()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = str(environ.get("HTTP_X_AUTH_TOKEN", "")).encode()
        if not self.secret or not hmac.compare_digest(given, self.secret):
            start_response("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b"this Heat answers only the imageupdate site it belongs to (X-Auth-Token)\n"]
        return self.app(environ, start_response)


def filter_factory(global_conf: dict[str, Any], **local_conf: str) -> Callable[[Wsgi], Wsgi]:
    """paste.deploy entry point: ``secret_file`` names the file holding the secret."""
    secret = Path(local_conf["secret_file"]).read_text().strip()
    return lambda app: SecretAuth(app, secret)
