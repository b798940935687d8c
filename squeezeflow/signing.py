"""Signed manifests: ed25519 signatures over a registry entry's exact manifest bytes.

A content id proves that a manifest agrees with its files; it does not prove who wrote it: anyone who can
write to the bucket can publish a new, self-consistent entry and move an alias to it. A signature by a
key the consumer trusts does. It covers the manifest bytes, and the manifest names its own model, recipe
and artifact id (checked against the entry it is read from), so a signed manifest cannot be replayed as
another entry.

    signing (publish)       SQUEEZEFLOW_SIGNING_KEY: a PEM ed25519 private key, or the path of a file
                            holding one; or SQUEEZEFLOW_SIGNING_KEY_BLOCK: the name of a Prefect Secret
                            block holding the PEM
    verifying               SQUEEZEFLOW_TRUSTED_KEYS: PEM public keys, or paths of files holding them,
                            separated by os.pathsep (':')
    requiring a signature   SQUEEZEFLOW_REQUIRE_SIGNATURE=1, `--require-signature`, `require_signature=True`

Trust settings come from the consumer's environment only: anything stored in the bucket (a registry-side
"require signatures" flag, a list of keys) is exactly as writable as the entries it would vouch for.
The private key is never logged, printed or stored by squeezeflow; errors about it never quote it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput, UntrustedEntry
from .terminal import safe_text

SIGNATURE = "manifest.sig"  # beside manifest.json, in the registry and in pulled directories
ALGORITHM = "ed25519"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def key_id(public_key: Any) -> str:
    """A public key's fingerprint: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    key: Any = field(repr=False)  # Ed25519PrivateKey; repr=False keeps it out of any log or traceback
    key_id: str

    def sign(self, manifest_bytes: bytes) -> bytes:
        """The signature document stored as manifest.sig."""
        doc = {"algorithm": ALGORITHM, "key_id": self.key_id,
               "signature": base64.b64encode(self.key.sign(manifest_bytes)).decode()}
        return json.dumps(doc, sort_keys=True).encode()


def generate_keypair() -> tuple[bytes, bytes, str]:
    """(private PEM, public PEM, key id) of a fresh ed25519 key pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public, key_id(key.public_key())


def write_keypair(dest: Path) -> tuple[Path, Path, str]:
    """Write signing-key.pem (mode 0600) and signing-key.pub.pem into `dest`; never overwrites."""
    private_path, public_path = dest / "signing-key.pem", dest / "signing-key.pub.pem"
    if dest.exists() and not dest.is_dir():
        raise BadInput(f"{dest} is not a directory")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise BadInput(f"{p} already exists; keys are never overwritten: choose another --dest")
    private, public, kid = generate_keypair()
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL + 0600 from the start: the private key is never readable by others, not even briefly.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise BadInput(f"cannot write a key into {dest}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_bytes(public)
    return private_path, public_path, kid


def _private_key(pem: bytes, source: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):  # the message could quote key material: not shown
        raise BadInput(f"{source} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"{source} is not an ed25519 key (generate one: squeezeflow registry keygen --dest DIR)")
    return key


def signer_from_env() -> Signer | None:
    """The publisher's signing key, or None when none is configured."""
    value = os.environ.get("SQUEEZEFLOW_SIGNING_KEY", "").strip()
    block = os.environ.get("SQUEEZEFLOW_SIGNING_KEY_BLOCK", "").strip()
    if value.startswith("-----BEGIN"):
        key = _private_key(value.encode(), "SQUEEZEFLOW_SIGNING_KEY")
    elif value:
        path = Path(value).expanduser()
        if not path.is_file():  # a mistyped inline key must not be echoed: name the variable, not the value
            raise BadInput("SQUEEZEFLOW_SIGNING_KEY is neither a PEM private key nor the path of a readable file")
        key = _private_key(path.read_bytes(), f"SQUEEZEFLOW_SIGNING_KEY file {path}")
    elif block:
        key = _private_key(_secret_block(block), f"Prefect Secret block {block!r}")
    else:
        return None
    return Signer(key, key_id(key.public_key()))


def _secret_block(name: str, variable: str = "SQUEEZEFLOW_SIGNING_KEY_BLOCK") -> bytes:
    """The value of Prefect Secret block `name`, which the environment variable `variable` named (also
    export.hub_token's Hub token: the one place outside the flows that reads Prefect)."""
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except ValueError:
        raise BadInput(f"{variable}: no Prefect Secret block named {name!r}") from None
    except Exception as e:  # the Prefect API is unreachable or refuses: its message is not needed
        raise BadInput(f"{variable}: cannot read Prefect Secret block {name!r} "
                       f"({type(e).__name__}); check PREFECT_API_URL") from None
    return (value if isinstance(value, str) else json.dumps(value)).encode()


