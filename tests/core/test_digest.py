"""The prebuilt HMAC and JSON encoder give the standard library's bytes (broker/core/digest.py)."""

from __future__ import annotations

import hmac
import json
import math
import threading

import pytest

from broker.core.digest import Mac, json_encoder, mac


@pytest.mark.parametrize("key_length", [0, 1, 32, 63, 64, 65, 200])
@pytest.mark.parametrize("message_length", [0, 1, 55, 56, 64, 600, 5000])
def test_mac_is_hmac_sha256(key_length: int, message_length: int) -> None:
    key = bytes((7 * i + 3) % 256 for i in range(key_length))
    message = bytes((11 * i + 5) % 256 for i in range(message_length))
    expected = hmac.digest(key, message, "sha256").hex()
    assert Mac(key).hexdigest(message) == expected
    prepared = mac(key)
    # The prepared states are copied, never consumed: the same key gives the same MAC again.
    assert prepared.hexdigest(message) == expected
    assert prepared.hexdigest(message) == expected
    assert prepared.hexdigest(message + b"x") != expected


def test_mac_is_cached_per_key() -> None:
    assert mac(b"k" * 32) is mac(b"k" * 32)
    assert mac(b"k" * 32) is not mac(b"j" * 32)


VALUES = [
    ["2026-12-07T10:00:00.000001+00:00", "r-1", None, 3, 1.5, True, False],
    ['caf\u00e9 \u2603 "quoted" \\ \n\t\x00', {"b": 1, "a": [1, 2, {"z": None, "y": "\u00ff"}]}],
    [0.1, 1e300, -0.0, 12345678901234567890, math.inf, -math.inf],
    {"details": {"canvas_request_cost": 0.25, "before": {"name": "x"}, "after": []}},
    "a lone string \u00e9",
    [],
    {},
]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize(
    ("separators", "sort_keys"), [((",", ":"), True), ((", ", ": "), False), ((",", ":"), False)]
)
def test_json_encoder_matches_the_standard_one(
    value: object, separators: tuple[str, str], sort_keys: bool
) -> None:
    standard = json.JSONEncoder(separators=separators, sort_keys=sort_keys, ensure_ascii=True)
    assert json_encoder(separators=separators, sort_keys=sort_keys)(value) == standard.encode(value)


def test_json_encoder_defaults_to_json_dumps_text() -> None:
    encode = json_encoder(separators=(", ", ": "), sort_keys=False)
    details = {"canvas_request_cost": 1.0, "changed": {"scopes": ["url:GET|/api/v1/x"]}}
    assert encode(details) == json.dumps(details)


def test_json_encoder_refuses_what_json_refuses() -> None:
    encode = json_encoder(separators=(",", ":"), sort_keys=True)
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode([object()])
    with pytest.raises(TypeError):
        encode({(1, 2): "tuple keys"})


def test_json_encoder_serves_threads_at_once() -> None:
    encode = json_encoder(separators=(",", ":"), sort_keys=True)
    value = [{"k": [i, {"n": i}]} for i in range(50)]
    expected = json.dumps(value, separators=(",", ":"), sort_keys=True)
    wrong: list[str] = []

    def work() -> None:
        for _ in range(300):
            text = encode(value)
            if text != expected:
                wrong.append(text)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
