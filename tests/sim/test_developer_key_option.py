from __future__ import annotations

import pytest

from broker.sim.server import parse_developer_key


def test_developer_key_specs_parse() -> None:
    assert parse_developer_key("10000000000001:sec") == ("10000000000001", "sec", [])
    assert parse_developer_key("10000000000001:sec:https://app.test/cb") == (
        "10000000000001",
        "sec",
        ["https://app.test/cb"],
    )
    with pytest.raises(ValueError, match="CLIENT_ID"):
        parse_developer_key("abc:sec")
