r"""Canvas scope strings, and grants built from them.

A scope string is what Canvas shows on a developer key, for example
``url:GET|/api/v1/courses/:course_id/assignments``. Matching follows Canvas's own rule: the
path becomes an anchored regular expression in which ``:name`` matches one non-empty segment,
``*name`` matches the rest of the path, ``( … )`` is optional, and an optional ``.json``
format suffix is accepted at the end. ``HEAD`` requests are checked as ``GET``.

Canvas's own rule accepts any suffix (``(?:\.[^/]+)?``), so ``.xml`` or ``.json.json``
would pass it. The API speaks only JSON and Rails routes a single format, so the broker
accepts ``.json`` alone: the other suffixes serve no real client and only make more spellings
of one call to reason about.

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

__all__ = ["METHODS", "Decision", "Grant", "Scope", "ScopeError", "parse_scope"]

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
"""Methods a scope string may name (upper case exactly)."""

_PREFIX: Final = "url:"
_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FORMAT_SUFFIX: Final = r"(?:\.json)?"
# A numeric (or shard-qualified) ID followed by the format, as Rails would split `1201.json`.
_ID_WITH_FORMAT: Final = re.compile(r"([0-9]+(?:~[0-9]+)?)\.json")
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


class ScopeError(ValueError):
    """An invalid scope string or constraint; the message names the offending string."""


@dataclass(frozen=True, slots=True)
class Scope:
    """One parsed ``url:<METHOD>|<path>`` scope string.

    ``params`` lists the names of the ``:param`` and ``*glob`` placeholders in order;
    ``globs`` is the subset that are globs. ``pattern`` is the compiled Canvas regex.
    """

    raw: str
    method: str
    path: str
    params: tuple[str, ...]
    globs: frozenset[str] = field(compare=False)
    pattern: re.Pattern[str] = field(repr=False, compare=False)

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """Match a request; return its raw (still percent-encoded) parameter values or None.

        Parameters inside an optional group that did not take part are left out.
        """
        found = _match(self, method, path)
        if found is None:
            return None
        return {name: value for name, value in found.groupdict().items() if value is not None}


def parse_scope(text: str) -> Scope:
    """Parse one scope string, raising :class:`ScopeError` if it is not a valid URL scope."""
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
    return Scope(
        raw=stripped,
        method=method,
        path=path,
        params=params,
        globs=globs,
        pattern=re.compile(regex),
    )


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


def _match(scope: Scope, method: str, path: str) -> re.Match[str] | None:
    if method != scope.method and not (method == "HEAD" and scope.method == "GET"):
        return None
    return scope.pattern.fullmatch(path)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of checking one call against a grant.

    ``scope`` is the scope string that matched the path (also on a constraint violation);
    ``reason`` is None when allowed, else ``"scope_not_granted"`` or
    ``"constraint_violation"``. ``params`` holds the matched scope's raw (still
    percent-encoded) parameter values when the call is allowed.
    """

    allowed: bool
    scope: str | None
    reason: str | None
    detail: str
    params: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class Grant:
    """Scopes plus constraints on parameter values; build one with :meth:`compile`."""

    scopes: tuple[Scope, ...]
    constraints: Mapping[str, frozenset[str]]

    @classmethod
    def compile(
        cls,
        scopes: Sequence[str],
        constraints: Mapping[str, Sequence[str]] | None = None,
    ) -> Grant:
        """Parse scope strings and constraints, raising :class:`ScopeError` naming a bad one.

        Repeated scope strings are kept once.
        """
        if isinstance(scopes, str):
            raise ScopeError(f"scopes must be a list of scope strings, not the string {scopes!r}")
        parsed: dict[str, Scope] = {}
        for text in scopes:
            if not isinstance(text, str):
                raise ScopeError(f"scope {text!r} is not a string")
            scope = parse_scope(text)
            parsed.setdefault(scope.raw, scope)
        return cls(tuple(parsed.values()), _compile_constraints(constraints or {}))

    def check(self, method: str, path: str) -> Decision:
        """Decide whether a call (raw, percent-encoded path) is allowed by this grant.

        The call is allowed if any matching scope's constraints pass.
        """
        refusal: Decision | None = None
        for scope in self.scopes:
            found = _match(scope, method, path)
            if found is None:
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
        if refusal is not None:
            return refusal
        return Decision(
            allowed=False,
            scope=None,
            reason="scope_not_granted",
            detail=f"no granted scope matches {method} {_excerpt(path)}",
        )

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
        return Grant(tuple(chosen.values()), self.constraints)

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
