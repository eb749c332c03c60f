"""The simulator's ASGI application.

A request passes through two layers:

1. `RackLayer`, pure ASGI, stands in for the Rack middleware in front of Canvas. It first
   records the request exactly as received (so nothing is ever missed, whatever happens next),
   then parses parameters once, applies Rack's `_method` override and strips a `.json` format
   suffix before routing.
2. Starlette routes, each wrapped by `_CanvasApi.endpoint`, which does what Canvas's
   `ApplicationController` does for every API call: authenticate the token, charge the rate
   limit, apply `as_user_id` masquerading, then add Canvas's standard response headers.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from broker.sim.access_tokens import AccessTokensApi
from broker.sim.auth import Authenticated, Refused, authenticate, check_scopes
from broker.sim.oauth import OAuthProvider
from broker.sim.pagination import (
    link_header,
    page_links,
    paginate,
    pagination_meta,
    request_base_url,
)
from broker.sim.params import RequestParams, parse_request_params
from broker.sim.responses import add_canvas_headers, error_response, json_response
from broker.sim.state import ReceivedRequest, SimState

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from broker.sim.data import Assignment, Course, JSONObject, User

__all__ = ["RackLayer", "ReceivedRequest", "SimState", "create_sim_app"]

PARAMS_SCOPE_KEY: Final = "canvas_sim.params"
ORIGINAL_METHOD_SCOPE_KEY: Final = "canvas_sim.original_method"

UNAUTHENTICATED_MESSAGE: Final = "Invalid access token."
NOT_FOUND: Final = "The specified resource does not exist."
JSON_API_MEDIA_TYPE: Final = "application/vnd.api+json"

# Rack::MethodOverride::HTTP_METHODS
_OVERRIDABLE_METHODS = frozenset(
    {"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "LINK", "UNLINK"}
)
_TRUE_VALUES = frozenset({"true", "1", "yes", "on"})
_FALSE_VALUES = frozenset({"false", "0", "no", "off", ""})


def raw_path_of(scope: Scope) -> str:
    """Return the request path exactly as sent (percent-encoding intact), without any query."""
    raw = scope.get("raw_path")
    if raw is None:
        return quote(scope["path"])
    return bytes(raw).decode("latin-1").split("?", 1)[0]


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """Make a `receive` that hands the already-read body over once, then defers to the server."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _method_override(params: RequestParams, headers: Headers) -> str | None:
    # Rack::MethodOverride reads `_method` from the form body, then the header. The query
    # string counts here too, so tests can show a broker refuses `_method` wherever it appears.
    candidates = [
        params.body.get("_method") if params.body_is_form else None,
        params.query.get("_method"),
        headers.get("x-http-method-override"),
    ]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.upper() in _OVERRIDABLE_METHODS:
            return candidate.upper()
    return None


