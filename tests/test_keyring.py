"""Keyring: AES-256-GCM bound to record and purpose, key rotation, key sources.

Contract: docs/storage-and-keys.md#keyring.
"""

from __future__ import annotations

import base64
import secrets
import stat
from typing import TYPE_CHECKING

import pytest

from broker.config import Settings
from broker.errors import ConfigurationError, DecryptionError
from broker.keyring import (
    Keyring,
    KeyringReloader,
    load_key_file,
    load_keyring,
    parse_keys_setting,
    write_key_file,
)

if TYPE_CHECKING:
    from pathlib import Path


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def test_encrypted_value_decrypts_for_the_same_record_and_purpose() -> None:
    keyring = Keyring.generate()
    key_id, blob = keyring.encrypt(b"canvas-token", purpose="worker-token", record_id="cred_1")
    assert b"canvas-token" not in blob
    assert (
        keyring.decrypt(key_id, blob, purpose="worker-token", record_id="cred_1") == b"canvas-token"
    )


def test_ciphertext_copied_to_another_record_does_not_decrypt() -> None:
    keyring = Keyring.generate()
    key_id, blob = keyring.encrypt(b"canvas-token", purpose="worker-token", record_id="cred_1")
    with pytest.raises(DecryptionError):
        keyring.decrypt(key_id, blob, purpose="worker-token", record_id="cred_2")
    with pytest.raises(DecryptionError):
        keyring.decrypt(key_id, blob, purpose="other", record_id="cred_1")


def test_each_encryption_uses_a_fresh_nonce() -> None:
    keyring = Keyring.generate()
    first = keyring.encrypt(b"same", purpose="p", record_id="r")[1]
    second = keyring.encrypt(b"same", purpose="p", record_id="r")[1]
    assert first[:12] != second[:12]


def test_tampered_ciphertext_is_refused() -> None:
    keyring = Keyring.generate()
    key_id, blob = keyring.encrypt(b"secret", purpose="p", record_id="r")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(DecryptionError):
        keyring.decrypt(key_id, tampered, purpose="p", record_id="r")


def test_rotated_keyring_still_decrypts_and_matches_old_values() -> None:
    old_key, new_key = _key(), _key()
    old = parse_keys_setting(f"k1:{old_key}")
    key_id, blob = old.encrypt(b"secret", purpose="p", record_id="r")
    stored_hash = old.hash_secret("cbs_value")

    rotated = parse_keys_setting(f"k2:{new_key},k1:{old_key}")
    assert rotated.primary_id == "k2"
    assert rotated.decrypt(key_id, blob, purpose="p", record_id="r") == b"secret"
    assert rotated.verify_secret("cbs_value", stored_hash)
    assert rotated.encrypt(b"x", purpose="p", record_id="r")[0] == "k2"


def test_secret_hash_is_keyed() -> None:
    assert Keyring.generate().hash_secret("v") != Keyring.generate().hash_secret("v")


@pytest.mark.parametrize(
    "value",
    ["", "k1", "k1:not-base64!", f"k1:{base64.b64encode(b'short').decode()}", f":{_key()}"],
)
def test_bad_keys_setting_names_the_setting(value: str) -> None:
    with pytest.raises(ConfigurationError, match="BROKER_KEYS"):
        parse_keys_setting(value)


def test_key_file_is_created_owner_only_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "broker.key"
    keyring = Keyring.generate()
    write_key_file(path, keyring)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path) == keyring


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broker.key"
    write_key_file(path, Keyring.generate())
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="BROKER_KEY_FILE"):
        load_key_file(path)


def test_missing_key_file_says_to_run_init(tmp_path: Path) -> None:
    settings = Settings(key_file=tmp_path / "absent.key", keys=None)
    with pytest.raises(ConfigurationError, match="broker init"):
        load_keyring(settings)


def test_keys_setting_wins_over_key_file(tmp_path: Path) -> None:
    settings = Settings(key_file=tmp_path / "absent.key", keys=f"env:{_key()}")
    assert load_keyring(settings).primary_id == "env"


# Following the key file in a running process (docs/storage-and-keys.md#key-rotation) -------


