r"""Canvas scope strings, and grants built from them (docs/grants.md).

A scope string is what Canvas shows on a developer key, for example
``url:GET|/api/v1/courses/:course_id/assignments``. Matching follows Canvas's own rule
(``app/models/access_token.rb``, ``url_scopes_for_method``, in instructure/canvas-lms): the
path becomes an anchored regular expression in which ``:name`` matches one non-empty segment,
``*name`` matches the rest of the path, ``( … )`` is optional, and an optional format suffix
is accepted at the end. ``HEAD`` requests are checked as ``GET`` (Canvas's ``validate_scopes``
in ``lib/authentication_methods.rb``).

Where the broker is stricter than Canvas, on purpose (each listed in docs/grants.md):

- Canvas accepts any format suffix (``(?:\.[^/]+|)``); the broker accepts ``.json`` alone, the
  one format the API serves.
- Canvas pastes the rest of the path into its regex unescaped, so ``.`` in
  ``…/bounced_communication_channels.csv`` matches any character; the broker matches it
  literally. A scope using a character that Canvas reads as regex syntax in any other way
  (``+ [ ] { } ^ $ | \``), or a ``(``, ``:`` or ``*`` inside what Canvas reads as one
  parameter name (a name runs to the next ``/`` or ``)``), would not mean what it says: it is
  *inert* (matches nothing) and refused when a grant is saved. So is a ``url:HEAD|`` scope:
  Canvas checks HEAD as GET, so such a scope never matches there either.
- Only ``/api/v1/``, ``/api/quiz/v1/`` and ``/api/sis/`` (the routes Canvas's own scope list
  covers) are opened by patterns. A scope elsewhere (``/login/…``, ``/api/graphql``) must name
  its path literally; a pattern there is inert and refused when saved.
- A few endpoints turn the worker's API access into another credential or a browser session
  (:data:`EXACT_ONLY`). A parameter or glob scope that merely happens to match one of them
  does not open it: only a scope naming that endpoint exactly does (a literal path, or the
  endpoint's own route pattern).

A :class:`Grant` is a list of scopes plus optional constraints on path parameter values. It
denies by default: a call that matches no scope is refused.

Exceptions::

    ValueError
     └── ScopeError    an invalid scope string or constraint
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final
from urllib.parse import unquote

from broker.errors import Refusal, ScopeError

__all__ = [
    "EXACT_ONLY",
    "METHODS",
    "PROXIED_PREFIXES",
    "Decision",
    "ExactOnly",
    "Grant",
    "Scope",
    "ScopeError",
    "parse_scope",
]

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods a scope string may name (upper case exactly). ``HEAD`` parses but is inert."""

PROXIED_PREFIXES: Final = ("/api/v1/", "/api/quiz/v1/", "/api/sis/")
"""Where parameter, glob and optional scopes apply: the API routes Canvas scopes
(``lib/token_scopes.rb`` in canvas-lms). Anything else opens only through a literal scope."""


@dataclass(frozen=True, slots=True)
class ExactOnly:
    """An endpoint that only a scope naming it exactly opens, and why."""

    path: str
    why: str


EXACT_ONLY: Final = (
    ExactOnly("/login/*rest", "Canvas's web login: sessions, OAuth flows and logout"),
    ExactOnly("/api/graphql", "one endpoint reaching everything the worker user can see"),
    ExactOnly("/api/graphql/*rest", "GraphQL, as above"),
    ExactOnly("/api/v1/login/session_token", "turns the worker's API token into a browser session"),
    ExactOnly("/api/v1/inst_access_tokens", "mints an InstAccess token acting as the worker"),
    ExactOnly("/api/v1/users/:user_id/tokens", "creates Canvas access tokens"),
    ExactOnly("/api/v1/users/:user_id/tokens/:id", "shows, regenerates or deletes access tokens"),
    ExactOnly(
        "/api/v1/accounts/:account_id/developer_keys", "lists and creates developer key secrets"
    ),
    ExactOnly("/api/v1/developer_keys/:id", "changes developer keys"),
    ExactOnly(
        "/api/v1/users/self/pandata_events_token", "mints a token for Canvas's event service"
    ),
    ExactOnly("/api/v1/services/kaltura_session", "opens a Kaltura media session"),
    ExactOnly(
        "/api/v1/courses/:course_id/external_tools/sessionless_launch",
        "returns a one-time URL that launches a tool as the worker",
    ),
    ExactOnly(
        "/api/v1/accounts/:account_id/external_tools/sessionless_launch",
        "returns a one-time URL that launches a tool as the worker",
    ),
)
"""Endpoints that a pattern scope never opens (docs/grants.md, "Exact-only endpoints")."""

