"""Signed releases: who built a release, proven before anything of it is used.

``build`` signs each release's ``manifest.json`` with the operator's key (OpenSSH ``ssh-keygen -Y sign``,
an ed25519 key, namespace ``imageupdate-release``); the signature is ``manifest.json.sig`` beside it. The
manifest records the sha256 of every artifact, so the signature covers the root image and the file index
through it. A site or cloud fleet keeps the keys it trusts in its own directory, ``trusted_signers``, in
OpenSSH's ``allowed_signers`` format (one ``NAME namespaces="imageupdate-release" KEY`` line per key). A
release whose signature is missing, damaged, or made by a key not in that file is refused before it is
unpacked, uploaded or rebuilt (``UntrustedRelease``, one line).

The operator's key is ``$IMAGEUPDATE_SIGNING_KEY`` or ``/etc/imageupdate/release_ed25519``; the first
build makes it when it is missing, and a new site or cloud fleet trusts it (``trust_own_key``). Other keys
are added with ``imageupdate keys trust`` and removed with ``keys revoke``; rotation is: make a new key,
trust it, re-sign the releases still needed (``images sign``), revoke the old one.

Signatures are checked on the manifest's bytes as read once (the same bytes are then parsed), with
``ssh-keygen`` as the one verifier: no cryptography of our own.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imageupdate.base.errors import SigningKeyError, UntrustedRelease

NAMESPACE = "imageupdate-release"
SIGNATURE = "manifest.json.sig"
TRUSTED = "trusted_signers"
DEFAULT_KEY = Path("/etc/imageupdate/release_ed25519")
MAX_SIGNATURE = 64 * 1024  # bytes: an SSH signature is well under 1 KiB
MAX_TRUSTED = 1024 * 1024
SSH_KEYGEN_TIMEOUT = 30.0  # seconds
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa",
              "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
_FINGERPRINT = re.compile(r"(SHA256:[A-Za-z0-9+/]{43})")
_ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C"}


def default_key() -> Path:
    return Path(os.environ.get("IMAGEUPDATE_SIGNING_KEY") or DEFAULT_KEY)


def trust_file(fleet_dir: Path) -> Path:
    return fleet_dir / TRUSTED


@dataclass(frozen=True)
class Signer:
    """A trusted key: its name in ``trusted_signers``, its type and base64 blob, and its fingerprint."""

    name: str
    key_type: str
    key: str
    fingerprint: str

    def line(self) -> str:
        return f'{self.name} namespaces="{NAMESPACE}" {self.key_type} {self.key}\n'


def _run(args: list[str], data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """ssh-keygen, never waiting on a terminal (stdin is the data or nothing: a key with a passphrase fails
    at once instead of asking) and bounded in time."""
    try:
        return subprocess.run(["ssh-keygen", *args], input=data if data is not None else b"", capture_output=True,
                              env=_ENV, timeout=SSH_KEYGEN_TIMEOUT, check=False)
    except FileNotFoundError:
        raise SigningKeyError("ssh-keygen is missing: apt-get install openssh-client") from None
    except subprocess.TimeoutExpired:
        raise SigningKeyError(f"ssh-keygen {args[0]} {args[1] if len(args) > 1 else ''} did not finish within "
                              f"{SSH_KEYGEN_TIMEOUT:.0f} s (a key with a passphrase? imageupdate signs unattended)"
                              ) from None


def _said(done: subprocess.CompletedProcess[bytes]) -> str:
    lines = done.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
    return lines[-1]


# the operator's key --------------------------------------------------------------------------------------

def create_key(path: Path, comment: str = "imageupdate release key") -> Signer:
    """A new ed25519 key at ``path`` (0600) and ``path.pub``; refuses to replace one."""
    if path.exists() or path.with_name(path.name + ".pub").exists():
        raise SigningKeyError(f"{path} already exists: to rotate, make the new key at another path with "
                              "'imageupdate keys create --key NEW'")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    done = _run(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    if done.returncode != 0:
        raise SigningKeyError(f"ssh-keygen could not make a key at {path}: {_said(done)}")
    return public_key(path.with_name(path.name + ".pub"), "operator")


def public_key(path: Path, name: str) -> Signer:
    """The public key in ``path`` (an OpenSSH ``.pub`` file, or a private key beside its ``.pub``)."""
    if not path.name.endswith(".pub") and path.with_name(path.name + ".pub").is_file():
        path = path.with_name(path.name + ".pub")
    if not _NAME.fullmatch(name):
        raise SigningKeyError(f"key name {name!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ @ + -")
    try:
        with open(path, "rb") as f:
            text = f.read(16 * 1024).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SigningKeyError(f"{path} is not a readable OpenSSH public key ({getattr(e, 'strerror', e)})") from None
    fields = text.split()
    if len(fields) < 2 or fields[0] not in _KEY_TYPES or not re.fullmatch(r"[A-Za-z0-9+/=]+", fields[1]):
        raise SigningKeyError(f"{path} is not an OpenSSH public key (expected 'ssh-ed25519 AAAA...')")
    done = _run(["-l", "-E", "sha256", "-f", "/dev/stdin"], f"{fields[0]} {fields[1]}\n".encode())
    found = _FINGERPRINT.search(done.stdout.decode(errors="replace"))
    if done.returncode != 0 or not found:
        raise SigningKeyError(f"{path} is not a usable public key: {_said(done)}")
    return Signer(name, fields[0], fields[1], found.group(1))


def require_private_key(path: Path, *, create: bool) -> Path:
    """``path`` when it holds a private key; made when missing and ``create`` (the default key)."""
    if not path.exists():
        if not create:
            raise SigningKeyError(f"signing key {path} does not exist: make one with 'imageupdate keys create "
                                  f"--key {path}' or leave --key out to use {default_key()}")
        create_key(path)
    if not path.is_file():
        raise SigningKeyError(f"signing key {path} is not a file")
    return path


def sign_bytes(manifest: bytes, key: Path) -> bytes:
    """The signature of exactly ``manifest`` (given on stdin: nothing is read again by path)."""
    done = _run(["-Y", "sign", "-q", "-f", str(key.absolute()), "-n", NAMESPACE], manifest)
    if done.returncode != 0 or not done.stdout.startswith(b"-----BEGIN SSH SIGNATURE-----"):
        raise SigningKeyError(f"ssh-keygen could not sign with {key}: {_said(done)} (a key with a passphrase "
                              "cannot be used: imageupdate signs unattended)")
    return done.stdout


def write_signature(directory: Path, signature: bytes) -> Path:
    """``signature`` as ``directory``/manifest.json.sig, replaced atomically (never through a link)."""
    tmp = directory / f".{SIGNATURE}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(signature)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / SIGNATURE)
    finally:
        tmp.unlink(missing_ok=True)
    return directory / SIGNATURE


def sign(directory: Path, key: Path) -> Path:
    """Sign ``directory``/manifest.json with ``key`` (a staged build's own manifest)."""
    with open(directory / "manifest.json", "rb") as f:
        return write_signature(directory, sign_bytes(f.read(), key))


# what a fleet trusts -------------------------------------------------------------------------------------

def read_trusted(path: Path) -> list[Signer]:
    """The keys in a ``trusted_signers`` file; a line that is not ours is refused, naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SigningKeyError(f"{path} cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_TRUSTED + 1)
    if len(raw) > MAX_TRUSTED:
        raise SigningKeyError(f"{path} is larger than {MAX_TRUSTED} bytes: not a list of keys")
    bad = next((i for i, b in enumerate(raw) if not (32 <= b < 127 or b == 10)), None)
    if bad is not None:  # ssh-keygen splits lines only at \n, Python at more: one reading for both
        raise SigningKeyError(f"{path} has a byte that is not printable ASCII (offset {bad}): a list of keys has "
                              "none; rewrite it with 'imageupdate keys trust' and 'keys revoke'")
    out = []
    for n, line in enumerate(raw.decode("ascii").split("\n"), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r'(\S+) namespaces="' + re.escape(NAMESPACE) + r'" (\S+) ([A-Za-z0-9+/=]+)', line)
        if not m or not _NAME.fullmatch(m.group(1)) or m.group(2) not in _KEY_TYPES or m.group(1).startswith("#"):
            raise SigningKeyError(f"{path} line {n} is not a trusted key of imageupdate; fix it with "
                                  "'imageupdate keys revoke' and 'keys trust', or by hand")
        out.append(Signer(m.group(1), m.group(2), m.group(3), ""))
    return out


def _write_trusted(path: Path, signers: list[Signer]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write("# keys whose release signatures this fleet accepts (imageupdate keys trust / revoke)\n")
            f.writelines(s.line() for s in signers)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def trust(fleet_dir: Path, key: Signer) -> bool:
    """Add ``key`` to the fleet's trusted keys; False when that key (or name) is already there."""
    path = trust_file(fleet_dir)
    have = read_trusted(path)
    for s in have:
        if (s.key_type, s.key) == (key.key_type, key.key):
            return False
        if s.name == key.name:
            raise SigningKeyError(f"a key named {key.name!r} is already trusted by {fleet_dir}; choose another "
                                  "--name, or revoke it first")
    _write_trusted(path, [*have, key])
    return True


def revoke(fleet_dir: Path, name_or_fingerprint: str) -> Signer:
    path = trust_file(fleet_dir)
    have = read_trusted(path)
    for s in have:
        if name_or_fingerprint in (s.name, fingerprint_of(s)):
            _write_trusted(path, [k for k in have if k is not s])
            return s
    names = ", ".join(s.name for s in have) or "none"
    raise SigningKeyError(f"{fleet_dir} trusts no key named {name_or_fingerprint!r} (trusted: {names})")


def fingerprint_of(signer: Signer) -> str:
    if signer.fingerprint:
        return signer.fingerprint
    done = _run(["-l", "-E", "sha256", "-f", "/dev/stdin"], f"{signer.key_type} {signer.key}\n".encode())
    found = _FINGERPRINT.search(done.stdout.decode(errors="replace"))
    return found.group(1) if found else "?"


def trust_own_key(fleet_dir: Path) -> Signer | None:
    """A fleet without a trust list trusts this host's signing key (the operator who makes the fleet is the
    one who builds for it); None when there is no such key yet or the fleet already has its list."""
    if trust_file(fleet_dir).exists():
        return None
    pub = default_key().with_name(default_key().name + ".pub")
    if not pub.is_file():
        _write_trusted(trust_file(fleet_dir), [])
        return None
    key = public_key(pub, "operator")
    _write_trusted(trust_file(fleet_dir), [key])
    return key


# checking a release --------------------------------------------------------------------------------------

def read_signature(directory: Path, release: str) -> bytes:
    try:
        fd = os.open(directory / SIGNATURE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UntrustedRelease(f"release {release!r} is not signed (no {SIGNATURE}): sign it with 'imageupdate "
                               f"images sign {release}' if you built it, or rebuild it", release=release,
                               step="signature") from None
    except OSError as e:
        raise UntrustedRelease(f"the signature of release {release!r} cannot be read ({e.strerror})",
                               release=release, step="signature") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_SIGNATURE + 1)
    if len(raw) > MAX_SIGNATURE:
        raise UntrustedRelease(f"the signature of release {release!r} is larger than {MAX_SIGNATURE} bytes: "
                               "not an SSH signature", release=release, step="signature")
    return raw


def signed_by(manifest: bytes, signature: bytes, release: str) -> str:
    """The fingerprint of the key that made ``signature`` over ``manifest``, checked cryptographically
    but against no trust list; ``UntrustedRelease`` when it does not match."""
    with tempfile.TemporaryDirectory(prefix="imageupdate-sig-") as tmp:
        sig = Path(tmp) / "manifest.json.sig"
        sig.write_bytes(signature)
        done = _run(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig)], manifest)
    found = _FINGERPRINT.search(done.stdout.decode(errors="replace"))
    if done.returncode != 0 or not found:
        raise UntrustedRelease(f"the signature of release {release!r} does not match its manifest ({_said(done)}):"
                               f" the manifest was changed after it was signed; rebuild it", release=release,
                               step="signature")
    return found.group(1)


