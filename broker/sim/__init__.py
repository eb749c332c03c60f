"""A small Canvas LMS stand-in: the upstream for `broker demo`, grant trials and the tests.

It records every request it receives (`SimState.received`) so tests can assert on exactly what
reached "Canvas", and it honours the Canvas behaviours a broker must guard against: Link
headers built from `X-Forwarded-Host`, `as_user_id` masquerading, `_method` overrides,
`access_token` parameters, `/login/session_token` and `/api/graphql`. It is also Canvas's OAuth2
provider (developer keys with enforced scopes, `/login/oauth2/*`) and serves the Access Tokens
API (`/api/v1/users/:user_id/tokens`); see docs/simulator.md.
"""

from broker.sim.app import create_sim_app
from broker.sim.credentials import AccessToken, DeveloperKey
from broker.sim.oauth import pkce_challenge
from broker.sim.scopes import scopes_allow
from broker.sim.server import SimServer, run_sim
from broker.sim.state import ReceivedRequest, SimState

__all__ = [
    "AccessToken",
    "DeveloperKey",
    "ReceivedRequest",
    "SimServer",
    "SimState",
    "create_sim_app",
    "pkce_challenge",
    "run_sim",
    "scopes_allow",
]