_PREFIX: Final = "url:"
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER: Final = re.compile(r"([:*])[A-Za-z_][A-Za-z0-9_]*")
_FORMAT_SUFFIX: Final = r"(?:\.json)?"
# A numeric (or shard-qualified) ID followed by the format, as Rails would split `1201.json`.
_ID_WITH_FORMAT: Final = re.compile(r"([0-9]+(?:~[0-9]+)?)\.json")
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Characters Canvas's scope regex reads as syntax ('.' aside, which only widens it there).
_CANVAS_REGEX_SYNTAX: Final = frozenset("+[]{}^$|\\")
_INDEX_THRESHOLD: Final = 8


def _shape(path: str) -> str:
    """The path with parameter names left out, so ``:id`` and ``:user_id`` compare equal."""
    return _PLACEHOLDER.sub(r"\1", path)


_EXACT_SHAPES: Final = frozenset(_shape(endpoint.path) for endpoint in EXACT_ONLY)


def _endpoint_regex(path: str) -> str:
    """A regex for an exact-only endpoint, with any format suffix counting as it."""
    parts = []
    position = 0
    for placeholder in _PLACEHOLDER.finditer(path):
        parts.append(re.escape(path[position : placeholder.start()]))
        parts.append("[^/]+" if placeholder.group(1) == ":" else ".+")
        position = placeholder.end()
    parts.append(re.escape(path[position:]))
    return "".join(parts) + r"(?:\.[^/]*)?"


_EXACT_ONLY_PATH: Final = re.compile(
    "|".join(f"(?:{_endpoint_regex(endpoint.path)})" for endpoint in EXACT_ONLY)
)


@dataclass(frozen=True, slots=True)
class Scope:
    """One parsed ``url:<METHOD>|<path>`` scope string.

    ``params`` lists the names of the ``:param`` and ``*glob`` placeholders in order;
    ``globs`` is the subset that are globs. ``pattern`` is the compiled Canvas regex.
    ``literal`` is True when the path has no placeholders or optional parts. ``inert`` says
    why the scope can never match (see the module docstring), or is None.
    """

    raw: str
    method: str
    path: str
    params: tuple[str, ...]
    globs: frozenset[str] = field(compare=False)
    pattern: re.Pattern[str] = field(repr=False, compare=False)
    literal: bool = field(default=False, compare=False)
    inert: str | None = field(default=None, compare=False)
    shape: str = field(default="", compare=False)
    """The path with parameter names left out: ``/api/v1/users/:/tokens``."""
    names_exactly: bool = field(default=False, compare=False)
    """Whether the scope may open an exact-only endpoint that it matches."""

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """Match a request; return its raw (still percent-encoded) parameter values or None.

        Parameters inside an optional group that did not take part are left out. An inert
        scope matches nothing.
        """
        if self.inert is not None or _method_checked_as(method) != self.method:
            return None
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {name: value for name, value in found.groupdict().items() if value is not None}


def parse_scope(text: str) -> Scope:
    """Parse one scope string, raising :class:`ScopeError` if it is not a valid URL scope.

    A scope that parses but can never match (see the module docstring) comes back with
    ``inert`` set; :meth:`Grant.inert_scopes` lists them so that saving such a grant fails.
    """
    stripped = text.strip()
    if not stripped.startswith(_PREFIX):
        raise ScopeError(f"scope {text!r} is not a url:<METHOD>|<path> scope")
    method, bar, path = stripped.removeprefix(_PREFIX).partition("|")
    if not bar:
        raise ScopeError(f"scope {text!r} has no '|' between method and path")
    if method not in METHODS:
        raise ScopeError(f"scope {text!r} names unknown method {method!r}")
    _check_path_characters(text, path)
    regex, params, globs = _path_regex(text, path)
    literal = not params and "(" not in path
    shape = _shape(path)
    return Scope(
        raw=stripped,
        method=method,
        path=path,
        params=params,
        globs=globs,
        pattern=re.compile(regex),
        literal=literal,
        inert=_inert_reason(method, path, literal=literal),
        shape=shape,
        names_exactly=literal or shape in _EXACT_SHAPES,
    )


