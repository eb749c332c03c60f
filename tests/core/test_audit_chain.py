"""The audit chain's pure logic: canonical content, MACs and what verification reports."""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.audit_chain import (
    GENESIS,
    ChainVerifier,
    Checkpoint,
    Head,
    Link,
    canonical,
    canonical_values,
    checkpoint_mac,
    checkpoint_sound,
    event_mac,
    head_mac,
)

KEY = secrets.token_bytes(32)
KEYS = {"k1": KEY}
T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def event(n: int) -> dict[str, object]:
    return {
        "time": T0 + timedelta(seconds=n),
        "request_id": f"req{n}",
        "kind": "proxy",
        "action": "proxy",
        "state": "complete",
        "decision": "allow",
        "path": f"/api/v1/courses/{n}",
        "status": 200,
        "duration_ms": 1.5,
        "details": {"n": n},
    }


def build(count: int, key_id: str = "k1") -> tuple[list[Link], Head]:
    links: list[Link] = []
    prev = GENESIS
    for n in range(1, count + 1):
        content = canonical(event(n))
        mac = event_mac(KEYS[key_id], prev, content)
        links.append(Link(seq=n, prev_mac=prev, mac=mac, mac_key=key_id, content=content))
        prev = mac
    last = links[-1] if links else None
    seq = last.seq if last else 0
    return links, Head(seq, prev, key_id, head_mac(KEYS[key_id], seq, prev))


def verifier(links: list[Link], **options: object) -> ChainVerifier:
    by_mac = {link.mac: link.seq for link in links}
    return ChainVerifier(KEYS, locate=by_mac.get, **options)  # type: ignore[arg-type]


def test_an_untouched_chain_verifies() -> None:
    links, head = build(20)
    result = verifier(links).verify(links, head)
    assert result.ok
    assert (result.checked, result.first_seq, result.last_seq) == (20, 1, 20)
    assert result.keys_used == {"k1"}


def test_an_empty_log_with_an_unsigned_head_verifies() -> None:
    result = verifier([]).verify([], Head(0, GENESIS, None, None))
    assert result.ok
    assert result.checked == 0


def test_a_modified_event_is_reported_as_modified_at_its_seq() -> None:
    links, head = build(10)
    links[4] = replace(links[4], content=canonical({**event(5), "status": 500}))
    result = verifier(links).verify(links, head)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (5, "modified")
    assert result.checked == 4


def test_a_deleted_event_is_reported_as_missing() -> None:
    links, head = build(10)
    del links[6]
    result = verifier(links).verify(links, head)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (7, "missing")


def test_a_deletion_hidden_by_renumbering_is_still_missing() -> None:
    links, head = build(10)
    del links[6]
    links = [replace(link, seq=n) for n, link in enumerate(links, start=1)]
    result = verifier(links).verify(links, head)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (7, "missing")


def test_a_forged_event_between_two_is_reported_as_inserted() -> None:
    links, head = build(10)
    forged = Link(
        seq=6,
        prev_mac=links[4].mac,
        mac="f" * 64,
        mac_key="k1",
        content=canonical(event(99)),
    )
    shifted = [replace(link, seq=link.seq + 1) for link in links[5:]]
    tampered = [*links[:5], forged, *shifted]
    result = verifier(tampered).verify(tampered, replace(head, last_seq=11))
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (6, "inserted")


def test_two_swapped_events_are_reported_as_reordered() -> None:
    links, head = build(10)
    fifth, sixth = links[4], links[5]
    swapped = [*links[:4], replace(sixth, seq=5), replace(fifth, seq=6), *links[6:]]
    result = verifier(swapped).verify(swapped, head)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (5, "reordered")


def test_events_cut_off_the_end_are_missing_by_the_signed_head() -> None:
    links, head = build(10)
    result = verifier(links[:7]).verify(links[:7], head)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (8, "missing")


def test_a_head_rolled_back_without_the_key_is_modified() -> None:
    links, head = build(10)
    rolled_back = Head(7, links[6].mac or "", "k1", head.mac)
    result = verifier(links[:7]).verify(links[:7], rolled_back)
    assert result.problem is not None
    assert result.problem.kind == "modified"