def _public_keys(pem: bytes, source: str) -> list[Any]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    blocks = [b"-----BEGIN" + part for part in pem.split(b"-----BEGIN")[1:]]
    if not blocks:
        raise BadInput(f"{source} holds no PEM public key")
    keys = []
    for block in blocks:
        try:
            key = serialization.load_pem_public_key(block)
        except (ValueError, TypeError):
            raise BadInput(f"{source} holds something that is not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BadInput(f"{source} holds a public key that is not ed25519")
        keys.append(key)
    return keys


def load_trusted_keys(specs: list[str]) -> dict[str, Any]:
    """{key id: public key} from PEM texts or paths of PEM files."""
    keys: dict[str, Any] = {}
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec.startswith("-----BEGIN"):
            found = _public_keys(spec.encode(), "a trusted key")
        else:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise BadInput(f"trusted key file {safe_text(path)} does not exist or is not a file")
            found = _public_keys(path.read_bytes(), f"trusted key file {safe_text(path)}")
        keys.update((key_id(k), k) for k in found)
    return keys


def _trusted_from_env() -> list[str]:
    value = os.environ.get("SQUEEZEFLOW_TRUSTED_KEYS", "")
    return [value] if value.strip().startswith("-----BEGIN") else value.split(os.pathsep)


def require_from_env() -> bool:
    value = os.environ.get("SQUEEZEFLOW_REQUIRE_SIGNATURE", "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise BadInput(f"SQUEEZEFLOW_REQUIRE_SIGNATURE={safe_text(value)!r}: use 1 or 0")
    return value in _TRUE


@dataclass(frozen=True)
class TrustPolicy:
    """Which signatures a consumer accepts. A signature by a trusted key must always verify (a manifest
    changed after signing is refused even when signatures are optional); with `require`, an unsigned
    entry or one signed by an unknown key is refused too."""
    require: bool = False
    trusted: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, require: bool | None = None, trusted_keys: list[str] | None = None) -> "TrustPolicy":
        """Explicit arguments win; None means the environment. Requiring a signature without any
        trusted key is refused here, before anything is downloaded."""
        require = require_from_env() if require is None else require
        specs = _trusted_from_env() + list(trusted_keys or [])
        trusted = load_trusted_keys(specs)
        if require and not trusted:
            raise BadInput("a signature is required but no key is trusted: set SQUEEZEFLOW_TRUSTED_KEYS to the "
                           "publisher's public key file (from squeezeflow registry keygen)")
        return cls(require, trusted)

    def check(self, manifest_bytes: bytes, signature: bytes | None, where: str) -> str | None:
        """The id of the trusted key that signed `manifest_bytes`, or None where an unverified entry is
        acceptable; UntrustedEntry (one line, registry text escaped) otherwise."""
        from cryptography.exceptions import InvalidSignature

        if signature is None:
            if self.require:
                raise UntrustedEntry(f"{where} is not signed, and a signature is required")
            return None
        doc = _parse_signature(signature)
        kid = doc.get("key_id") if doc else None
        if doc is None or kid not in self.trusted:
            if self.require:
                why = ("its manifest.sig is malformed" if doc is None
                       else f"it is signed by key {safe_text(kid)!r}, which is not trusted")
                raise UntrustedEntry(f"{where}: {why}, and a signature by a trusted key is required")
            return None
        try:
            self.trusted[kid].verify(base64.b64decode(doc["signature"], validate=True), manifest_bytes)
        except (InvalidSignature, ValueError):
            raise UntrustedEntry(f"{where}: the signature by trusted key {kid} does not match the manifest "
                                 "(modified after signing, or forged)") from None
        return kid


def _parse_signature(data: bytes) -> dict | None:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = (isinstance(doc, dict) and doc.get("algorithm") == ALGORITHM and isinstance(doc.get("key_id"), str)
          and isinstance(doc.get("signature"), str))
    return doc if ok else None


def signer_of(signature: bytes | None) -> str | None:
    """The key id a signature document claims (unverified), for display."""
    doc = _parse_signature(signature) if signature is not None else None
    return doc["key_id"] if doc else None
