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
import contextlib
import hmac
import json
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.core.digest import mac
from broker.errors import ConfigurationError, DecryptionError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
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
class _KeySet:
    """One consistent view of the keyring: what every method reads, once per call."""

    primary_id: str
    keys: Mapping[str, bytes]


class Keyring:
    """Named 256-bit keys; ``primary_id`` encrypts and hashes new values.

    A process keeps one keyring for its life, shared by every service. After a key
    rotation it takes on the newer keys in place (:meth:`adopt`, run by a
    :class:`KeyringReloader`), so nothing holding the keyring needs rebuilding. Each method
    reads the keys once, so a method running while the keys change uses one set throughout.
    """

    __slots__ = ("_set",)

    def __init__(self, primary_id: str, keys: Mapping[str, bytes]) -> None:
        self._set = _checked(primary_id, keys)

    def __repr__(self) -> str:
        return f"Keyring(primary_id={self.primary_id!r}, ids={list(self.ids())!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and self._set == other._set

    __hash__ = None  # type: ignore[assignment] # its keys can change: not a dict key

    @property
    def primary_id(self) -> str:
        """The id of the key that encrypts, hashes and signs new values."""
        return self._set.primary_id

    @property
    def keys(self) -> Mapping[str, bytes]:
        """Every key, by id (the primary among them)."""
        return self._set.keys

    def adopt(self, newer: Keyring) -> bool:
        """Take on ``newer``'s primary and keys, keeping every key this one had.

        A key that disappeared from the configuration stays usable for decryption in this
        process (a rotation must never strand a value sealed under it); a key id whose key
        changed takes the new key. Returns whether anything changed.
        """
        current, offered = self._set, newer._set
        merged = {
            **offered.keys,
            **{k: v for k, v in current.keys.items() if k not in offered.keys},
        }
        if offered.primary_id == current.primary_id and merged == dict(current.keys):
            return False
        self._set = _checked(offered.primary_id, merged)
        return True

    @classmethod
    def generate(cls, key_id: str = "k1") -> Keyring:
        """A keyring with one fresh random key."""
        return cls(primary_id=key_id, keys={key_id: secrets.token_bytes(KEY_BYTES)})

    def encrypt(self, plaintext: bytes, *, purpose: str, record_id: str) -> tuple[str, bytes]:
        """Encrypt under the primary key; return ``(key_id, nonce + ciphertext)``.

        The purpose and record id are bound as associated data, so a ciphertext copied to
        another row or used for another purpose does not decrypt.
        """
        keys = self._set
        nonce = secrets.token_bytes(NONCE_BYTES)
        key = _subkey(keys.keys[keys.primary_id], "encrypt")
        sealed = AESGCM(key).encrypt(nonce, plaintext, _aad(purpose, record_id))
        return keys.primary_id, nonce + sealed

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
        keys = self._set
        return _keyed_hash(keys.keys[keys.primary_id], value)

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
        keys = self._set
        return _audit_hmac(keys.keys[keys.primary_id], value)

    def audit_hmac_candidates(self, value: str) -> dict[str, str]:
        """``audit_hmac`` of ``value`` under every key, by key id, for searching the log."""
        return {key_id: _audit_hmac(key, value) for key_id, key in self.keys.items()}

    def audit_chain_keys(self) -> dict[str, bytes]:
        """The audit-chain MAC subkey of every key, by key id (primary signs new events)."""
        return {key_id: _subkey(key, "audit-chain") for key_id, key in self.keys.items()}

    def chain_key(self) -> tuple[str, bytes]:
        """The primary key's id and audit-chain subkey: what signs new audit events."""
        keys = self._set
        return keys.primary_id, _subkey(keys.keys[keys.primary_id], "audit-chain")

    def with_new_primary(self) -> Keyring:
        """A copy with a fresh key added as primary (old keys still decrypt)."""
        current = self._set
        number = len(current.keys) + 1
        while f"k{number}" in current.keys:
            number += 1
        key_id = f"k{number}"
        keys = {key_id: secrets.token_bytes(KEY_BYTES), **current.keys}
        return Keyring(primary_id=key_id, keys=keys)

    def ids(self) -> Iterator[str]:
        """Key ids, primary first."""
        current = self._set
        yield current.primary_id
        yield from (key_id for key_id in current.keys if key_id != current.primary_id)

    def to_json(self) -> str:
        """Serialise for a key file."""
        current = self._set
        return json.dumps(
            {
                "primary": current.primary_id,
                "keys": {k: base64.b64encode(v).decode() for k, v in current.keys.items()},
            },
            indent=2,
        )


def _checked(primary_id: str, keys: Mapping[str, bytes]) -> _KeySet:
    if primary_id not in keys:
        raise ValueError("primary key id is not in the keyring")
    for key_id, key in keys.items():
        if len(key) != KEY_BYTES:
            raise ValueError(f"key {key_id!r} is not {KEY_BYTES} bytes")
    return _KeySet(primary_id, MappingProxyType(dict(keys)))


def _aad(purpose: str, record_id: str) -> bytes:
    return f"canvas-token-broker:{purpose}:{record_id}".encode()


