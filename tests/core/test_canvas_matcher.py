"""The broker's grant decisions against a port of Canvas's own scope matcher.

Over tens of thousands of generated calls (fixed seed, so a failure reproduces): the broker
never allows a call Canvas's matcher would refuse, and where it refuses one Canvas would
allow, the documented departures (docs/grants.md), and nothing else, explain it.
"""

from __future__ import annotations

import random
import re
from dataclasses import fields, replace
from functools import lru_cache

import pytest

from broker.core import rules
from broker.core.catalogue import canvas_scopes
from broker.core.scopes import EXACT_ONLY, Grant
from broker.errors import Refusal, ScopeError
from tests.support.canvas_matcher import Restrictions, canvas_allows

CALLS = 40_000
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "head"]
VALUES = [
    "1201", "self", "a.b", "1201.json", "1201.xml", "x%2Fy", "%2E%2E", "..", ".", "sis_id:1",
    "a~b", "", "login", "session_token", "tokens", "a-b", "%41", "7;x", "json", "x.json.json",
]  # fmt: skip
BROAD = ["url:GET|/api/v1/*g", "url:POST|/api/v1/:a/:b", "url:PUT|/api/v1/users/:u/*rest"]
WORDS = ["a", "b", "courses", "users", "login", "a.b", "x-y", "v1", "files", "tokens"]


def synthetic_scope(rng: random.Random) -> str:
    """A scope in Canvas's syntax, including the shapes the broker refuses or treats as inert."""
    method = rng.choice(["GET", "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"])
    prefix = rng.choice(["/api/v1", "/api/v1", "/api/sis", "/api/quiz/v1", "/login", "/api"])
    parts = [prefix]
    for index in range(rng.randint(1, 4)):
        kind = rng.choice(["word", "word", "param", "param", "glob", "opt", "mixed", "dotted"])
        if kind == "word":
            parts.append("/" + rng.choice(WORDS))
        elif kind == "param":
            parts.append(f"/:p{index}")
        elif kind == "glob":
            parts.append(f"/*g{index}")
        elif kind == "opt":
            parts.append(rng.choice([f"(/:o{index})", "(/x)", f"(/*o{index})", "(.:format)"]))
        elif kind == "mixed":
            parts.append(f"/:m{index}-:n{index}")
        else:
            parts.append(f"/:d{index}.json")
    return f"url:{method}|{''.join(parts)}"


def exact_only_scope(rng: random.Random) -> str:
    endpoint = rng.choice(EXACT_ONLY)
    return f"url:{rng.choice(['GET', 'POST', 'PUT'])}|{endpoint.path}"


TOKEN = re.compile(r"[:*][A-Za-z_][A-Za-z0-9_]*|.", re.DOTALL)
MUTATIONS = [".json", ".xml", "/", ".", ".json.json", "/x"]


def value_for(token: str, rng: random.Random) -> str:
    if token.startswith("*"):
        return "/".join(rng.choice(VALUES) for _ in range(rng.randint(1, 3)))
    return rng.choice(VALUES)


def realise(scope_path: str, rng: random.Random) -> str:
    """A request path for the route, with values and mutations that test its edges."""
    out: list[str] = []
    skipped = 0  # depth of optional groups left out
    for token in TOKEN.findall(scope_path):
        if token == "(":
            skipped += 1 if skipped or rng.random() < 0.5 else 0
        elif token == ")":
            skipped = max(0, skipped - 1)
        elif not skipped:
            out.append(value_for(token, rng) if len(token) > 1 else token)
    path = "".join(out)
    mutation = rng.random()
    if mutation < 0.15:
        return path + rng.choice(MUTATIONS)
    if mutation < 0.2:
        return path.upper()
    if mutation < 0.25:
        return path.replace("/", "//", 1)
    if mutation < 0.3:
        return path.replace(".", "x", 1)
    return path


@lru_cache(maxsize=8192)
def broker_grant(scopes: tuple[str, ...]) -> Grant | None:
    try:
        return Grant.compile(scopes)
    except ScopeError:
        return None


def broker_allows(grant: Grant, method: str, path: str) -> bool:
    try:
        rules.check_path(path.encode("ascii"))
    except (Refusal, UnicodeEncodeError):
        return False
    return grant.check(method, path).allowed


def generated_calls(seed: int, count: int) -> list[tuple[tuple[str, ...], str, str]]:
    rng = random.Random(seed)  # noqa: S311 - a seeded sample, reproducible, not a secret
    catalogue = canvas_scopes()
    calls = []
    for _ in range(count):
        pick = rng.random()
        scopes = tuple(
            rng.choice(catalogue)
            if pick < 0.4
            else exact_only_scope(rng)
            if pick < 0.5
            else synthetic_scope(rng)
            for _ in range(rng.randint(1, 3))
        )
        target = rng.choice(scopes if rng.random() < 0.8 else catalogue)
        if rng.random() < 0.05:
            # A broad pattern aimed at an endpoint that only a scope naming it may open.
            scopes = (*scopes, rng.choice(BROAD))
            target = exact_only_scope(rng)
        method = target.split("|", 1)[0].removeprefix("url:")
        if rng.random() < 0.3:
            method = rng.choice(METHODS)
        calls.append((scopes, method, realise(target.split("|", 1)[1], rng)))
    return calls


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_broker_is_never_looser_than_canvas_and_stricter_only_as_documented(seed: int) -> None:
    compared = looser = stricter = 0
    for scopes, method, path in generated_calls(seed, CALLS // 4):
        grant = broker_grant(scopes)
        if grant is None:
            continue  # a scope the broker refuses to save: no grant can hold it
        broker = broker_allows(grant, method, path)
        canvas = canvas_allows(list(scopes), method, path)
        documented = canvas_allows(list(scopes), method, path, Restrictions.broker())
        compared += 1
        assert not (broker and not canvas), ("looser than Canvas", scopes, method, path)
        assert broker == documented, ("undocumented difference", scopes, method, path)
        looser += broker and not canvas
        stricter += canvas and not broker
    # The generator must exercise both agreement and documented strictness.
    assert compared > CALLS // 4 * 0.9
    assert stricter > 0
    assert looser == 0


@pytest.mark.parametrize("departure", [f.name for f in fields(Restrictions)])
def test_each_documented_departure_from_canvas_is_one_the_broker_makes(departure: str) -> None:
    # Turning one departure off must make the port disagree with the broker somewhere: the
    # documented list holds nothing the broker does not do.
    weaker = replace(Restrictions.broker(), **{departure: False})
    for scopes, method, path in generated_calls(5, CALLS // 4):
        grant = broker_grant(scopes)
        if grant is not None and broker_allows(grant, method, path) != canvas_allows(
            list(scopes), method, path, weaker
        ):
            return
    pytest.fail(f"no generated call needs the {departure} departure")
