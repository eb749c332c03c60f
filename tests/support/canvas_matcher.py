"""A port of Canvas's own scope matcher, to compare the broker's verdicts with.

Canvas builds one regex per scope in ``AccessToken#url_scopes_for_method``
(``app/models/access_token.rb`` in instructure/canvas-lms) and checks ``request.path``
against them in ``validate_scopes`` (``lib/authentication_methods.rb``), HEAD as GET. The
port keeps Canvas's steps exactly; :class:`Restrictions` switches on, one by one, the ways
the broker is documented to be stricter (docs/grants.md), so a test can show that those, and
nothing else, separate the broker from Canvas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from broker.core import rules
from broker.core.scopes import EXACT_ONLY, Grant
from broker.errors import Refusal

_DYNAMIC = re.compile(r":[^/)]+")
_GLOB = re.compile(r"\*[^/)]+")


@dataclass(frozen=True)
class Restrictions:
    """The broker's documented departures from Canvas's matcher (all off: Canvas itself)."""

    json_suffix_only: bool = False
    literal_dot: bool = False
    word_parameter_names: bool = False
    exact_methods: bool = False
    inert_scopes_match_nothing: bool = False
    exact_only_endpoints: bool = False
    canonical_paths: bool = False

    @classmethod
    def broker(cls) -> Restrictions:
        """Every documented departure on: what the broker should decide."""
        return cls(*[True] * 7)


@lru_cache(maxsize=65536)
def _scope_regex(path: str, restrictions: Restrictions) -> re.Pattern[str] | None:
    """Canvas's regex for a scope path; None where Ruby would fail to compile it."""
    if restrictions.literal_dot:
        path = path.replace(".", "\\.")
    if restrictions.word_parameter_names:
        path = re.sub(r":[A-Za-z_][A-Za-z0-9_]*", "[^/]+", path)
        path = re.sub(r"\*[A-Za-z_][A-Za-z0-9_]*", ".+", path)
    else:
        path = _DYNAMIC.sub("[^/]+", path)
        path = _GLOB.sub(".+", path)
    path = path.replace("(", "(?:").replace(")", "|)")
    suffix = r"(?:\.json|)" if restrictions.json_suffix_only else r"(?:\.[^/]+|)"
    try:
        # Ruby's ^ and $ anchor lines, Python's only with MULTILINE.
        return re.compile(f"^{path}{suffix}$", re.MULTILINE)
    except re.error:
        return None


_EXACT_SHAPES = frozenset(re.sub(r"([:*])\w+", r"\1", e.path) for e in EXACT_ONLY)
_EXACT_PATH = re.compile(
    "|".join(
        "(?:" + re.sub(r":\w+", "[^/]+", re.sub(r"\*\w+", ".+", e.path)) + r"(?:\.[^/]*)?)"
        for e in EXACT_ONLY
    )
)


def canvas_allows(
    scopes: list[str], method: str, path: str, restrictions: Restrictions | None = None
) -> bool:
    """Whether Canvas's ``validate_scopes`` lets ``method path`` through a key with ``scopes``.

    Canvas's ``always_allowed_scopes`` (``/login/oauth2/token``) is left out: the broker never
    proxies a token request it was not granted, and documents so.
    """
    chosen = restrictions or Restrictions()
    if chosen.canonical_paths:
        try:
            rules.check_path(path.encode("ascii"))
        except (Refusal, UnicodeEncodeError):
            return False
    # `request.method.upcase`, HEAD as GET; the broker compares methods exactly instead.
    request_method = "GET" if method.upper() == "HEAD" else method.upper()
    if chosen.exact_methods and method not in {request_method, "HEAD"}:
        return False
    inert = {raw for raw, _why in Grant.compile(scopes).inert_scopes()} if scopes else set()
    exact_only = chosen.exact_only_endpoints and _EXACT_PATH.fullmatch(path) is not None
    prefix = re.compile(rf"^url:{re.escape(request_method)}\|")
    for scope in scopes:
        if not prefix.match(scope):
            continue
        if chosen.inert_scopes_match_nothing and scope in inert:
            continue
        scope_path = scope.split("|")[-1]
        if exact_only and not _names_exactly(scope_path):
            continue
        regex = _scope_regex(scope_path, chosen)
        if regex is not None and regex.search(path):
            return True
    return False


def _names_exactly(scope_path: str) -> bool:
    literal = not re.search(r"[:*(]", scope_path)
    return literal or re.sub(r"([:*])\w+", r"\1", scope_path) in _EXACT_SHAPES
