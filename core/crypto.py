"""Field encryption (AES-256-GCM) and keyed pseudonyms.

Ciphertext layout: ``0x01 | len(key_id) | key_id | nonce(12) | ciphertext+tag``. The key id travels
with every value, so rotation can add a new primary key while rows written under older keys stay
readable until they are re-encrypted.

Keys come from ``PARLEY_ENCRYPTION_KEYS`` as ``id:base64key[,id:base64key…]``; the first is the
primary (used to encrypt). In development, when it is unset, a key is generated once into
``$PARLEY_DATA_DIR/encryption-keys`` (mode 0600). Production refuses to start without keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from core.config import Settings, get_settings

_VERSION = 1
_NONCE = 12


class KeyError_(Exception):  # noqa: N801  # avoid shadowing the builtin KeyError
    """Missing, malformed or unknown encryption key."""


@dataclass(frozen=True)
class Keyring:
    keys: tuple[tuple[str, bytes], ...]

    @property
    def primary_id(self) -> str:
        return self.keys[0][0]

    def key(self, key_id: str) -> bytes:
        for kid, key in self.keys:
            if kid == key_id:
                return key
        raise KeyError_(f"unknown encryption key id {key_id!r}")

    def encrypt(self, plaintext: str) -> bytes:
        kid, key = self.keys[0]
        nonce = os.urandom(_NONCE)
        kid_bytes = kid.encode()
        header = bytes([_VERSION, len(kid_bytes)]) + kid_bytes
        return header + nonce + AESGCM(key).encrypt(nonce, plaintext.encode(), header)

    def decrypt(self, blob: bytes) -> str:
        if len(blob) < 2 or blob[0] != _VERSION:
            raise KeyError_("not a Parley ciphertext")
        kid_len = blob[1]
        header = blob[: 2 + kid_len]
        kid = header[2:].decode()
        nonce = blob[2 + kid_len : 2 + kid_len + _NONCE]
        return AESGCM(self.key(kid)).decrypt(nonce, blob[2 + kid_len + _NONCE :], header).decode()

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        return blob[2 : 2 + blob[1]].decode()

    def pseudonym(self, value: str) -> str:
        """A stable keyed hash for logs and metrics: the same contact, never its identifier."""
        digest = hmac.new(self.keys[-1][1], b"pseudonym:" + value.encode(), hashlib.sha256)
        return "p_" + digest.hexdigest()[:16]


def parse_keys(spec: str) -> Keyring:
    keys: list[tuple[str, bytes]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        kid, sep, b64 = item.partition(":")
        if not sep or not kid:
            raise KeyError_("each encryption key must be written as id:base64key")
        try:
            key = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        except ValueError as exc:
            raise KeyError_(f"encryption key {kid!r} is not valid base64") from exc
        if len(key) != 32:
            raise KeyError_(f"encryption key {kid!r} must be 32 bytes (AES-256)")
        keys.append((kid, key))
    if not keys:
        raise KeyError_("no encryption keys given")
    return Keyring(tuple(keys))


def new_key_spec(key_id: str) -> str:
    return f"{key_id}:{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}"


def _development_keys(data_dir: Path) -> str:
    path = data_dir / "encryption-keys"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(new_key_spec("k1") + "\n")
    return path.read_text().strip()


def keyring_from_settings(settings: Settings) -> Keyring:
    if settings.encryption_keys is not None:
        return parse_keys(settings.encryption_keys.get_secret_value())
    if settings.is_production:
        raise KeyError_("PARLEY_ENCRYPTION_KEYS must be set in production")
    return parse_keys(_development_keys(settings.data_dir))


@lru_cache(maxsize=1)
def get_keyring() -> Keyring:
    return keyring_from_settings(get_settings())
