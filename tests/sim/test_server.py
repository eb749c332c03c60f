from __future__ import annotations

import httpx
import pytest

from broker.sim import SimServer, SimState
from tests.sim.conftest import AUTH, TOKEN


def test_sim_server_serves_and_records_over_real_http() -> None:
    state = SimState(tokens={TOKEN})
    with SimServer(state) as sim, httpx.Client(base_url=sim.base_url, timeout=5.0) as client:
        refused = client.get("/api/v1/users/self")
        allowed = client.get("/api/v1/courses/1201/assignments?per_page=10", headers=AUTH)

    assert refused.status_code == 401
    assert allowed.status_code == 200
    assert state.received_paths() == ["/api/v1/users/self", "/api/v1/courses/1201/assignments"]
    assert state.received[1].query_string == "per_page=10"


def test_sim_server_links_point_at_its_bound_port() -> None:
    with SimServer(SimState(tokens={TOKEN})) as sim:
        response = httpx.get(f"{sim.base_url}/api/v1/courses/1201/assignments", headers=AUTH)
        base_url = sim.base_url

    assert (
        f"<{base_url}/api/v1/courses/1201/assignments?page=2&per_page=10>"
        in (response.headers["link"])
    )


def test_sim_server_stops_listening_on_exit() -> None:
    sim = SimServer(SimState(tokens={TOKEN}))
    with sim:
        base_url = sim.base_url

    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/api/v1/users/self", timeout=5.0)
    with pytest.raises(RuntimeError, match="not running"):
        _ = sim.base_url