def check(manifest: bytes, signature: bytes, fleet_dir: Path, release: str) -> str:
    """The name of the key ``fleet_dir`` trusts that signed ``manifest``; ``UntrustedRelease`` otherwise."""
    trusted = read_trusted(trust_file(fleet_dir))
    if not trusted:
        signed_by(manifest, signature, release)  # a broken signature says so first
        raise UntrustedRelease(f"{fleet_dir} trusts no release key yet: trust the key that builds its releases "
                               f"with 'imageupdate keys trust KEY.pub' (this host's is {default_key()}.pub)",
                               release=release, step="signature")
    return check_signers(manifest, signature, trusted, str(fleet_dir), release)


def own_key() -> list[Signer]:
    """This host's release key as a one-key trust list (what 'images verify' uses without a fleet)."""
    pub = default_key().with_name(default_key().name + ".pub")
    return [public_key(pub, "this-host")] if pub.is_file() else []


def check_signers(manifest: bytes, signature: bytes, signers: list[Signer], who: str, release: str) -> str:
    """The name of the key among ``signers`` that signed ``manifest``. ssh-keygen reads a list rendered from
    the parsed keys (never the file as given: what it accepts is exactly what ``keys list`` shows)."""
    fingerprint = signed_by(manifest, signature, release)
    with tempfile.TemporaryDirectory(prefix="imageupdate-sig-") as tmp:
        sig, allowed = Path(tmp) / "manifest.json.sig", Path(tmp) / "allowed_signers"
        sig.write_bytes(signature)
        allowed.write_text("".join(s.line() for s in signers))
        found = _run(["-Y", "find-principals", "-s", str(sig), "-f", str(allowed), "-n", NAMESPACE])
        names = [n for n in found.stdout.decode(errors="replace").split() if n in {s.name for s in signers}]
        if found.returncode != 0 or not names:
            raise UntrustedRelease(f"release {release!r} is signed by key {fingerprint}, which {who} does "
                                   f"not trust: 'imageupdate keys trust KEY.pub' if it is yours", release=release,
                                   step="signature")
        done = _run(["-Y", "verify", "-f", str(allowed), "-I", names[0], "-n", NAMESPACE, "-s", str(sig)], manifest)
    if done.returncode != 0:
        raise UntrustedRelease(f"the signature of release {release!r} by {names[0]!r} does not verify: "
                               f"{_said(done)}", release=release, step="signature")
    return names[0]
