"""HMAC-SHA256 and compact JSON for what is computed on every proxied call. Pure.

Both give exactly the bytes of the standard library's one-shot forms (``hmac.digest``,
``json.JSONEncoder.encode``), with the per-call set-up done once:

- :class:`Mac` hashes a key's two pads once (RFC 2104: ``H((K ^ opad) || H((K ^ ipad) || m))``)
  and copies the two hash states for each message. ``hmac.digest`` derives them again for
  every message, and under OpenSSL 3 fetches the algorithm each time: about 1.8 µs against
  0.9 µs for a 600-byte event here (bench/README.md, "Against the minimal proxy").
- :func:`json_encoder` builds the C encoder once; ``JSONEncoder.encode`` builds a new one on
  every call. It keeps no table of the containers it is inside (the one-shot form's check for
  circular references), so one encoder serves every thread; the values it is given are
  never circular (a circular value would end in ``RecursionError`` rather than ``ValueError``).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

# The C encoder json itself builds for every one-shot encode (absent without the _json module).
_C_ENCODER: Final = getattr(json.encoder, "c_make_encoder", None)
_BLOCK: Final = 64  # SHA-256's block size in bytes
_INNER_PAD: Final = bytes(byte ^ 0x36 for byte in range(256))
_OUTER_PAD: Final = bytes(byte ^ 0x5C for byte in range(256))


class Mac:
    """HMAC-SHA256 under one key, its pads hashed once (the key's hash states are copied)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        block = key.ljust(_BLOCK, b"\x00")
        self._inner = hashlib.sha256(block.translate(_INNER_PAD))
        self._outer = hashlib.sha256(block.translate(_OUTER_PAD))

    def hexdigest(self, message: bytes) -> str:
        """``hmac.digest(key, message, "sha256").hex()``."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


@lru_cache(maxsize=64)
def mac(key: bytes) -> Mac:
    """The :class:`Mac` of ``key``, prepared once (a process uses a handful of keys)."""
    return Mac(key)


def json_encoder(*, separators: tuple[str, str], sort_keys: bool) -> Callable[[object], str]:
    """``json.JSONEncoder(separators=..., sort_keys=..., ensure_ascii=True).encode``, prebuilt."""
    standard = json.JSONEncoder(separators=separators, sort_keys=sort_keys, ensure_ascii=True)
    if _C_ENCODER is None:  # pragma: no cover - CPython always has the C encoder
        return standard.encode
    item_separator, key_separator = separators
    chunks = _C_ENCODER(
        None,  # no table of containers being encoded: shared by every thread
        standard.default,
        encode_basestring_ascii,
        None,
        key_separator,
        item_separator,
        sort_keys,
        False,  # noqa: FBT003 - skipkeys, positional in the C encoder
        True,  # noqa: FBT003 - allow_nan, as json's default
    )

    def encode(value: object) -> str:
        if isinstance(value, str):
            return encode_basestring_ascii(value)
        return "".join(chunks(value, 0))

    return encode