def _inert_reason(method: str, path: str, *, literal: bool) -> str | None:
    if method == "HEAD":
        return "names HEAD, which Canvas checks as GET: grant the url:GET| scope instead"
    syntax = sorted(_CANVAS_REGEX_SYNTAX.intersection(path))
    if syntax:
        return (
            f"contains {syntax[0]!r}, which Canvas reads as regular-expression syntax, so the "
            "scope would not mean what it says"
        )
    for name in _CANVAS_PARAMETER.findall(path):
        if any(char in name[1:] for char in ":*("):
            return (
                f"has {name!r}, which Canvas reads as one parameter name (a name runs to the "
                "next '/' or ')'), so the scope would not mean what it says"
            )
    if not literal and not path.startswith(PROXIED_PREFIXES):
        return (
            "uses parameters or optional parts outside /api/v1/, /api/quiz/v1/ and /api/sis/, "
            "where the broker opens only paths a scope names literally"
        )
    return None


# How Canvas finds a parameter or glob name: everything up to the next '/' or ')'.
_CANVAS_PARAMETER: Final = re.compile(r"[:*][^/)]+")


def _method_checked_as(method: str) -> str:
    """The method whose scopes a request is checked against (HEAD as GET, as Canvas does)."""
    return "GET" if method == "HEAD" else method


def _check_path_characters(text: str, path: str) -> None:
    if not path.startswith("/"):
        raise ScopeError(f"scope {text!r} has a path that does not start with '/'")
    for char in path:
        if not "\x21" <= char <= "\x7e":
            raise ScopeError(f"scope {text!r} has a path with a space or non-ASCII character")
        if char in "?#":
            raise ScopeError(f"scope {text!r} has a path containing {char!r}")


def _path_regex(text: str, path: str) -> tuple[str, tuple[str, ...], frozenset[str]]:
    """Translate a scope path into Canvas's regex, collecting the parameter names."""
    parts: list[str] = ["^"]
    params: list[str] = []
    globs: set[str] = set()
    depth = 0
    index = 0
    while index < len(path):
        char = path[index]
        if char in ":*":
            name = _param_name(text, path, index)
            if name in params:
                raise ScopeError(f"scope {text!r} repeats parameter {name!r}")
            params.append(name)
            if char == "*":
                globs.add(name)
            parts.append(f"(?P<{name}>{'[^/]+' if char == ':' else '.+'})")
            index += 1 + len(name)
            continue
        if char == "(":
            depth += 1
            parts.append("(?:")
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ScopeError(f"scope {text!r} has an unbalanced ')'")
            parts.append(")?")
        else:
            parts.append(re.escape(char))
        index += 1
    if depth:
        raise ScopeError(f"scope {text!r} has an unbalanced '('")
    parts.append(_FORMAT_SUFFIX + "$")
    return "".join(parts), tuple(params), frozenset(globs)


