"""Canvas's scope catalogue: every scope Canvas offers parses, and typos are pointed out."""

from __future__ import annotations

import re

import pytest

from broker.core.catalogue import canvas_scopes, unfamiliar_scopes
from broker.core.scopes import Grant, parse_scope

PLACEHOLDER = re.compile(r"([:*])[A-Za-z_][A-Za-z0-9_]*")


def example_path(scope_path: str) -> str:
    """A request path the scope's route matches: parameters 1201, globs a/b, groups taken."""
    path = scope_path.replace("(", "").replace(")", "")
    return PLACEHOLDER.sub(lambda m: "1201" if m.group(1) == ":" else "a/b", path)


def test_catalogue_holds_canvas_s_1092_scope_strings_once_each() -> None:
    scopes = canvas_scopes()
    assert len(scopes) == 1092
    assert len(set(scopes)) == len(scopes)
    assert all(scope.startswith("url:") for scope in scopes)


def test_every_catalogue_scope_parses_and_none_is_inert() -> None:
    grant = Grant.compile(canvas_scopes())
    assert len(grant.scopes) == 1092
    assert grant.inert_scopes() == []
    assert unfamiliar_scopes(grant) == []


@pytest.mark.parametrize("text", canvas_scopes())
def test_every_catalogue_scope_allows_its_own_route(text: str) -> None:
    scope = parse_scope(text)
    path = example_path(scope.path)
    decision = Grant.compile([text]).check(scope.method, path)
    assert decision.allowed, decision.detail
    assert decision.scope == text


def test_a_typo_is_unfamiliar_and_named_in_the_warning() -> None:
    grant = Grant.compile(
        ["url:GET|/api/v1/course/:id", "url:GET|/api/v1/courses/:course_id/assignments"]
    )
    [warning] = unfamiliar_scopes(grant)
    assert "'url:GET|/api/v1/course/:id'" in warning


@pytest.mark.parametrize(
    "text",
    [
        "url:GET|/api/v1/courses/:cid/assignments",
        "url:GET|/api/v1/courses/1201/assignments",
        "url:GET|/api/v1/courses/1201/folders/by_path/a/b",
    ],
)
def test_a_renamed_parameter_or_a_literal_path_of_a_route_is_familiar(text: str) -> None:
    assert unfamiliar_scopes(Grant.compile([text])) == []


@pytest.mark.parametrize(
    "text",
    [
        "url:GET|/api/v1/*path",
        "url:PATCH|/api/v1/courses/:course_id/assignments",
        "url:GET|/api/v1/courses/1201/assignment",
        "url:DELETE|/api/v1/courses/:course_id/assignments",
    ],
)
def test_a_pattern_or_method_canvas_does_not_offer_is_unfamiliar(text: str) -> None:
    assert len(unfamiliar_scopes(Grant.compile([text]))) == 1


def test_quiz_scopes_are_unfamiliar_with_a_note_that_the_list_has_no_quiz_routes() -> None:
    grant = Grant.compile(["url:GET|/api/quiz/v1/courses/:course_id/quizzes"])
    [warning] = unfamiliar_scopes(grant)
    assert "/api/quiz/v1" in warning
