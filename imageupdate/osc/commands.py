"""One cliff command class per command of :mod:`imageupdate.commands`: the same arguments, the same call,
the same human output and ``--json`` document, the same exit codes as ``imageupdate``. What this front door
adds: osc's ``--os-cloud`` (or $OS_CLOUD) is the cloud of a command that honours ``--cloud`` when it is not
given, SIGTERM is handled as Ctrl-C, and the process names itself in the locks it takes."""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

from cliff.command import Command as CliffCommand

from imageupdate.base import locks
from imageupdate.commands import by_name
from imageupdate.commands.output import Output
from imageupdate.commands.run import execute, interrupt_on_sigterm
from imageupdate.commands.spec import Command, Context, add_arguments


class ImageUpdateCommand(CliffCommand):
    """An imageupdate command under ``openstack imageupdate``."""

    auth_required = False  # no Keystone token: see imageupdate.osc.plugin
    command: ClassVar[Command]

    def get_description(self) -> str:
        return self.command.help

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().get_parser(prog_name)
        add_arguments(parser, self.command, cloud_default="--os-cloud, else $OS_CLOUD when set",
                      taken=self._taken_by_openstack)
        return parser

    def _taken_by_openstack(self, flag: str) -> bool:
        """A flag openstack's own parser takes before the command sees it: one of its options, or a prefix of
        one (argparse abbreviations: build's ``--os`` is ambiguous among ``--os-*``; ``--os-element`` stays)."""
        app_parser = getattr(self.app, "parser", None)
        if app_parser is None or not flag.startswith("--"):
            return False
        return any(option.startswith(flag) for option in app_parser._option_string_actions)

    def take_action(self, parsed_args: argparse.Namespace) -> int:
        argv = getattr(self.app, "command_options", None)  # osc-lib keeps the command line it ran
        locks.describe_process(" ".join(["openstack", *argv]) if argv else f"openstack imageupdate {self.command.name}")
        options: Any = getattr(self.app, "options", None)
        ctx = Context(Output(getattr(parsed_args, "json", False)),
                      default_cloud=getattr(options, "cloud", None) or None)
        with interrupt_on_sigterm():
            return execute(self.command, parsed_args, ctx)


def command_class(name: str) -> type[ImageUpdateCommand]:
    command = by_name(name)
    cls_name = "".join(w.capitalize() for w in name.replace("-", " ").split())
    return type(cls_name, (ImageUpdateCommand,), {"command": command, "__doc__": command.help,
                                                   "__module__": __name__})


# setup.cfg's openstack.imageupdate.v1 entry points name these (imageupdate_images_list -> ImagesList).
Build = command_class("build")
ImagesList = command_class("images list")
ImagesShow = command_class("images show")
ImagesDiff = command_class("images diff")
ImagesDelete = command_class("images delete")
ImagesVerify = command_class("images verify")
ImagesSign = command_class("images sign")
KeysCreate = command_class("keys create")
KeysList = command_class("keys list")
KeysTrust = command_class("keys trust")
KeysRevoke = command_class("keys revoke")
SiteUp = command_class("site up")
SiteStatus = command_class("site status")
SiteRecover = command_class("site recover")
SiteDown = command_class("site down")
SiteDestroy = command_class("site destroy")
SiteRebuild = command_class("site rebuild")
HeatStart = command_class("heat start")
HeatStatus = command_class("heat status")
HeatStop = command_class("heat stop")
HeatEnv = command_class("heat env")
CloudUp = command_class("cloud up")
CloudForgetHostKey = command_class("cloud forget-host-key")
Plan = command_class("plan")
Rehearse = command_class("rehearse")
CheckConfig = command_class("check-config")
Rollout = command_class("rollout")
Rollback = command_class("rollback")
Resume = command_class("resume")
Cancel = command_class("cancel")
Status = command_class("status")
Check = command_class("check")
Report = command_class("report")