def test_adopting_a_newer_keyring_takes_its_primary_and_keeps_every_old_key() -> None:
    running = Keyring.generate()
    key_id, blob = running.encrypt(b"old", purpose="p", record_id="r")
    rotated = running.with_new_primary()
    # Even a key dropped from the newer configuration stays, so nothing sealed under it strands.
    newer = Keyring(primary_id=rotated.primary_id, keys={"k2": rotated.keys["k2"]})
    assert running.adopt(newer) is True
    assert running.primary_id == "k2"
    assert sorted(running.keys) == ["k1", "k2"]
    assert running.decrypt(key_id, blob, purpose="p", record_id="r") == b"old"
    assert running.encrypt(b"new", purpose="p", record_id="r")[0] == "k2"
    assert running.adopt(newer) is False


def _file_keyring(tmp_path: Path) -> tuple[Path, Keyring, KeyringReloader]:
    path = tmp_path / "broker.key"
    write_key_file(path, Keyring.generate())
    keyring = load_key_file(path)
    return path, keyring, KeyringReloader(keyring, path)


def test_a_reloader_takes_on_a_rotated_key_file(tmp_path: Path) -> None:
    path, keyring, reloader = _file_keyring(tmp_path)
    assert reloader.reload() is False  # unchanged: not even read
    write_key_file(path, load_key_file(path).with_new_primary())
    assert reloader.reload() is True
    assert keyring.primary_id == "k2"
    assert reloader.reloads == 1
    assert reloader.problem is None


def test_a_ciphertext_under_an_unknown_key_reloads_the_key_file_once(tmp_path: Path) -> None:
    path, keyring, reloader = _file_keyring(tmp_path)
    rotated = load_key_file(path).with_new_primary()
    write_key_file(path, rotated)  # what `broker keys rotate` does before re-encrypting
    key_id, blob = rotated.encrypt(b"worker", purpose="p", record_id="r")
    assert reloader.decrypt(key_id, blob, purpose="p", record_id="r") == b"worker"
    assert keyring.primary_id == "k2"


def test_a_key_that_still_fails_is_not_reloaded_again_for_a_while(tmp_path: Path) -> None:
    path, _keyring, reloader = _file_keyring(tmp_path)
    stranger = Keyring.generate("k9")
    key_id, blob = stranger.encrypt(b"worker", purpose="p", record_id="r")
    seen: list[str] = []
    reloader.observe = seen.append
    with pytest.raises(DecryptionError):
        reloader.decrypt(key_id, blob, purpose="p", record_id="r")
    write_key_file(path, load_key_file(path).with_new_primary())
    # Within RETRY_AFTER the failing key id fails at once: a broken credential costs no reads.
    for _ in range(5):
        with pytest.raises(DecryptionError):
            reloader.decrypt(key_id, blob, purpose="p", record_id="r")
    assert reloader.reloads == 0
    assert seen == ["undecryptable"] * 6


def test_an_unusable_key_file_keeps_the_keys_and_says_why(tmp_path: Path) -> None:
    path, keyring, reloader = _file_keyring(tmp_path)
    seen: list[str] = []
    reloader.observe = seen.append
    path.chmod(0o644)
    path.write_text(path.read_text() + " ")
    assert reloader.reload() is False
    assert reloader.problem is not None
    assert reloader.problem.startswith("BROKER_KEY_FILE")
    assert "readable by others" in reloader.problem
    assert keyring.primary_id == "k1"
    assert reloader.reload() is False  # not read again until it changes
    assert seen == ["reload_failed"]
    path.chmod(0o600)  # the fix: a change of mode alone is seen
    assert reloader.reload() is False  # read, nothing new in it
    assert reloader.reloads == 1
    assert not reloader.problem


def test_with_broker_keys_nothing_is_reread(tmp_path: Path) -> None:
    settings = Settings(keys=f"env:{_key()}", key_file=tmp_path / "absent.key")
    keyring = load_keyring(settings)
    reloader = KeyringReloader.for_settings(keyring, settings)
    assert reloader.reload() is False
    assert reloader.problem is None
