"""The keyring: AES-256-GCM encryption of stored secrets and keyed hashes.

Keys never live in the database. They come from ``BROKER_KEYS`` (``id:base64,id2:base64``; the
first is primary) or from a JSON key file (``{"primary": id, "keys": {id: base64}}``, mode
0600). Each key is used only through HKDF-derived subkeys, one per purpose, so the encryption
key, the secret-hash key and the audit HMAC key are independent.

Contract: docs/storage-and-keys.md#keyring.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.errors import ConfigurationError, DecryptionError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from broker.config import Settings

KEY_BYTES = 32
NONCE_BYTES = 12


@cache
def _subkey(key: bytes, purpose: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose.encode()
    ).derive(key)


@dataclass(frozen=True)
class Keyring:
    """Named 256-bit keys; ``primary_id`` encrypts and hashes new values."""

    primary_id: str
    keys: dict[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.primary_id not in self.keys:
            raise ValueError("primary key id is not in the keyring")
        for key_id, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} is not {KEY_BYTES} bytes")

    @classmethod
    def generate(cls, key_id: str = "k1") -> Keyring:
        """A keyring with one fresh random key."""
        return cls(primary_id=key_id, keys={key_id: secrets.token_bytes(KEY_BYTES)})

    def encrypt(self, plaintext: bytes, *, purpose: str, record_id: str) -> tuple[str, bytes]:
        """Encrypt under the primary key; return ``(key_id, nonce + ciphertext)``.

        The purpose and record id are bound as associated data, so a ciphertext copied to
        another row or used for another purpose does not decrypt.
        """
        nonce = secrets.token_bytes(NONCE_BYTES)
        key = _subkey(self.keys[self.primary_id], "encrypt")
        sealed = AESGCM(key).encrypt(nonce, plaintext, _aad(purpose, record_id))
        return self.primary_id, nonce + sealed

    def decrypt(self, key_id: str, blob: bytes, *, purpose: str, record_id: str) -> bytes:
        """Reverse :meth:`encrypt`; raise ``DecryptionError`` on any mismatch."""
        key = self.keys.get(key_id)
        if key is None:
            raise DecryptionError(f"key {key_id!r} is not in the keyring")
        try:
            return AESGCM(_subkey(key, "encrypt")).decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(purpose, record_id)
            )
        except InvalidTag as exc:
            raise DecryptionError("ciphertext does not authenticate") from exc

    def hash_secret(self, value: str) -> str:
        """Keyed hash of a secret under the primary key, for storage."""
        return _keyed_hash(self.keys[self.primary_id], value)

    def secret_hash_candidates(self, value: str) -> list[str]:
        """Keyed hashes of ``value`` under every key, for lookups across key rotation."""
        return [_keyed_hash(key, value) for key in self.keys.values()]

    def verify_secret(self, value: str, stored_hash: str) -> bool:
        """Constant-time check of ``value`` against a stored keyed hash."""
        found = False
        for candidate in self.secret_hash_candidates(value):
            found |= hmac.compare_digest(candidate, stored_hash)
        return found

    def audit_hmac(self, value: str) -> str:
        """HMAC of a sensitive value for the audit log (searchable, not reversible)."""
        return _audit_hmac(self.keys[self.primary_id], value)

    def audit_hmac_candidates(self, value: str) -> dict[str, str]:
        """``audit_hmac`` of ``value`` under every key, by key id, for searching the log."""
        return {key_id: _audit_hmac(key, value) for key_id, key in self.keys.items()}

    def audit_chain_keys(self) -> dict[str, bytes]:
        """The audit-chain MAC subkey of every key, by key id (primary signs new events)."""
        return {key_id: _subkey(key, "audit-chain") for key_id, key in self.keys.items()}

    def with_new_primary(self) -> Keyring:
        """A copy with a fresh key added as primary (old keys still decrypt)."""
        number = len(self.keys) + 1
        while f"k{number}" in self.keys:
            number += 1
        key_id = f"k{number}"
        keys = {key_id: secrets.token_bytes(KEY_BYTES), **self.keys}
        return Keyring(primary_id=key_id, keys=keys)

    def ids(self) -> Iterator[str]:
        """Key ids, primary first."""
        yield self.primary_id
        yield from (key_id for key_id in self.keys if key_id != self.primary_id)

    def to_json(self) -> str:
        """Serialise for a key file."""
        return json.dumps(
            {
                "primary": self.primary_id,
                "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()},
            },
            indent=2,
        )


def _aad(purpose: str, record_id: str) -> bytes:
    return f"canvas-token-broker:{purpose}:{record_id}".encode()


def _audit_hmac(key: bytes, value: str) -> str:
    digest = hmac.digest(_subkey(key, "audit-hmac"), value.encode(), "sha256").hex()
    return f"hmac-sha256:{digest[:32]}"


def _keyed_hash(key: bytes, value: str) -> str:
    return hmac.digest(_subkey(key, "secret-hash"), value.encode(), "sha256").hex()


def _decode_key(setting: str, key_id: str, text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(setting, f"key {key_id!r} is not valid base64") from exc
    if len(key) != KEY_BYTES:
        raise ConfigurationError(setting, f"key {key_id!r} must be {KEY_BYTES} bytes")
    return key


def parse_keys_setting(value: str) -> Keyring:
    """Parse ``BROKER_KEYS``: ``id:base64[,id:base64...]``, first is primary."""
    keys: dict[str, bytes] = {}
    for raw_item in value.split(","):
        item = raw_item.strip()
        if not item:
            continue
        key_id, sep, encoded = item.partition(":")
        if not sep or not key_id:
            raise ConfigurationError("BROKER_KEYS", "entries must look like 'id:base64key'")
        if key_id in keys:
            raise ConfigurationError("BROKER_KEYS", f"key id {key_id!r} appears twice")
        keys[key_id] = _decode_key("BROKER_KEYS", key_id, encoded)
    if not keys:
        raise ConfigurationError("BROKER_KEYS", "is empty")
    return Keyring(primary_id=next(iter(keys)), keys=keys)


def load_key_file(path: Path) -> Keyring:
    """Read a JSON key file, refusing one that others can read."""
    setting = "BROKER_KEY_FILE"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise ConfigurationError(
            setting,
            f"{path} does not exist; run `broker init` to create it, or, if the broker's files "
            "are elsewhere, run from that directory or set BROKER_HOME to it",
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(setting, f"{path} is readable by others; chmod 600 it")
    try:
        data = json.loads(path.read_text())
        primary = data["primary"]
        entries = data["keys"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(setting, f"{path} is not a broker key file") from exc
    if not isinstance(primary, str) or not isinstance(entries, dict) or primary not in entries:
        raise ConfigurationError(setting, f"{path} has no usable primary key")
    keys = {str(k): _decode_key(setting, str(k), str(v)) for k, v in entries.items()}
    return Keyring(primary_id=primary, keys=keys)


def write_key_file(path: Path, keyring: Keyring) -> None:
    """Create ``path`` with mode 0600 (never widening an existing file's permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(keyring.to_json())
    tmp.replace(path)


def load_keyring(settings: Settings) -> Keyring:
    """The keyring named by the settings: ``BROKER_KEYS`` first, else the key file."""
    if settings.keys:
        return parse_keys_setting(settings.keys)
    return load_key_file(settings.key_file)
