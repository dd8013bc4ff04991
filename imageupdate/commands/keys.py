"""keys: the operator's release signing key, and the keys a fleet trusts."""

from __future__ import annotations

from pathlib import Path

from imageupdate import api
from imageupdate.commands.spec import FLEET, Command, arg
from imageupdate.images.signing import DEFAULT_KEY


def _key_list(t: api.TrustedKeys) -> str:
    return "\n".join(f"{k['name']} {k['type']} {k['fingerprint']}" for k in t.keys) or f"{t.fleet} trusts no key"


COMMANDS = [
    Command("keys create", "make a signing key (ed25519, OpenSSH format)",
            lambda a, c: api.create_key(a.key),
            lambda k: (f"made {k.key} ({k.fingerprint}); keep it secret and back it up; sites trust it with "
                       f"'imageupdate keys trust {k.key}.pub'"),
            honours=frozenset(), args=(
                arg("--key", type=Path, metavar="FILE",
                    help=f"where (default: $IMAGEUPDATE_SIGNING_KEY or {DEFAULT_KEY}); FILE.pub beside it"),
            )),
    Command("keys list", "the keys whose releases the site (or --cloud fleet) accepts",
            lambda a, c: api.trusted_keys(**c.at), _key_list, honours=FLEET),
    Command("keys trust", "accept releases signed by this key",
            lambda a, c: api.trust_key(a.public_key, a.name, **c.at),
            lambda t: f"{t.fleet} {'now trusts' if t.added else 'already trusted'} {t.name} ({t.fingerprint})",
            honours=FLEET, args=(
                arg("public_key", type=Path, metavar="KEY.pub"),
                arg("--name", default=None, help="a name for it (default: the file's name without .pub)"),
            )),
    Command("keys revoke", "stop accepting releases signed by a key",
            lambda a, c: api.revoke_key(a.key, **c.at),
            lambda r: f"{r.fleet} no longer trusts {r.name}; releases signed only by it are refused from now on",
            honours=FLEET, args=(arg("key", metavar="NAME|FINGERPRINT"),)),
]