def test_events_beyond_the_signed_head_are_inserted() -> None:
    links, _ = build(10)
    _, short_head = build(8)
    result = verifier(links).verify(links, short_head)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (9, "inserted")


def test_an_event_signed_with_a_key_no_longer_in_the_keyring_is_unverifiable() -> None:
    links, head = build(3)
    result = ChainVerifier({"k2": KEY}).verify(links, head)
    assert result.problem is not None
    assert result.problem.kind == "unknown_key"


def test_events_signed_under_an_older_key_still_verify_after_rotation() -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    keys = {"k1": old, "k2": new}
    links: list[Link] = []
    prev = GENESIS
    for n in range(1, 7):
        key_id = "k1" if n <= 3 else "k2"
        content = canonical(event(n))
        mac = event_mac(keys[key_id], prev, content)
        links.append(Link(n, prev, mac, key_id, content))
        prev = mac
    head = Head(6, prev, "k2", head_mac(new, 6, prev))
    result = ChainVerifier(keys).verify(links, head)
    assert result.ok
    assert result.keys_used == {"k1", "k2"}


def test_verification_resumes_from_a_checkpoint() -> None:
    links, head = build(10)
    checkpoint = Checkpoint(
        through_seq=4,
        through_mac=links[3].mac or "",
        events_pruned=4,
        incomplete_pruned=0,
        created_at=T0,
        mac_key="k1",
    )
    signed = replace(checkpoint, mac=checkpoint_mac(KEY, checkpoint))
    assert checkpoint_sound(KEYS, signed)
    assert not checkpoint_sound(KEYS, replace(signed, through_seq=5))
    result = ChainVerifier(KEYS, anchor_seq=4, anchor_mac=signed.through_mac).verify(
        links[4:], head
    )
    assert result.ok
    assert result.checked == 6


def test_without_its_checkpoint_a_pruned_log_is_missing_its_start() -> None:
    links, head = build(10)
    result = verifier(links).verify(links[4:], head)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (1, "missing")


def test_canonical_content_needs_aware_times() -> None:
    with pytest.raises(TypeError):
        canonical({**event(1), "time": datetime(2026, 1, 1)})  # noqa: DTZ001


@given(
    st.lists(
        st.datetimes(
            min_value=datetime(1, 1, 1, 12),  # noqa: DTZ001 - hypothesis adds the zone
            max_value=datetime(9999, 12, 30),  # noqa: DTZ001
            timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5)), UTC]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_time_text_is_utc_iso_text_with_microseconds(times: list[datetime]) -> None:
    # Several in a row: the text up to the seconds is remembered from the time before.
    for at in times:
        expected = at.astimezone(UTC).isoformat(timespec="microseconds")
        assert canonical_values({**event(1), "time": at})[0] == expected


def test_time_text_follows_each_part_of_the_time_that_changes() -> None:
    at = datetime(2026, 11, 8, 3, 30, 15, 250, tzinfo=UTC)
    # Each time after ``at`` differs from it in one part only, and is followed by ``at`` again.
    walk = [at, at.replace(microsecond=0)]
    for part in ("microsecond", "second", "minute", "hour", "day", "month", "year"):
        walk += [at.replace(**{part: getattr(at, part) + 1}), at]
    for moment in walk:
        expected = moment.isoformat(timespec="microseconds")
        assert canonical_values({**event(1), "time": moment})[0] == expected


def test_canonical_content_treats_integral_and_float_durations_alike() -> None:
    assert canonical({**event(1), "duration_ms": 3}) == canonical({**event(1), "duration_ms": 3.0})


@given(
    st.dictionaries(
        st.sampled_from(["reason", "client_id", "path", "query", "user_agent"]),
        st.text(max_size=40),
    )
)
def test_any_change_of_a_chained_field_changes_the_mac(changes: dict[str, str]) -> None:
    original = event(1)
    changed = {**original, **changes}
    same = all(original.get(k) == v for k, v in changes.items())
    macs_equal = event_mac(KEY, GENESIS, canonical(original)) == event_mac(
        KEY, GENESIS, canonical(changed)
    )
    assert macs_equal == same
