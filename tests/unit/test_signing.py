"""Signed releases (trust boundary, point 1): a release not signed by a key the fleet trusts is refused with
one line before anything is unpacked; keys are made, trusted, revoked and rotated by commands."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imageupdate.base.errors import IntegrityError, SigningKeyError, UntrustedRelease
from imageupdate.images import signing
from imageupdate.images.manifest import MANIFEST
from imageupdate.images.store import ImageStore
from imageupdate.images.unpack import ensure_release
from tests.conftest import SIGNING_KEY
from tests.unit.test_hostile_store import run


def listing(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``roots`` with its mode, size and mtime: what a refused operation must not change."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                st = p.lstat()
                out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    path = tmp_path / "site"
    path.mkdir()
    assert signing.trust_own_key(path) is not None  # the test session's key, as the operator's
    return path


@pytest.fixture
def other_key(tmp_path: Path) -> Path:
    key = tmp_path / "keys" / "other_ed25519"
    signing.create_key(key, "someone else")
    return key


def test_a_release_signed_by_a_trusted_key_is_accepted(store: ImageStore, publish: Any, fleet: Path) -> None:
    publish("R1")
    assert store.require_trusted("R1", fleet).release == "R1"
    assert store.signer("R1", fleet) == "operator"
    assert store.signer("R1", None) == "this-host"  # no fleet named: this host's own release key
    assert store.verify("R1", fleet).ok


def _refused(store: ImageStore, fleet: Path, release: str) -> str:
    before = listing(store.root, fleet)
    with pytest.raises(UntrustedRelease) as exc:
        ensure_release(store, release, fleet / "releases", fleet)
    assert listing(store.root, fleet) == before  # nothing unpacked, no temporary, nothing else written
    assert len(exc.value.message.splitlines()) == 1
    assert exc.value.release == release and exc.value.step == "signature"
    return exc.value.message


def test_an_unsigned_release_is_refused_before_anything_is_unpacked(
        store: ImageStore, publish: Any, fleet: Path) -> None:
    publish("R1")
    (store.path("R1") / signing.SIGNATURE).unlink()
    assert "is not signed" in _refused(store, fleet, "R1")
    assert not store.verify("R1", fleet).ok


def test_a_release_signed_by_an_untrusted_key_is_refused(
        store: ImageStore, publish: Any, fleet: Path, other_key: Path) -> None:
    publish("R1")
    signing.sign(store.path("R1"), other_key)
    fingerprint = signing.public_key(other_key, "x").fingerprint
    said = _refused(store, fleet, "R1")
    assert fingerprint in said and "does not trust" in said and "keys trust" in said


def test_a_manifest_changed_after_signing_is_refused(store: ImageStore, publish: Any, fleet: Path) -> None:
    publish("R1")
    path = store.path("R1") / MANIFEST
    data = json.loads(path.read_text())
    data["artifacts"]["root.tar.zst"]["sha256"] = "0" * 64  # another artifact, as a swapped image would need
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    assert "does not match its manifest" in _refused(store, fleet, "R1")


@pytest.mark.parametrize("how", ["symlink", "huge", "garbage", "empty"])
def test_a_damaged_signature_is_refused(store: ImageStore, publish: Any, fleet: Path, how: str) -> None:
    publish("R1")
    sig = store.path("R1") / signing.SIGNATURE
    sig.unlink()
    if how == "symlink":  # a valid signature of this very manifest, kept outside: still never read through a link
        outside = store.root.parent / "outside.sig"
        outside.write_bytes(signing.sign_bytes((store.path("R1") / MANIFEST).read_bytes(), SIGNING_KEY))
        sig.symlink_to(outside)
    elif how == "huge":
        sig.write_bytes(b"x" * (signing.MAX_SIGNATURE + 1))
    elif how == "garbage":
        sig.write_text("-----BEGIN SSH SIGNATURE-----\nnot base64\n-----END SSH SIGNATURE-----\n")
    else:
        sig.write_bytes(b"")
    said = _refused(store, fleet, "R1")
    assert "signature" in said


def test_a_fleet_that_trusts_no_key_refuses_everything(store: ImageStore, publish: Any, tmp_path: Path) -> None:
    publish("R1")
    empty = tmp_path / "empty-site"
    empty.mkdir()
    assert "trusts no release key" in _refused(store, empty, "R1")


def test_revoking_a_key_refuses_its_releases_and_rotation_brings_them_back(
        store: ImageStore, publish: Any, fleet: Path, other_key: Path) -> None:
    publish("R1")
    new = signing.public_key(other_key, "ops-2027")
    assert signing.trust(fleet, new) is True
    assert signing.trust(fleet, new) is False  # already there: no duplicate line
    store.sign("R1", other_key, fleet)  # re-signed with the new key while the old one is still trusted
    signing.revoke(fleet, "operator")
    assert store.signer("R1", fleet) == "ops-2027"
    publish("R2")  # signed by the old key only: refused once it is revoked
    assert "does not trust" in _refused(store, fleet, "R2")
    signing.revoke(fleet, new.fingerprint)  # by fingerprint too
    assert signing.read_trusted(signing.trust_file(fleet)) == []


def test_trust_and_revoke_refuse_what_they_cannot_do(fleet: Path, other_key: Path, tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="already trusted"):
        signing.trust(fleet, signing.public_key(other_key, "operator"))
    with pytest.raises(SigningKeyError, match="trusts no key named 'nobody'"):
        signing.revoke(fleet, "nobody")
    with pytest.raises(SigningKeyError, match="not allowed"):
        signing.public_key(other_key, "a name with spaces")
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    with pytest.raises(SigningKeyError, match="not an OpenSSH public key"):
        signing.public_key(bad, "x")
    with pytest.raises(SigningKeyError, match="already exists"):
        signing.create_key(other_key)
    signing.trust_file(fleet).write_text('evil namespaces="*" ssh-ed25519 AAAA\n')
    with pytest.raises(SigningKeyError, match="line 1"):
        signing.read_trusted(signing.trust_file(fleet))


def test_an_existing_fleet_keeps_its_own_list(fleet: Path) -> None:
    signing.revoke(fleet, "operator")
    assert signing.trust_own_key(fleet) is None  # a list emptied by its operator stays empty
    assert signing.read_trusted(signing.trust_file(fleet)) == []


def test_key_commands_and_verify_are_one_line_each(
        store: ImageStore, publish: Any, fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish("R1")
    root = ["--store", str(store.root)]
    key = tmp_path / "k" / "ops_ed25519"
    rc, out, err = run(capsys, "keys", "create", "--key", str(key), "--json")
    assert rc == 0, err
    assert json.loads(out)["fingerprint"].startswith("SHA256:") and key.is_file()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    rc, out, err = run(capsys, "keys", "create", "--key", str(key))
    assert rc == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run(capsys, "keys", "trust", f"{key}.pub", "--site", str(fleet), "--json")
    assert rc == 0 and json.loads(out)["name"] == "ops_ed25519", err
    rc, out, err = run(capsys, "keys", "list", "--site", str(fleet), "--json")
    assert [k["name"] for k in json.loads(out)["trusted"]] == ["operator", "ops_ed25519"]
    rc, out, err = run(capsys, "images", "verify", "R1", "--site", str(fleet), *root, "--json")
    assert rc == 0 and json.loads(out)["signer"] == "operator", err
    rc, out, err = run(capsys, "images", "sign", "R1", "--key", str(key), "--site", str(fleet), *root)
    assert rc == 0, err
    rc, out, err = run(capsys, "keys", "revoke", "operator", "--site", str(fleet))
    assert rc == 0, err
    rc, out, err = run(capsys, "images", "verify", "R1", "--site", str(fleet), *root, "--json")
    assert rc == 0 and json.loads(out)["signer"] == "ops_ed25519", err
    rc, out, err = run(capsys, "images", "verify", "R1", *root)  # no fleet named: this host's key, not ops
    assert rc == 1 and "this host's key" in err and "Traceback" not in err, err
    rc, out, err = run(capsys, "images", "sign", "R1", "--key", str(tmp_path / "missing"), "--site", str(fleet),
                       *root)
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run(capsys, "keys", "trust", str(tmp_path / "missing.pub"), "--site", str(fleet))
    assert rc == 2 and "not a readable" in err and len(err.strip().splitlines()) == 1


def test_the_signature_is_what_openssh_checks_by_itself(store: ImageStore, publish: Any, fleet: Path) -> None:
    """An operator can check a release with ssh-keygen alone, as the README says."""
    publish("R1")
    path = store.path("R1")
    with open(path / MANIFEST, "rb") as manifest:
        done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(signing.trust_file(fleet)), "-I", "operator",
                               "-n", signing.NAMESPACE, "-s", str(path / signing.SIGNATURE)], stdin=manifest,
                              capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_a_key_hidden_from_keys_list_is_refused_not_trusted(store: ImageStore, publish: Any, fleet: Path,
                                                            other_key: Path) -> None:
    """Seen in review: a vertical tab splits a line for Python but not for ssh-keygen, so a key hidden from
    'keys list' was trusted by the check."""
    publish("R1")
    signing.sign(store.path("R1"), other_key)
    stranger = signing.public_key(other_key, "x")
    with open(signing.trust_file(fleet), "ab") as f:
        f.write(f'\x0b#,* namespaces="imageupdate-release" {stranger.key_type} {stranger.key}\n'.encode())
    with pytest.raises(SigningKeyError, match="not printable ASCII"):
        ensure_release(store, "R1", fleet / "releases", fleet)


def test_an_artifact_swapped_after_the_check_is_never_used(store: ImageStore, publish: Any, fleet: Path) -> None:
    """Seen in review: the archive was hashed by path, then opened again to check and unpack it; a store writer
    could swap it in between. What is unpacked is a private copy, hashed as it is copied."""
    publish("R1")
    publish("R2")
    manifest = store.require_verified("R1", fleet)
    os.replace(store.path("R2") / "root.tar.zst", store.path("R1") / "root.tar.zst")  # the swap, after the check
    with pytest.raises(IntegrityError, match="changed after it was verified"):
        store.private_copy("R1", manifest, "root.tar.zst", fleet)
    assert [p.name for p in fleet.iterdir()] == [signing.TRUSTED]  # no copy left behind


def test_sign_refuses_what_the_fleet_does_not_already_trust(store: ImageStore, publish: Any, fleet: Path,
                                                            other_key: Path) -> None:
    """Seen in review: 'images sign' signed whatever was in the store with the new key."""
    publish("R1")
    path = store.path("R1") / MANIFEST
    path.write_text(path.read_text().replace('"built_at": "', '"built_at": "9', 1))  # edited by a store writer
    with pytest.raises(UntrustedRelease, match="does not match its manifest"):
        store.sign("R1", other_key, fleet)
    publish("R2")
    (store.path("R2") / signing.SIGNATURE).unlink()  # built before releases were signed
    with pytest.raises(UntrustedRelease, match="--adopt"):
        store.sign("R2", other_key, fleet)
    with open(store.path("R2") / "files.jsonl", "ab") as f:
        f.write(b"\n")  # and damaged since
    with pytest.raises(IntegrityError, match="files.jsonl"):
        store.sign("R2", other_key, fleet, adopt=True)


def test_adopting_an_unsigned_release_signs_exactly_what_was_checked(store: ImageStore, publish: Any,
                                                                     fleet: Path) -> None:
    publish("R1")
    (store.path("R1") / signing.SIGNATURE).unlink()
    store.sign("R1", SIGNING_KEY, fleet, adopt=True)
    assert store.signer("R1", fleet) == "operator"
    with pytest.raises(UntrustedRelease, match="already signed"):
        store.sign("R1", SIGNING_KEY, fleet, adopt=True)


def test_a_key_with_a_passphrase_fails_at_once(tmp_path: Path) -> None:
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)], check=True)
    with pytest.raises(SigningKeyError, match="passphrase"):
        signing.sign_bytes(b"manifest", key)