def _audit_hmac(key: bytes, value: str) -> str:
    digest = mac(_subkey(key, "audit-hmac")).hexdigest(value.encode())
    return f"hmac-sha256:{digest[:32]}"


def _keyed_hash(key: bytes, value: str) -> str:
    return mac(_subkey(key, "secret-hash")).hexdigest(value.encode())


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
    """Create ``path`` with mode 0600 (never widening an existing file's permissions).

    The file is replaced, never rewritten in place, so a process reading it sees the old keys
    or the new, never half of each (``KeyringReloader``).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(keyring.to_json())
        tmp.replace(path)
    except OSError as exc:
        raise ConfigurationError(
            "BROKER_KEY_FILE",
            f"{path} cannot be written ({exc.strerror}): make {path.parent} writable by this "
            "user, or point BROKER_KEY_FILE at a writable place",
        ) from None


def load_keyring(settings: Settings) -> Keyring:
    """The keyring named by the settings: ``BROKER_KEYS`` first, else the key file."""
    if settings.keys:
        return parse_keys_setting(settings.keys)
    return load_key_file(settings.key_file)


RETRY_AFTER = 1.0
"""Seconds a key id that did not decrypt even after a reload goes without another reload."""


class KeyringReloader:
    """Keeps a running process's keyring up to date with its configuration.

    ``broker keys rotate`` writes the new primary key into the key file and then re-encrypts
    the worker tokens; a process that started before still holds the old keys. It catches up
    in two ways, both ending in :meth:`Keyring.adopt` (old keys stay):

    - :meth:`reload` when told that something changed (the revocation epoch moved; rotation
      moves it in the transaction that re-encrypts);
    - :meth:`decrypt`: a ciphertext under a key this process does not have (or that does not
      authenticate) triggers one reload before it fails. A key id that still fails is not
      retried for ``RETRY_AFTER``, so a broken credential costs no file read per call.

    A reload reads the key file only if it changed (inode, size, times, mode; a file that was
    refused is not read again until it changes): ``write_key_file``
    replaces the file, so every rewrite is seen. ``BROKER_KEYS`` comes from the environment,
    which cannot change under a running process: with it, nothing is ever re-read (the
    rotation procedure in docs/storage-and-keys.md#key-rotation keeps every process able to
    decrypt). Safe to call from any thread.
    """

    def __init__(self, keyring: Keyring, key_file: Path | None) -> None:
        self.keyring = keyring
        self._key_file = key_file
        self._lock = threading.Lock()
        self._signature: tuple[int, ...] | None = None
        self._failed_signature: tuple[int, ...] | None = None
        if key_file is not None:
            with contextlib.suppress(OSError):
                self._signature = _signature(key_file)
        self._futile: dict[str, float] = {}
        self.problem: str | None = None
        """Why the last reload could not read the key file (names the setting), if it failed."""
        self.reloads = 0
        self.observe: Callable[[str], None] | None = None
        """Told what happened: ``"reloaded"``, ``"reload_failed"`` (the key file could not be
        used) or ``"undecryptable"`` (a ciphertext failed even after the reload)."""

    @classmethod
    def for_settings(cls, keyring: Keyring, settings: Settings) -> KeyringReloader:
        """The reloader of a keyring loaded from ``settings`` (the key file, unless BROKER_KEYS)."""
        return cls(keyring, None if settings.keys else settings.key_file)

    def reload(self) -> bool:
        """Re-read the key file if it changed; True if the keyring took on new keys."""
        if self._key_file is None:
            return False
        with self._lock:
            try:
                signature = _signature(self._key_file)
                if signature in {self._signature, self._failed_signature}:
                    return False
                newer = load_key_file(self._key_file)
            except ConfigurationError as exc:
                self._failed_signature = signature
                return self._failed(str(exc))
            except OSError as exc:
                return self._failed(
                    f"BROKER_KEY_FILE {self._key_file} cannot be read ({exc.strerror})"
                )
            self._signature = signature
            self.problem = None
            changed = self.keyring.adopt(newer)
            self._futile.clear()
            self.reloads += 1
        if self.observe is not None:
            self.observe("reloaded")
        return changed

    def _failed(self, problem: str) -> bool:
        self.problem = problem
        if self.observe is not None:
            self.observe("reload_failed")
        return False

    def decrypt(self, key_id: str, blob: bytes, *, purpose: str, record_id: str) -> bytes:
        """``Keyring.decrypt``, reloading the keyring once before giving up."""
        try:
            return self.keyring.decrypt(key_id, blob, purpose=purpose, record_id=record_id)
        except DecryptionError:
            if time.monotonic() < self._futile.get(key_id, 0.0):
                self._undecryptable()
                raise
        self.reload()
        try:
            return self.keyring.decrypt(key_id, blob, purpose=purpose, record_id=record_id)
        except DecryptionError:
            self._futile[key_id] = time.monotonic() + RETRY_AFTER
            self._undecryptable()
            raise

    def _undecryptable(self) -> None:
        if self.observe is not None:
            self.observe("undecryptable")


def _signature(path: Path) -> tuple[int, ...]:
    # The change time and mode too: a `chmod 600` that fixes a refused file is a change.
    status = path.stat()
    return (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_mode)
