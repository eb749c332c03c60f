"""Multipart bodies the broker accepts are read alike, and harmlessly, by every Rack release.

Property: for every generated body, either the broker refuses it or each Rack reading (the
Python model of Rack 2.2, Debian's 2.2.22, 3.0 and 3.1 in tests/support/rack_readings.py)
finds exactly the broker's part names, no forbidden key and no method override. A seeded
sample of the same bodies is also replayed into every real Rack this machine has
(tests/support/rack_replay.py: Debian's ruby-rack, plus ``BROKER_TEST_RACK_DIRS``).
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core import multipart
from broker.core.rules import (
    ALLOWED_INCLUDES,
    CREDENTIAL_KEYS,
    INCLUDE_KEYS,
    MASQUERADE_KEYS,
    OVERRIDE_KEYS,
    _parse_content_type,
    check_body,
)
from broker.errors import Refusal
from tests.support.multipart_cases import Case, random_case
from tests.support.rack_readings import (
    RackReading,
    RackRefused,
    RackRelease,
    RackUnmodelled,
    read_request,
    replay_request,
)
from tests.support.rack_replay import available_racks, replay_many

FORBIDDEN = MASQUERADE_KEYS | OVERRIDE_KEYS | CREDENTIAL_KEYS
RELEASES = tuple(RackRelease)
SAMPLE = 600


def accepted_names(case: Case) -> list[str] | None:
    """The broker's part names if it accepts the body, else None."""
    try:
        check_body(case.content_type, case.body, allow_masquerade=False)
    except Refusal:
        return None
    parsed = _parse_content_type(case.content_type)
    assert parsed is not None
    assert parsed[1] is not None
    parts = multipart.parse(case.content_type, parsed[1].get("boundary"), case.body)
    # A part with an empty file name is no parameter to Rack (it vanishes).
    return [part.name for part in parts if part.filename != ""]


def assert_read_harmlessly(names: list[str], reading: RackReading) -> None:
    assert reading.method == "POST"
    assert [name.raw for name in reading.post] == names
    assert not reading.all_keys & FORBIDDEN
    for name in reading.post:
        if name.top in INCLUDE_KEYS:
            assert name.value in ALLOWED_INCLUDES


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.randoms(use_true_random=False))
def test_every_rack_reads_an_accepted_multipart_body_as_the_broker_does(
    rng: random.Random,
) -> None:
    case = random_case(rng)
    names = accepted_names(case)
    if names is None:
        return
    for release in RELEASES:
        try:
            reading = read_request(
                release, method="POST", content_type=case.content_type, body=case.body
            )
        except (RackRefused, RackUnmodelled):
            continue  # Rack refuses the request: Canvas acts on none of it
        assert_read_harmlessly(names, reading)


def sample() -> list[Case]:
    rng = random.Random(20261202)  # noqa: S311 - a seeded sample, reproducible, not a secret
    return [random_case(rng) for _ in range(SAMPLE)]


def test_the_sample_holds_accepted_and_refused_bodies() -> None:
    verdicts = [accepted_names(case) is not None for case in sample()]
    assert sum(verdicts) > SAMPLE // 10
    assert len(verdicts) - sum(verdicts) > SAMPLE // 10


RACKS = available_racks()


@pytest.mark.skipif(
    not RACKS and not os.environ.get("BROKER_TEST_REQUIRE_RACK"),
    reason="no Ruby with Rack here (apt-get install ruby-rack); .ci/run installs it",
)
def test_real_racks_read_accepted_multipart_bodies_as_the_broker_does() -> None:
    assert RACKS, "BROKER_TEST_REQUIRE_RACK is set but no Rack can be run"
    accepted = [(case, names) for case in sample() if (names := accepted_names(case)) is not None]
    requests = [
        replay_request(method="POST", content_type=case.content_type, body=case.body)
        for case, _ in accepted
    ]
    for rack in RACKS:
        for (case, names), result in zip(accepted, replay_many(rack, requests), strict=True):
            if result["errors"]:
                continue  # refused by Rack
            assert result["method"] == "POST", (rack.label, case)
            keys = {str(path[-1]) for path in result["keys"]}
            assert not keys & FORBIDDEN, (rack.label, case)
            assert {str(path[0]) for path in result["keys"]} <= {
                top for name in names for top in _tops(name)
            }, (rack.label, case)


def _tops(name: str) -> set[str]:
    bracket = name.find("[", 1)
    return {name, name.split("[", 1)[0], name if bracket < 0 else name[:bracket]}
