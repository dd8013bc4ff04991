"""build, and the image store: images list, show, diff, delete, verify, sign."""

from __future__ import annotations

import argparse
from pathlib import Path

from imageupdate import api
from imageupdate.build.builder import BuildEvent
from imageupdate.build.elements import DEFAULT_OS_ELEMENT
from imageupdate.commands import render
from imageupdate.commands.spec import FLEET, Command, Context, arg
from imageupdate.images.signing import DEFAULT_KEY


def build(args: argparse.Namespace, ctx: Context) -> api.BuildResult:
    with ctx.out.progress(f"building {args.release}", label=args.release) as progress:

        def on_event(e: BuildEvent) -> None:
            if e.stage == "wait":  # said in a plain line, also on a terminal: a wait is not a hang
                progress.say(e.detail)
            else:
                progress.update(f"{e.stage} {e.phase}".strip(), e.detail)

        return api.build(args.release, args.element, elements_paths=args.elements_path, os_element=args.os_element,
                         force=args.force, signing_key=args.key, on_event=on_event, **ctx.at)


BUILD = Command(
    "build", "build a release image with diskimage-builder", build, render.build_result, args=(
        arg("release", help="release id, e.g. R1 or 2026.11.1"),
        arg("--element", "-e", action="append", default=[], metavar="E", help="element to include (repeatable)"),
        arg("--elements-path", action="append", default=[], type=Path, metavar="DIR",
            help="extra elements directory, searched after imageupdate's own (repeatable)"),
        arg("--os", "--os-element", dest="os_element", default=DEFAULT_OS_ELEMENT, metavar="ELEMENT",
            help=f"operating-system element (default: {DEFAULT_OS_ELEMENT})"),
        arg("--force", action="store_true", help="replace an existing release"),
        arg("--key", type=Path, metavar="FILE", help="sign the release with this OpenSSH private key (default: "
            f"$IMAGEUPDATE_SIGNING_KEY or {DEFAULT_KEY}, made on first use)"),
    ))


def _verify_failure(v: api.Verification) -> str | None:
    if v.ok:
        return None
    r = v.result
    return (f"release {r.release!r} failed verification: {'; '.join(r.problems)}"
            + ("" if r.signature_only else f"; rebuild it with 'imageupdate build {r.release} --force'"))


RELEASE = arg("release")
COMMANDS = [
    BUILD,
    Command("images list", "list releases", lambda a, c: api.releases(**c.at),
            lambda r: render.release_list(r.manifests, r.damaged)),
    Command("images show", "show a release's manifest",
            lambda a, c: api.show(a.release, **c.at), render.manifest, args=(RELEASE,)),
    Command("images diff", "compare two releases",
            lambda a, c: api.diff(a.old, a.new, **c.at), render.diff,
            args=(arg("old"), arg("new"))),
    Command("images delete", "delete a release",
            lambda a, c: api.delete(a.release, **c.at), lambda r: f"deleted {r.release}",
            args=(RELEASE,)),
    Command("images verify", "recompute a release's checksums and check its signature (against the keys the "
            "site, or --cloud fleet, trusts)", lambda a, c: api.verify(a.release, **c.at),
            lambda v: render.verify(v.result), args=(RELEASE,), honours=FLEET, failure=_verify_failure),
    Command("images sign", "sign again a release the site (or --cloud fleet) trusts, with another key (rotation)",
            lambda a, c: api.sign(a.release, a.key, adopt=a.adopt, **c.at),
            lambda s: f"signed {s.release} with {s.key} ({s.fingerprint})", honours=FLEET, args=(
                RELEASE,
                arg("--key", type=Path, metavar="FILE",
                    help=f"OpenSSH private key (default: $IMAGEUPDATE_SIGNING_KEY or {DEFAULT_KEY})"),
                arg("--adopt", action="store_true", help="sign a release that has no signature at all (built "
                    "before imageupdate signed releases); its checksums are checked, its origin is yours to vouch "
                    "for"),
            )),
]
