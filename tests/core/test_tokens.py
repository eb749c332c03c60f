"""Secret format: kind prefix, 178 bits of base62 randomness, CRC32 checksum.

Contract: docs/storage-and-keys.md#token-format.
"""

from __future__ import annotations

import re

import pytest

from broker.core.tokens import ALPHABET, SecretKind, check_secret, generate_secret
from broker.errors import MalformedSecretError


@pytest.mark.parametrize("kind", list(SecretKind))
def test_generated_secret_has_kind_prefix_and_validates(kind: SecretKind) -> None:
    value = generate_secret(kind)
    assert re.fullmatch(rf"{kind.value}_[0-9A-Za-z]{{36}}", value)
    assert check_secret(value, kind) == value


def test_secrets_do_not_repeat() -> None:
    assert len({generate_secret(SecretKind.PROXY_TOKEN) for _ in range(1000)}) == 1000


def test_single_character_typo_is_rejected_by_checksum() -> None:
    value = generate_secret(SecretKind.PROXY_TOKEN)
    position = 10
    replacement = ALPHABET[(ALPHABET.index(value[position]) + 1) % len(ALPHABET)]
    typo = value[:position] + replacement + value[position + 1 :]
    with pytest.raises(MalformedSecretError, match="checksum"):
        check_secret(typo, SecretKind.PROXY_TOKEN)


def test_secret_of_another_kind_is_rejected() -> None:
    with pytest.raises(MalformedSecretError):
        check_secret(generate_secret(SecretKind.ADMIN_KEY), SecretKind.PROXY_TOKEN)


@pytest.mark.parametrize("value", ["", "cbt_", "cbt_" + "!" * 36, "x" * 40, "cbt_" + "a" * 100])
def test_garbage_is_rejected_without_echoing_it(value: str) -> None:
    with pytest.raises(MalformedSecretError) as info:
        check_secret(value, SecretKind.PROXY_TOKEN)
    assert value not in str(info.value) or value == ""