class RackLayer:
    """Pure-ASGI front layer: record every request, then prepare it the way Rack would."""

    def __init__(self, app: ASGIApp, state: SimState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Record the request, parse parameters, apply `_method` and `.json`, then route."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        self.state.received.append(
            ReceivedRequest(
                method=scope["method"],
                raw_path=raw_path_of(scope),
                query_string=bytes(scope.get("query_string", b"")).decode("latin-1"),
                headers=[
                    (bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1"))
                    for name, value in scope.get("headers", [])
                ],
                body=body,
            )
        )
        headers = Headers(scope=scope)
        query_string = bytes(scope.get("query_string", b"")).decode("latin-1")
        params = await parse_request_params(headers, query_string, body)
        scope = {**scope, PARAMS_SCOPE_KEY: params}
        if scope["method"] == "POST":
            override = _method_override(params, headers)
            if override is not None and override != "POST":
                scope[ORIGINAL_METHOD_SCOPE_KEY] = scope["method"]
                scope["method"] = override
        if scope["path"].endswith(".json"):
            scope["path"] = scope["path"].removesuffix(".json")
        await self.app(scope, _replaying(body, receive), send)


class _SimError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class _NotFoundError(_SimError):
    def __init__(self) -> None:
        super().__init__(404, NOT_FOUND)


@dataclass(frozen=True)
class ApiCall:
    """An authenticated API call as a handler sees it."""

    request: Request
    params: dict[str, Any]
    """Rails-style merged parameters (query string over body)."""
    user: User
    """The effective user: the token's owner, or whom it masquerades as."""
    base_url: str
    """`scheme://host` as Rails would build it for this request."""
    auth: Authenticated
    """The token that authenticated the call (its record, key and owner)."""

    def path_param(self, name: str) -> str:
        """Return a path parameter of the matched route."""
        return str(self.request.path_params[name])


Handler = Callable[[ApiCall], Response]


def _bearer_token(headers: Headers) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def _as_bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE_VALUES:
        return True
    if text in _FALSE_VALUES:
        return False
    raise _SimError(400, f"assignment[{name}] must be true or false")


def _as_points(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _SimError(400, "assignment[points_possible] must be a number")
    try:
        return float(value)
    except ValueError:
        raise _SimError(400, "assignment[points_possible] must be a number") from None


def _assignment_changes(call: ApiCall) -> dict[str, object]:
    """Validate the `assignment` parameter into attribute changes, before touching any record."""
    fields = call.params.get("assignment")
    if not isinstance(fields, dict):
        raise _SimError(400, "assignment is required")
    changes: dict[str, object] = {}
    if "name" in fields:
        changes["name"] = str(fields["name"])
    if "description" in fields:
        changes["description"] = str(fields["description"]) if fields["description"] else None
    if "points_possible" in fields:
        changes["points_possible"] = _as_points(fields["points_possible"])
    if "due_at" in fields:
        changes["due_at"] = str(fields["due_at"]) if fields["due_at"] else None
    if "submission_types" in fields:
        types = fields["submission_types"]
        changes["submission_types"] = [
            str(t) for t in (types if isinstance(types, list) else [types])
        ]
    if "published" in fields:
        changes["published"] = _as_bool(fields["published"], "published")
    return changes


def _apply(assignment: Assignment, changes: dict[str, object]) -> None:
    for attribute, value in changes.items():
        setattr(assignment, attribute, value)
    assignment.updated_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _CanvasApi:
    """The Canvas endpoints, over one `SimState`."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.oauth = OAuthProvider(state)
        self.access_tokens = AccessTokensApi(state)

    # --- the per-call pipeline -------------------------------------------------------------

    def endpoint(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler in Canvas's per-call pipeline, as a Starlette endpoint."""

        async def run(request: Request) -> Response:
            return await self._dispatch(request, handler)

        return run

    async def _dispatch(self, request: Request, handler: Handler) -> Response:
        params: RequestParams = request.scope[PARAMS_SCOPE_KEY]
        headers = request.headers
        state = self.state
        if params.body_error is not None:
            response = error_response(headers, 400, f"Bad request body: {params.body_error}")
            return self._finish(request, response, 0.0, state.throttle.full)
        merged = params.merged
        token = _bearer_token(headers) or merged.get("access_token")
        auth = authenticate(state, token if isinstance(token, str) else None)
        if isinstance(auth, Refused):
            response = json_response(headers, auth.body, auth.status_code, auth.headers)
            return self._finish(request, response, 0.0, state.throttle.full)
        assert isinstance(token, str)  # noqa: S101 - authenticate refuses anything else
        # Charged on arrival, settled once answered (broker/sim/throttle.py).
        method, path = request.method, request.url.path
        admission = state.throttle.admit(token, method, path, state.clock())
        try:
            if not admission.allowed:
                response = PlainTextResponse(
                    state.throttle.throttled_body, 403, media_type="text/plain; charset=utf-8"
                )
                user = None
            else:
                if state.latency > 0:
                    await asyncio.sleep(state.latency)
                response, user = self._run(request, handler, merged, auth)
        finally:
            cost, remaining = state.throttle.settle(admission, method, path, state.clock())
        return self._finish(request, response, cost, remaining, user)

    def _run(
        self, request: Request, handler: Handler, merged: dict[str, Any], auth: Authenticated
    ) -> tuple[Response, User | None]:
        headers = request.headers
        method = request.scope.get(ORIGINAL_METHOD_SCOPE_KEY, request.method)
        refusal = check_scopes(auth, method, raw_path_of(request.scope))
        if refusal is not None:
            return json_response(headers, refusal.body, refusal.status_code), None
        user = self.state.data.users[auth.user_id]
        masquerade = merged.get("as_user_id")
        if masquerade is not None:
            found = self.state.data.find_user(str(masquerade))
            if found is None:
                return error_response(headers, 401, "Invalid as_user_id"), None
            user = found
        base_url = request_base_url(request.url.scheme, headers, request.scope.get("server"))
        try:
            response = handler(ApiCall(request, merged, user, base_url, auth))
        except _SimError as exc:
            response = error_response(headers, exc.status_code, exc.message)
        return response, user

    def _finish(
        self,
        request: Request,
        response: Response,
        cost: float | None,
        remaining: float,
        user: User | None = None,
    ) -> Response:
        add_canvas_headers(response, cost, remaining)
        if user is not None:
            response.headers["X-Sim-Acting-User"] = str(user.id)
        if ORIGINAL_METHOD_SCOPE_KEY in request.scope:
            response.headers["X-Sim-Method-Override"] = request.scope["method"]
        return response

    async def route_not_found(self, request: Request, exc: Exception) -> Response:
        """Answer unrouted paths (and unrouted methods) with Canvas's 404 body."""
        del exc  # Starlette passes the 404/405 it raised; Canvas answers both the same way.
        response = error_response(request.headers, 404, NOT_FOUND)
        return self._finish(request, response, 0.0, self.state.throttle.full)

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _json(call: ApiCall, payload: object, status_code: int = 200) -> Response:
        return json_response(call.request.headers, payload, status_code)

    def _page(self, call: ApiCall, items: list[JSONObject], collection: str) -> Response:
        page = paginate(items, call.params, self.state.max_per_page)
        query_string = bytes(call.request.scope.get("query_string", b"")).decode("latin-1")
        links = page_links(page, call.base_url, raw_path_of(call.request.scope), query_string)
        headers = call.request.headers
        payload: Any = page.items
        if JSON_API_MEDIA_TYPE in headers.get("accept", ""):
            payload = {collection: page.items, "meta": {"pagination": pagination_meta(page, links)}}
        return json_response(headers, payload, headers={"Link": link_header(links)})

    def _course(self, call: ApiCall) -> Course:
        course = self.state.data.find_course(call.path_param("course_id"))
        if course is None:
            raise _NotFoundError
        return course

    def _assignment(self, call: ApiCall) -> Assignment:
        course = self._course(call)
        ref = call.path_param("assignment_id")
        assignment = self.state.data.assignments.get(int(ref)) if ref.isdigit() else None
        if assignment is None or assignment.course_id != course.id or assignment.deleted:
            raise _NotFoundError
        return assignment

    # --- users -----------------------------------------------------------------------------

    def show_user(self, call: ApiCall) -> Response:
        """GET /api/v1/users/:id (`self` is the effective user)."""
        ref = call.path_param("user_id")
        user = call.user if ref == "self" else self.state.data.find_user(ref)
        if user is None:
            raise _NotFoundError
        return self._json(call, user.to_json())

    # --- courses ---------------------------------------------------------------------------

    def list_courses(self, call: ApiCall) -> Response:
        """GET /api/v1/courses: the effective user's courses, with their enrolments."""
        data = self.state.data
        mine: dict[int, list[JSONObject]] = {}
        for enrollment in data.user_enrollments(call.user.id):
            mine.setdefault(enrollment.course_id, []).append(enrollment.to_course_summary())
        items = [data.courses[course_id].to_json(summary) for course_id, summary in mine.items()]
        return self._page(call, items, "courses")

    def show_course(self, call: ApiCall) -> Response:
        """GET /api/v1/courses/:id (numeric, `sis_course_id:` or `uuid:`)."""
        return self._json(call, self._course(call).to_json())

    def list_account_courses(self, call: ApiCall) -> Response:
        """GET /api/v1/accounts/:account_id/courses."""
        account = self.state.data.account
        if call.path_param("account_id") not in {str(account.id), "self"}:
            raise _NotFoundError
        courses = self.state.data.courses.values()
        return self._page(
            call, [c.to_json() for c in courses if c.account_id == account.id], "courses"
        )

    def list_course_users(self, call: ApiCall) -> Response:
        """GET /api/v1/courses/:course_id/users."""
        data = self.state.data
        enrollments = data.course_enrollments(self._course(call).id)
        user_ids = list(dict.fromkeys(e.user_id for e in enrollments))
        return self._page(call, [data.users[i].to_json() for i in user_ids], "users")

    def list_course_enrollments(self, call: ApiCall) -> Response:
        """GET /api/v1/courses/:course_id/enrollments."""
        data = self.state.data
        enrollments = data.course_enrollments(self._course(call).id)
        items = [e.to_json(data.users[e.user_id]) for e in enrollments]
        return self._page(call, items, "enrollments")

    # --- assignments -----------------------------------------------------------------------

    def list_assignments(self, call: ApiCall) -> Response:
        """GET /api/v1/courses/:course_id/assignments."""
        assignments = self.state.data.course_assignments(self._course(call).id)
        items = [a.to_json(call.base_url) for a in assignments]
        return self._page(call, items, "assignments")

    def show_assignment(self, call: ApiCall) -> Response:
        """GET /api/v1/courses/:course_id/assignments/:id."""
        return self._json(call, self._assignment(call).to_json(call.base_url))

    def create_assignment(self, call: ApiCall) -> Response:
        """POST /api/v1/courses/:course_id/assignments."""
        course = self._course(call)
        changes = _assignment_changes(call)
        name = changes.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _SimError(400, "assignment[name] is required")
        stored = self.state.data.add_assignment(course.id, name)
        _apply(stored, changes)
        stored.created_by_user_id = call.user.id
        return self._json(call, stored.to_json(call.base_url), 201)

    def update_assignment(self, call: ApiCall) -> Response:
        """PUT /api/v1/courses/:course_id/assignments/:id."""
        assignment = self._assignment(call)
        _apply(assignment, _assignment_changes(call))
        return self._json(call, assignment.to_json(call.base_url))

    def delete_assignment(self, call: ApiCall) -> Response:
        """DELETE /api/v1/courses/:course_id/assignments/:id: marks it deleted, returns it."""
        assignment = self._assignment(call)
        assignment.deleted = True
        return self._json(call, assignment.to_json(call.base_url))

    # --- files -----------------------------------------------------------------------------

    def _file_json(self, call: ApiCall, course_id: int | None) -> Response:
        ref = call.path_param("file_id")
        found = self.state.data.files.get(int(ref)) if ref.isdigit() else None
        if found is None or (course_id is not None and found.course_id != course_id):
            raise _NotFoundError
        return self._json(call, found.to_json(self.state.file_host))

    def show_file(self, call: ApiCall) -> Response:
        """GET /api/v1/files/:id."""
        return self._file_json(call, None)

    def show_course_file(self, call: ApiCall) -> Response:
        """GET /api/v1/courses/:course_id/files/:id."""
        return self._file_json(call, self._course(call).id)

    def download_file(self, call: ApiCall) -> Response:
        """GET /api/v1/files/:id/download: 302 to pre-signed storage on another host."""
        ref = call.path_param("file_id")
        found = self.state.data.files.get(int(ref)) if ref.isdigit() else None
        if found is None:
            raise _NotFoundError
        return RedirectResponse(found.download_url(self.state.file_host), 302)

    # --- endpoints a broker must never reach ------------------------------------------------

    def session_token(self, call: ApiCall) -> Response:
        """POST /login/session_token: turns an API token into a web-session URL."""
        token = secrets.token_urlsafe(24)
        return self._json(
            call, {"session_url": f"{call.base_url}/login/session_token?token={token}"}
        )

    def graphql(self, call: ApiCall) -> Response:
        """POST /api/graphql: a stand-in that answers every query with empty data."""
        return self._json(call, {"data": {}})

    def routes(self) -> list[Route]:
        """Build the routing table."""
        courses = "/api/v1/courses/{course_id}"
        assignment = f"{courses}/assignments/{{assignment_id}}"
        table: list[tuple[str, Handler, str]] = [
            ("/api/v1/users/{user_id}", self.show_user, "GET"),
            ("/api/v1/courses", self.list_courses, "GET"),
            (courses, self.show_course, "GET"),
            ("/api/v1/accounts/{account_id}/courses", self.list_account_courses, "GET"),
            (f"{courses}/users", self.list_course_users, "GET"),
            (f"{courses}/enrollments", self.list_course_enrollments, "GET"),
            (f"{courses}/assignments", self.list_assignments, "GET"),
            (f"{courses}/assignments", self.create_assignment, "POST"),
            (assignment, self.show_assignment, "GET"),
            (assignment, self.update_assignment, "PUT"),
            (assignment, self.delete_assignment, "DELETE"),
            (f"{courses}/files/{{file_id}}", self.show_course_file, "GET"),
            ("/api/v1/files/{file_id}", self.show_file, "GET"),
            ("/api/v1/files/{file_id}/download", self.download_file, "GET"),
            ("/login/session_token", self.session_token, "POST"),
            ("/api/graphql", self.graphql, "POST"),
        ]
        tokens = "/api/v1/users/{user_id}/tokens"
        table += [
            (tokens, self.access_tokens.create, "POST"),
            (f"{tokens}/{{token_id}}", self.access_tokens.show, "GET"),
            (f"{tokens}/{{token_id}}", self.access_tokens.update, "PUT"),
            (f"{tokens}/{{token_id}}", self.access_tokens.delete, "DELETE"),
        ]
        api = [
            Route(path, self.endpoint(handler), methods=[method]) for path, handler, method in table
        ]
        return api + self.oauth_routes()

    # --- the OAuth2 provider (broker/sim/oauth.py) -------------------------------------------

    def oauth_routes(self) -> list[Route]:
        """`/login/oauth2/auth`, the consent form's `/login/oauth2/accept`, and the token URL."""

        def merged(request: Request) -> dict[str, Any]:
            return dict(request.scope[PARAMS_SCOPE_KEY].merged)

        async def auth(request: Request) -> Response:
            return self.oauth.auth(request.headers, merged(request))

        async def accept(request: Request) -> Response:
            return self.oauth.accept(merged(request))

        async def token(request: Request) -> Response:
            return self.oauth.token(request.headers, merged(request))

        async def logout(request: Request) -> Response:
            value = _bearer_token(request.headers) or merged(request).get("access_token")
            return self.oauth.logout(request.headers, value if isinstance(value, str) else None)

        return [
            Route("/login/oauth2/auth", auth, methods=["GET"]),
            Route("/login/oauth2/accept", accept, methods=["POST"]),
            Route("/login/oauth2/token", token, methods=["POST"]),
            Route("/login/oauth2/token", logout, methods=["DELETE"]),
        ]


def create_sim_app(state: SimState) -> Starlette:
    """Build the simulator app over `state`; every request is recorded in `state.received`."""
    api = _CanvasApi(state)
    return Starlette(
        routes=api.routes(),
        middleware=[Middleware(RackLayer, state=state)],
        exception_handlers={HTTPException: api.route_not_found},
    )