def _param_name(text: str, path: str, index: int) -> str:
    found = _NAME.match(path, index + 1)
    if found is None:
        raise ScopeError(f"scope {text!r} has a {path[index]!r} without a parameter name")
    return found.group()


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of checking one call against a grant.

    ``scope`` is the scope string that matched the path (also on a refusal that a matching
    scope caused). ``reason`` is None when allowed, else one of ``scope_not_granted`` (no
    scope matches), ``constraint_violation`` (a matching scope's constraints fail),
    ``exact_scope_required`` (only pattern scopes match an exact-only endpoint) or
    ``path_not_proxied`` (a path outside :data:`PROXIED_PREFIXES` that no scope names).
    ``params`` holds the matched scope's raw (still percent-encoded) parameter values when the
    call is allowed.
    """

    allowed: bool
    scope: str | None
    reason: str | None
    detail: str
    params: Mapping[str, str] = field(default_factory=dict, compare=False)

    def refusal(self) -> Refusal:
        """The 403 refusal of a call this decision does not allow."""
        return Refusal(403, self.reason or "scope_not_granted", self.detail)


@dataclass(frozen=True, slots=True)
class Grant:
    """Scopes plus constraints on parameter values; build one with :meth:`compile`."""

    scopes: tuple[Scope, ...]
    constraints: Mapping[str, frozenset[str]]
    _matcher: _Matcher = field(repr=False, compare=False)

    @classmethod
    def compile(
        cls,
        scopes: Sequence[str],
        constraints: Mapping[str, Sequence[str]] | None = None,
    ) -> Grant:
        """Parse scope strings and constraints, raising :class:`ScopeError` naming a bad one.

        Repeated scope strings are kept once. Inert scopes are kept (they match nothing);
        :meth:`inert_scopes` lists them.
        """
        if isinstance(scopes, str):
            raise ScopeError(f"scopes must be a list of scope strings, not the string {scopes!r}")
        parsed: dict[str, Scope] = {}
        for text in scopes:
            if not isinstance(text, str):
                raise ScopeError(f"scope {text!r} is not a string")
            scope = parse_scope(text)
            parsed.setdefault(scope.raw, scope)
        return cls._of(tuple(parsed.values()), _compile_constraints(constraints or {}))

    @classmethod
    def _of(cls, scopes: tuple[Scope, ...], constraints: Mapping[str, frozenset[str]]) -> Grant:
        return cls(scopes, constraints, _Matcher(scopes))

    def parameters(self) -> list[str]:
        """Every ``:param`` and ``*glob`` name the grant's scopes have, sorted."""
        return sorted({name for scope in self.scopes for name in scope.params})

    def unknown_constraints(self) -> list[str]:
        """Constraint names that no scope of the grant has, sorted.

        Such a constraint constrains nothing: a constraint applies only to the scopes naming
        its parameter, so a misspelt one (``courseid`` for ``:course_id``) would leave every
        scope unconstrained. Saving a grant refuses them (docs/grants.md#constraints); a
        token's subset of the scopes may lack a constrained parameter, so compiling does not.
        """
        known = set(self.parameters())
        return sorted(name for name in self.constraints if name not in known)

    def inert_scopes(self) -> list[tuple[str, str]]:
        """``(scope string, why it can never match)`` for each inert scope, in order."""
        return [(scope.raw, scope.inert) for scope in self.scopes if scope.inert is not None]

    def check(self, method: str, path: str) -> Decision:
        """Decide whether a call (raw, percent-encoded, canonical path) is allowed.

        The call is allowed if any matching scope's constraints pass, except that an
        exact-only endpoint is opened only by a scope that names it exactly.
        """
        refusal: Decision | None = None
        pattern_only: Scope | None = None
        exact_only: bool | None = None
        for scope in self._matcher.candidates(_method_checked_as(method), path):
            found = scope.pattern.fullmatch(path)
            if found is None:
                continue
            if not scope.names_exactly:
                if exact_only is None:
                    exact_only = _EXACT_ONLY_PATH.fullmatch(path) is not None
                if exact_only:
                    pattern_only = pattern_only or scope
                    continue
            problem = self._constraint_problem(scope, found)
            if problem is None:
                params = {k: v for k, v in found.groupdict().items() if v is not None}
                return Decision(
                    allowed=True,
                    scope=scope.raw,
                    reason=None,
                    detail=f"allowed by {scope.raw}",
                    params=params,
                )
            if refusal is None:
                refusal = Decision(
                    allowed=False, scope=scope.raw, reason="constraint_violation", detail=problem
                )
        return refusal or _refusal(method, path, pattern_only)

    def subset(self, requested: Sequence[str]) -> Grant:
        """Return a grant with only the requested scopes, which must all be in this grant.

        Scope strings compare after stripping surrounding whitespace; constraints carry over.
        """
        if isinstance(requested, str):
            raise ScopeError(f"requested scopes must be a list, not the string {requested!r}")
        known = {scope.raw: scope for scope in self.scopes}
        chosen: dict[str, Scope] = {}
        for text in requested:
            scope = known.get(text.strip()) if isinstance(text, str) else None
            if scope is None:
                raise ScopeError(f"scope {text!r} is not part of the grant")
            chosen.setdefault(scope.raw, scope)
        return Grant._of(tuple(chosen.values()), self.constraints)

    def scope_strings(self) -> list[str]:
        """Return the grant's scope strings in order."""
        return [scope.raw for scope in self.scopes]

    def _constraint_problem(self, scope: Scope, found: re.Match[str]) -> str | None:
        for name, allowed in self.constraints.items():
            if name not in scope.params:
                continue
            raw = found.group(name)
            if raw is None:
                # Fail closed: an optional constrained parameter left out would widen the call.
                return f"{name} is constrained but absent from the path"
            if not _value_allowed(found, name, allowed, glob=name in scope.globs):
                shown = _decode(raw)
                return (
                    f"{name} {_excerpt(raw if shown is None else shown)!r} "
                    "is not allowed by the grant's constraints"
                )
        return None


def _refusal(method: str, path: str, pattern_only: Scope | None) -> Decision:
    """Why no scope allowed the call."""
    shown = f"{method} {_excerpt(path)}"
    if pattern_only is not None:
        return Decision(
            allowed=False,
            scope=pattern_only.raw,
            reason="exact_scope_required",
            detail=f"{shown} opens only through a scope naming it exactly, "
            f"not through the pattern {pattern_only.raw}",
        )
    if not path.startswith(PROXIED_PREFIXES):
        return Decision(
            allowed=False,
            scope=None,
            reason="path_not_proxied",
            detail=f"{shown} is not proxied: it is outside the Canvas API and no scope names it",
        )
    return Decision(
        allowed=False,
        scope=None,
        reason="scope_not_granted",
        detail=f"no granted scope matches {shown}",
    )


def _compile_constraints(constraints: Mapping[str, Sequence[str]]) -> Mapping[str, frozenset[str]]:
    compiled: dict[str, frozenset[str]] = {}
    for name, values in constraints.items():
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise ScopeError(f"constraint name {name!r} is not a valid parameter name")
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise ScopeError(f"constraint {name!r} needs a non-empty list of values")
        for value in values:
            if not isinstance(value, str) or not value:
                raise ScopeError(f"constraint {name!r} has an invalid value {value!r}")
        compiled[name] = frozenset(values)
    return MappingProxyType(compiled)


def _value_allowed(found: re.Match[str], name: str, allowed: frozenset[str], *, glob: bool) -> bool:
    raw = found.group(name)
    if _decode(raw) in allowed:
        return True
    if glob:
        return False
    # Rails routes `/courses/1201.json` as id=1201 with a format, but only at the end of the path.
    path = found.string
    if path.rfind("/") >= found.start(name):
        return False
    id_with_format = _ID_WITH_FORMAT.fullmatch(raw)
    return id_with_format is not None and id_with_format.group(1) in allowed


def _decode(raw: str) -> str | None:
    """Percent-decode a path parameter strictly; None if an escape is invalid or not UTF-8."""
    if _BAD_ESCAPE.search(raw):
        return None
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None


def _excerpt(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Matcher:
    """The scopes a request could match, by method, in grant order; inert scopes left out.

    A large grant (a vendor's whole list, or Canvas's 1,092 scopes) is indexed by path
    segments, so a check runs the regexes of a few candidates instead of every scope.
    """

    __slots__ = ("_by_method", "_tries")

    def __init__(self, scopes: Sequence[Scope]) -> None:
        self._by_method: dict[str, list[tuple[int, Scope]]] = {}
        for position, scope in enumerate(scopes):
            if scope.inert is None:
                self._by_method.setdefault(scope.method, []).append((position, scope))
        self._tries = {
            method: _SegmentTrie(entries)
            for method, entries in self._by_method.items()
            if len(entries) > _INDEX_THRESHOLD
        }

    def candidates(self, method: str, path: str) -> list[Scope]:
        """Every scope of ``method`` whose regex might match ``path``, in grant order."""
        trie = self._tries.get(method)
        if trie is not None:
            return trie.candidates(path)
        return [scope for _position, scope in self._by_method.get(method, ())]


class _TrieNode:
    __slots__ = ("children", "end", "here", "param")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.param: _TrieNode | None = None
        self.here: list[tuple[int, Scope]] = []  # to try whenever a lookup passes this node
        self.end: list[tuple[int, Scope]] = []  # to try when the path ends here


_WHOLE_PARAM: Final = re.compile(r":[A-Za-z_][A-Za-z0-9_]*")


class _SegmentTrie:
    """Scopes by their leading path segments: literal ones, and whole-segment ``:params``.

    A scope is filed along its segments until one that is neither (a glob, an optional part,
    a parameter inside a segment); from there its regex decides. The index only narrows the
    candidates: every candidate's regex is still run, so it can never allow what the regex
    would not, and it never leaves out a scope whose regex could match (each segment edge
    accepts at least what the regex accepts there, the last one with a ``.json`` suffix too).
    """

    def __init__(self, entries: Sequence[tuple[int, Scope]]) -> None:
        self._root = _TrieNode()
        for entry in entries:
            self._insert(entry)

    def _insert(self, entry: tuple[int, Scope]) -> None:
        node = self._root
        for segment in entry[1].path[1:].split("/"):
            if _WHOLE_PARAM.fullmatch(segment):
                node.param = node.param or _TrieNode()
                node = node.param
            elif not any(char in segment for char in ":*()"):
                node = node.children.setdefault(segment, _TrieNode())
            else:
                node.here.append(entry)
                return
        node.end.append(entry)

    def candidates(self, path: str) -> list[Scope]:
        segments = path[1:].split("/")
        last = len(segments) - 1
        found: dict[int, Scope] = {}
        pending = [(self._root, 0)]
        while pending:
            node, depth = pending.pop()
            found.update(node.here)
            if depth > last:
                found.update(node.end)
                continue
            segment = segments[depth]
            child = node.children.get(segment)
            if child is not None:
                pending.append((child, depth + 1))
            if depth == last and segment.endswith(".json"):
                bare = node.children.get(segment[: -len(".json")])
                if bare is not None:
                    pending.append((bare, depth + 1))
            if node.param is not None and segment:
                pending.append((node.param, depth + 1))
        return [found[position] for position in sorted(found)]
