"""A constraint allows Canvas ID aliases only when they are listed literally.

Canvas resolves ``sis_course_id:…``, ``uuid:…``, ``lti_context_id:…``, ``self`` and shard ids
(``1~1201``) to the same records as their numeric ids, and so does the simulator: each alias
below would reach course 1201 (or the worker user) if it were forwarded. A grant constrained
to the numeric id must refuse every one, in every spelling; a grant that lists an alias
accepts exactly that alias, also percent-encoded, and forwards it as sent.

(docs/grants.md#constraints)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from broker.sim.data import seed_data
from tests.proxy.support import assert_refused, last_proxy_event, make_caller, send_raw

if TYPE_CHECKING:
    import httpx

    from tests.support.env import BrokerEnv

COURSE = "url:GET|/api/v1/courses/:course_id"
USER = "url:GET|/api/v1/users/:user_id"
UUID = seed_data().courses[1201].uuid

COURSE_ALIASES = [
    pytest.param(b"sis_course_id:SIS-1201", id="sis"),
    pytest.param(b"sis_course_id%3ASIS-1201", id="sis-encoded-colon"),
    pytest.param(b"sis_course_id%3aSIS%2D1201", id="sis-encoded-lower"),
    pytest.param(b"%73is_course_id:SIS-1201", id="sis-encoded-letter"),
    pytest.param(f"uuid:{UUID}".encode(), id="uuid"),
    pytest.param(f"uuid%3A{UUID}".encode(), id="uuid-encoded"),
    pytest.param(b"lti_context_id:4dde05e8ca1973bcca9bffc13e1548820eee93a3", id="lti-context"),
    pytest.param(b"1~1201", id="shard"),
    pytest.param(b"1%7E1201", id="shard-encoded"),
    pytest.param(b"10000000001201", id="global-id"),
    pytest.param(b"01201", id="leading-zero"),
    pytest.param(b"+1201", id="plus-sign"),
    pytest.param(b"1201%20", id="trailing-space"),
    pytest.param(b"self", id="self"),
]


@pytest.mark.parametrize("alias", COURSE_ALIASES)
async def test_alias_of_a_constrained_course_is_refused_unless_listed(
    env: BrokerEnv, raw_http: httpx.AsyncClient, alias: bytes
) -> None:
    caller = await make_caller(env, scopes=[COURSE], constraints={"course_id": ["1201"]})
    response = await send_raw(raw_http, "GET", b"/api/v1/courses/" + alias, caller.headers)
    event = await assert_refused(env, response, 403, "constraint_violation", caller)
    assert event["scope"] == COURSE


@pytest.mark.parametrize(
    "spelling",
    [
        b"sis_course_id:SIS-1201",
        b"sis_course_id%3ASIS-1201",
        b"sis_course_id%3aSIS%2D1201",
        b"%73%69%73_course_id:SIS-1201",
    ],
)
async def test_listed_sis_alias_is_forwarded_in_any_spelling_as_sent(
    env: BrokerEnv, raw_http: httpx.AsyncClient, spelling: bytes
) -> None:
    caller = await make_caller(
        env, scopes=[COURSE], constraints={"course_id": ["sis_course_id:SIS-1201"]}
    )
    response = await send_raw(raw_http, "GET", b"/api/v1/courses/" + spelling, caller.headers)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == 1201
    assert env.received == [f"/api/v1/courses/{spelling.decode()}"]
    assert (await last_proxy_event(env))["decision"] == "allow"


@pytest.mark.parametrize(
    "listed", ["sis_course_id:SIS-1201", f"uuid:{UUID}", "1~1201", "lti_context_id:abc"]
)
async def test_listing_an_alias_does_not_allow_the_numeric_id(env: BrokerEnv, listed: str) -> None:
    caller = await make_caller(env, scopes=[COURSE], constraints={"course_id": [listed]})
    response = await env.http.get("/api/v1/courses/1201", headers=caller.headers)
    await assert_refused(env, response, 403, "constraint_violation", caller)


@pytest.mark.parametrize("listed", [f"uuid:{UUID}", "1~1201", "lti_context_id:abc"])
async def test_listed_alias_is_forwarded_byte_for_byte(env: BrokerEnv, listed: str) -> None:
    caller = await make_caller(env, scopes=[COURSE], constraints={"course_id": [listed]})
    await env.http.get(f"/api/v1/courses/{listed}", headers=caller.headers)
    assert env.received == [f"/api/v1/courses/{listed}"]
    assert (await last_proxy_event(env))["decision"] == "allow"


@pytest.mark.parametrize("alias", [b"self", b"sis_user_id:U-0001", b"sis_user_id%3AU-0001"])
async def test_alias_of_a_constrained_user_is_refused_unless_listed(
    env: BrokerEnv, raw_http: httpx.AsyncClient, alias: bytes
) -> None:
    caller = await make_caller(env, scopes=[USER], constraints={"user_id": ["1"]})
    response = await send_raw(raw_http, "GET", b"/api/v1/users/" + alias, caller.headers)
    await assert_refused(env, response, 403, "constraint_violation", caller)


async def test_listed_self_reaches_the_worker_user_only(env: BrokerEnv) -> None:
    caller = await make_caller(env, scopes=[USER], constraints={"user_id": ["self"]})
    response = await env.http.get("/api/v1/users/self", headers=caller.headers)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == 1
    assert env.received == ["/api/v1/users/self"]
    env.sim.state.received.clear()
    refused = await env.http.get("/api/v1/users/1", headers=caller.headers)
    await assert_refused(env, refused, 403, "constraint_violation", caller)
