r"""Developer-key scope enforcement, as Canvas matches a request against a token's scopes.

Independent of the broker's own matcher (`broker/core/scopes.py`) on purpose: the simulator is
what the broker is checked against.

Canvas (`app/models/access_token.rb#url_scopes_for_method` and
`lib/authentication_methods.rb#validate_scopes`) turns each `url:METHOD|/route/path` scope of the
request's method into a regular expression built from the Rails route path:

- a `:param` segment becomes `[^/]+` (one path segment);
- a `*glob` segment becomes `.+` (anything, slashes included);
- `(` opens an optional group and `)` closes it (`(?:` … `|)`);
- any `.format` suffix is allowed (`(?:\\.[^/]+|)` is appended);
- the whole is anchored (`^…$`); other characters are left as they are (so a `.` in a route is
  a regex wildcard there too).

The request's method is upper-cased, HEAD counting as GET, and the pattern is matched against
`request.path`: the raw, still percent-encoded path, so `%2F` is not a segment boundary. The
token endpoint `/login/oauth2/token` is always allowed (`AccessToken.always_allowed_scopes`).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable

ALWAYS_ALLOWED_PATHS: Final = ("/login/oauth2/token",)
"""`AccessToken.always_allowed_scopes`: paths every scoped token may call."""

_PARAM = re.compile(r":[^/)]+")
_GLOB = re.compile(r"\*[^/)]+")


@lru_cache(maxsize=4096)
def route_pattern(route: str) -> re.Pattern[str] | None:
    """Compile a scope's route path (`/api/v1/courses/:course_id`) into Canvas's regex.

    None when the result is not a valid regex: Canvas's `:[^/)]+` also swallows a `(` right
    after a parameter (`:id(/x)`), leaving an unbalanced `)`; Ruby would raise there, and such
    a scope grants nothing here. No scope Canvas offers has that shape.
    """
    pattern = _PARAM.sub("[^/]+", route)
    pattern = _GLOB.sub(".+", pattern)
    pattern = pattern.replace("(", "(?:").replace(")", "|)")
    try:
        return re.compile(f"^{pattern}(?:\\.[^/]+|)$")
    except re.error:
        return None


def scope_method(method: str) -> str:
    """The method a request is checked under: upper-cased, HEAD counting as GET."""
    upper = method.upper()
    return "GET" if upper == "HEAD" else upper


def routes_for_method(scopes: Iterable[str], method: str) -> list[str]:
    """The route paths of the `url:` scopes granted for `method` (already normalised)."""
    prefix = f"url:{method}|"
    return [scope.split("|")[-1] for scope in scopes if scope.startswith(prefix)]


def scopes_allow(scopes: Iterable[str], method: str, raw_path: str) -> bool:
    """Whether a token with `scopes` may call `method raw_path` on a key enforcing scopes."""
    if raw_path in ALWAYS_ALLOWED_PATHS:
        return True
    routes = routes_for_method(scopes, scope_method(method))
    patterns = (route_pattern(route) for route in routes)
    return any(p is not None and p.match(raw_path) for p in patterns)


def missing_scopes(requested: Iterable[str], granted: Iterable[str]) -> list[str]:
    """`Canvas::OAuth::Provider#missing_scopes`: the requested scopes the key does not have."""
    allowed = set(granted)
    return [scope for scope in requested if scope not in allowed]


def to_sentence(items: list[str]) -> str:
    """Rails's `Array#to_sentence` in English: `a`, `a and b`, `a, b, and c`."""
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:  # noqa: PLR2004 - Rails's two-word connector
        return f"{items[0]} and {items[1]}"
    return f"{', '.join(items[:-1])}, and {items[-1]}"
