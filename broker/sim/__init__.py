"""A small Canvas LMS stand-in: the upstream for `broker demo`, grant trials and the tests.

It records every request it receives (`SimState.received`) so tests can assert on exactly what
reached "Canvas", and it honours the Canvas behaviours a broker must guard against: Link
headers built from `X-Forwarded-Host`, `as_user_id` masquerading, `_method` overrides,
`access_token` parameters, `/login/session_token` and `/api/graphql`.
"""

from broker.sim.app import create_sim_app
from broker.sim.server import SimServer, run_sim
from broker.sim.state import ReceivedRequest, SimState

__all__ = ["ReceivedRequest", "SimServer", "SimState", "create_sim_app", "run_sim"]
