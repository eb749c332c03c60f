"""Schemathesis against the service's own OpenAPI schema, over HTTP to a live broker.

Every operation of ``/broker/v1/openapi.json`` gets generated requests, schema-valid and not,
sent with an admin key to a broker served by uvicorn: none may answer 5xx, every error must
be JSON naming an ``error`` code and a message, and responses must match what the schema
documents (status codes, content types, bodies; a 405 names the allowed methods).

Two of schemathesis's checks are left out because the schema does not try to carry every
rule: names, URLs and token lengths are checked by the services with their own messages (so
a schema-valid empty name is refused: ``positive_data_acceptance``), and pydantic's lax
parsing takes a number as a timestamp (``negative_data_rejection``). Neither is an error the
fuzzing is here to find.

The run is bounded and repeatable: a fixed number of examples per operation, derandomized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from broker.app import create_app
from broker.config import Settings
from tests.conftest import clean_database
from tests.e2e.conftest import serve_live_broker

if TYPE_CHECKING:
    from collections.abc import Iterator

    from broker.sim.server import SimServer
    from tests.e2e.conftest import LiveBroker

# The schema of an app that is built but never started: no I/O happens here.
SCHEMA = schemathesis.openapi.from_dict(
    create_app(Settings(database_url="sqlite:///never-opened.sqlite3")).openapi()
)


@pytest.fixture(scope="module")
def broker(
    template_db: str, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveBroker]:
    database = clean_database(template_db, tmp_path_factory.mktemp("openapi-fuzz"))
    with serve_live_broker(database, sim_server) as live:
        yield live


def error_is_json_with_code_and_message(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> None:
    """A 4xx or 5xx is a JSON object with a non-empty ``error`` and a non-empty message.

    Or an HTML page, where the schema documents one (the OAuth callback a browser lands on).

    The message is ``message`` in the management API and ``error_description`` in the OAuth
    endpoints (RFC 6749 §5.2).
    """
    del ctx
    if response.status_code < 400:
        return
    label = f"{case.method} {case.path} answered {response.status_code}"
    content_type = response.headers.get("content-type", [""])[0]
    if content_type.startswith("text/html"):
        # A page for a browser (the OAuth callback): only where the schema documents one.
        responses = case.operation.definition.raw.get("responses", {})
        documented = responses.get(str(response.status_code), {}).get("content", {})
        assert "text/html" in documented, label
        assert "<h1>" in response.text, label
        return
    assert content_type.startswith("application/json"), label
    body = response.json()
    assert isinstance(body, dict), label
    assert isinstance(body.get("error"), str), label
    assert body["error"], label
    message = body.get("message", body.get("error_description"))
    assert isinstance(message, str), label
    assert message, label


@SCHEMA.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_operation_never_fails_and_errors_are_clear_json(
    case: schemathesis.Case[Any], broker: LiveBroker
) -> None:
    case.call_and_validate(
        base_url=broker.url,
        headers={"Authorization": f"Bearer {broker.admin_key}"},
        additional_checks=[error_is_json_with_code_and_message],
        excluded_checks=[positive_data_acceptance, negative_data_rejection],
        timeout=10,
    )
