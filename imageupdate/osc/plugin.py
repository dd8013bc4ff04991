"""The python-openstackclient plugin module of imageupdate, in the shape osc-lib asks of every client plugin.

``openstack`` imports it at start (keep it light: the commands are loaded only when one runs). imageupdate
needs no client object from Keystone: its commands reach the local site's Heat, or a cloud's through
clouds.yaml, by themselves, and set ``auth_required = False``.
"""

from __future__ import annotations

import argparse
from typing import Any

API_NAME = "imageupdate"
API_VERSION_OPTION = "os_imageupdate_api_version"
DEFAULT_API_VERSION = "1"
API_VERSIONS = ("1",)  # commands: the entry point group openstack.imageupdate.v1


def make_client(instance: Any) -> None:
    """No client: each command opens what it drives (the site's Heat, or the cloud of --cloud/--os-cloud)."""
    return None


def build_option_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--os-imageupdate-api-version", metavar="<imageupdate-api-version>",
                        default=DEFAULT_API_VERSION,
                        help=f"imageupdate command set version, default={DEFAULT_API_VERSION}")
    return parser
