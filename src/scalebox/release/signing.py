"""Ed25519 keys and signatures over RELEASE.json's exact bytes.

Keys are PEM (PKCS#8 private, SubjectPublicKeyInfo public); a signature is
the raw 64 bytes Ed25519 produces. Every cryptography exception is turned
into a ReleaseError here, at the boundary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from scalebox.release.errors import ReleaseError

SIGNATURE_SIZE = 64
MAX_KEY_BYTES = 16 * 1024  # a PEM ed25519 public key is 113 bytes


@dataclass(frozen=True)
class PublicKey:
    """A trusted public key and where it came from (for messages)."""

    source: str
    key: Ed25519PublicKey

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


def generate() -> tuple[bytes, bytes]:
    """A new key pair as (private PEM, public PEM)."""
    private = Ed25519PrivateKey.generate()
    return private_pem(private), public_pem(private.public_key())


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(key: Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex: short enough to compare by eye."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


def load_private_key(pem: bytes, source: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ReleaseError(
            f"the signing key from {source} cannot be read: {exc}",
            "give an unencrypted ed25519 private key in PEM form; ./do keygen makes one",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError(
            f"the signing key from {source} is not an ed25519 key",
            "make an ed25519 key with ./do keygen",
        )
    return key


def load_public_key(path: Path) -> PublicKey:
    try:
        with path.open("rb") as f:
            pem = f.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ReleaseError(
            f"cannot read public key {path}: {exc.strerror}",
            "check the path; trusted keys live in /etc/scalebox/keys/*.pub",
        ) from None
    if len(pem) > MAX_KEY_BYTES:
        raise ReleaseError(
            f"public key {path} is larger than {MAX_KEY_BYTES} bytes, so it is not a key",
            "replace it with the release-signing key (keys/release.pub from ./do keygen, "
            "113 bytes)",
        )
    return load_public_key_bytes(pem, str(path))


def load_public_key_bytes(pem: bytes, source: str) -> PublicKey:
    """A PEM ed25519 public key from ``source`` (a path, or where the bytes came from)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ReleaseError(
            f"{source} is not a PEM public key: {exc}",
            "replace it with the release-signing key (keys/release.pub from ./do keygen)",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError(
            f"{source} is not an ed25519 public key", "release keys are ed25519 (./do keygen)"
        )
    return PublicKey(source, key)


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def _made_by(key: PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        key.key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def find_signer(
    data: bytes,
    signature: bytes,
    keys: Sequence[PublicKey],
    retired: Sequence[PublicKey] = (),
) -> PublicKey:
    """The key among ``keys`` that made ``signature`` over ``data``; else ReleaseError.

    A signature by one of the ``retired`` keys is refused with a message of its
    own: the operator retired that key on purpose (docs/threat-model.md).
    """
    if not keys:
        raise ReleaseError(
            "no trusted release keys to check the signature with",
            "install the release-signing public key into /etc/scalebox/keys/",
        )
    if len(signature) != SIGNATURE_SIZE:
        raise ReleaseError(
            f"the release signature is {len(signature)} bytes, expected {SIGNATURE_SIZE}",
            "the release is damaged or unsigned; get it again",
        )
    for candidate in keys:
        if _made_by(candidate, data, signature):
            return candidate
    for old in retired:
        if _made_by(old, data, signature):
            raise ReleaseError(
                f"RELEASE.json is signed by the retired key {old.source} ({old.fingerprint}); "
                "refusing it",
                "a retired key is no longer trusted (it may have been stolen): get a release "
                "signed by a current key in /etc/scalebox/keys/; see docs/threat-model.md",
            )
    names = ", ".join(f"{k.source} ({k.fingerprint})" for k in keys)
    raise ReleaseError(
        f"RELEASE.json is not signed by a trusted key (tried {names})",
        "the release was changed after signing or signed by another key; get it from "
        "a trusted source, or add its public key to /etc/scalebox/keys/ if you trust it",
    )
