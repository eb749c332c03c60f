"""Secret token format (docs/storage-and-keys.md#token-format).

``<kind>_<30 base62 characters of randomness><6 base62 characters of CRC32>``: the prefix names
the kind so secret scanners recognise a leaked value, 30 base62 characters carry 178 bits of
randomness, and the checksum rejects typos and garbage before any database lookup.
"""

from __future__ import annotations

import secrets
import zlib
from enum import StrEnum

from broker.errors import MalformedSecretError

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_LENGTH = 30
CHECKSUM_LENGTH = 6
_ALPHABET_SET = frozenset(ALPHABET)


class SecretKind(StrEnum):
    """The kinds of secret the broker issues, by prefix."""

    PROXY_TOKEN = "cbt"  # noqa: S105 - a prefix, not a secret
    CLIENT_SECRET = "cbs"  # noqa: S105 - a prefix, not a secret
    ADMIN_KEY = "cba"


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(ALPHABET[rest])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate_secret(kind: SecretKind) -> str:
    """Return a fresh secret of ``kind``."""
    body = f"{kind.value}_" + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_LENGTH))
    return body + _checksum(body)


def check_secret(value: str, kind: SecretKind) -> str:
    """Return ``value`` if it is a well-formed secret of ``kind``, else raise.

    The message never echoes the value.
    """
    prefix = f"{kind.value}_"
    expected_length = len(prefix) + RANDOM_LENGTH + CHECKSUM_LENGTH
    if len(value) != expected_length or not value.startswith(prefix):
        raise MalformedSecretError(f"not a {kind.name.lower().replace('_', ' ')}")
    tail = value[len(prefix) :]
    if not set(tail) <= _ALPHABET_SET:
        raise MalformedSecretError("contains characters outside base62")
    body, checksum = value[:-CHECKSUM_LENGTH], value[-CHECKSUM_LENGTH:]
    if not secrets.compare_digest(_checksum(body), checksum):
        raise MalformedSecretError("checksum mismatch")
    return value


def new_id(prefix: str, length: int = 16) -> str:
    """Return a random, non-secret resource identifier such as ``cli_3kT9...``."""
    return f"{prefix}_" + "".join(secrets.choice(ALPHABET) for _ in range(length))
