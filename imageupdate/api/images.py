"""Releases and their signatures: build, list, show, diff, delete, verify, sign; the operator's signing key
and the keys a fleet trusts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageupdate.api.fleets import PathLike, fleet_dir, open_store
from imageupdate.build.builder import Builder, BuildEvent, BuildRequest, BuildResult
from imageupdate.build.elements import DEFAULT_OS_ELEMENT
from imageupdate.images import signing
from imageupdate.images.diff import ReleaseDiff
from imageupdate.images.manifest import Manifest
from imageupdate.images.store import VerifyResult


def build(release: str, elements: list[str] | None = None, *, elements_paths: list[PathLike] | None = None,
          os_element: str = DEFAULT_OS_ELEMENT, force: bool = False, signing_key: PathLike | None = None,
          store: PathLike | None = None, on_event: Callable[[BuildEvent], None] | None = None) -> BuildResult:
    """Build ``release`` with diskimage-builder, sign it and publish it to the store. ``on_event`` sees each
    step (``BuildEvent``: its stage, its release; stage ``wait`` while another build holds the DIB cache)."""
    request = BuildRequest(release=release, elements=list(elements or []),
                           elements_paths=[Path(p) for p in elements_paths or []], os_element=os_element,
                           force=force, signing_key=None if signing_key is None else Path(signing_key))
    return Builder(open_store(store)).build(request, on_event)


@dataclass(frozen=True)
class Releases:
    store: Path
    manifests: list[Manifest]
    damaged: dict[str, str] = field(default_factory=dict)  # release -> why it cannot be read

    def to_dict(self) -> dict[str, Any]:
        return {"store": str(self.store), "releases": [
            {"release": m.release, "built_at": m.built_at, "elements": m.elements, "packages": len(m.packages),
             "kernel": m.kernel, "artifacts": {k: asdict(v) for k, v in m.artifacts.items()}}
            for m in self.manifests
        ], "damaged": [{"release": r, "reason": why} for r, why in self.damaged.items()]}


def releases(*, store: PathLike | None = None) -> Releases:
    s = open_store(store)
    return Releases(s.root, [s.manifest(r) for r in s.releases()], s.damaged())


def show(release: str, *, store: PathLike | None = None) -> Manifest:
    return open_store(store).manifest(release)


def diff(old: str, new: str, *, store: PathLike | None = None) -> ReleaseDiff:
    return open_store(store).diff(old, new)


@dataclass(frozen=True)
class Deleted:
    release: str

    def to_dict(self) -> dict[str, Any]:
        return {"release": self.release, "deleted": True}


def delete(release: str, *, store: PathLike | None = None) -> Deleted:
    open_store(store).delete(release)
    return Deleted(release)


@dataclass(frozen=True)
class Verification:
    result: VerifyResult
    trusted_by: Path | None  # the fleet whose keys were asked; None: this host's own release key

    @property
    def ok(self) -> bool:
        return self.result.ok

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"release": r.release, "ok": r.ok, "checked": r.checked, "problems": r.problems, "signer": r.signer,
                "trusted_by": str(self.trusted_by) if self.trusted_by else None}


def verify(release: str, *, site: PathLike | None = None, store: PathLike | None = None,
           cloud: str | None = None) -> Verification:
    """Recompute a release's checksums and check its signature against the keys the fleet (``site`` or
    ``cloud``) trusts; with neither, against this host's own release key."""
    fleet = fleet_dir(site, store, cloud) if site is not None or cloud is not None else None
    return Verification(open_store(store).verify(release, fleet), fleet)


@dataclass(frozen=True)
class Signed:
    release: str
    key: Path
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"release": self.release, "key": str(self.key), "fingerprint": self.fingerprint}


def sign(release: str, key: PathLike | None = None, *, adopt: bool = False, site: PathLike | None = None,
         store: PathLike | None = None, cloud: str | None = None) -> Signed:
    """Sign again a release the fleet trusts, with another key (rotation); ``adopt``: one never signed."""
    path = signing.require_private_key(Path(key) if key else signing.default_key(), create=False)
    return Signed(release, path, open_store(store).sign(release, path, fleet_dir(site, store, cloud), adopt=adopt))


@dataclass(frozen=True)
class KeyMade:
    key: Path
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": str(self.key), "public_key": f"{self.key}.pub", "fingerprint": self.fingerprint}


def create_key(key: PathLike | None = None) -> KeyMade:
    """Make a signing key (ed25519, OpenSSH format) at ``key`` (default: the operator's), KEY.pub beside it."""
    path = Path(key) if key else signing.default_key()
    return KeyMade(path, signing.create_key(path).fingerprint)


@dataclass(frozen=True)
class TrustedKeys:
    fleet: Path
    keys: list[dict[str, str]]  # name, type, fingerprint

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": str(self.fleet), "trusted": self.keys}


def trusted_keys(*, site: PathLike | None = None, store: PathLike | None = None,
                 cloud: str | None = None) -> TrustedKeys:
    fleet = fleet_dir(site, store, cloud)
    return TrustedKeys(fleet, [{"name": k.name, "type": k.key_type, "fingerprint": signing.fingerprint_of(k)}
                               for k in signing.read_trusted(signing.trust_file(fleet))])


@dataclass(frozen=True)
class KeyTrusted:
    fleet: Path
    name: str
    fingerprint: str
    added: bool  # False: it was trusted already

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": str(self.fleet), "name": self.name, "fingerprint": self.fingerprint, "added": self.added}


def trust_key(public_key: PathLike, name: str | None = None, *, site: PathLike | None = None,
              store: PathLike | None = None, cloud: str | None = None) -> KeyTrusted:
    """Accept releases signed by ``public_key`` (named ``name``, default the file's name without .pub)."""
    fleet = fleet_dir(site, store, cloud)
    path = Path(public_key)
    key = signing.public_key(path, name or path.name.removesuffix(".pub"))
    return KeyTrusted(fleet, key.name, key.fingerprint, signing.trust(fleet, key))


@dataclass(frozen=True)
class KeyRevoked:
    fleet: Path
    name: str

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": str(self.fleet), "name": self.name, "revoked": True}


def revoke_key(key: str, *, site: PathLike | None = None, store: PathLike | None = None,
               cloud: str | None = None) -> KeyRevoked:
    """Stop accepting releases signed by the key of this name or fingerprint."""
    fleet = fleet_dir(site, store, cloud)
    return KeyRevoked(fleet, signing.revoke(fleet, key).name)
