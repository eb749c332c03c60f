"""Tests for Canvas scope parsing, matching and grants."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.catalogue import canvas_scopes
from broker.core.scopes import EXACT_ONLY, Decision, ExactOnly, Grant, Scope, parse_scope
from broker.errors import ScopeError

ASSIGNMENTS = "url:GET|/api/v1/courses/:course_id/assignments"
COURSE = "url:GET|/api/v1/courses/:id"
FILES = "url:GET|/api/v1/courses/:course_id/files(/:id)"
GLOB = "url:GET|/api/v1/files/*path"


# --- parse_scope ---------------------------------------------------------------------------


def test_parse_scope_splits_method_path_and_params() -> None:
    scope = parse_scope(ASSIGNMENTS)
    assert scope.raw == ASSIGNMENTS
    assert scope.method == "GET"
    assert scope.path == "/api/v1/courses/:course_id/assignments"
    assert scope.params == ("course_id",)
    assert scope.globs == frozenset()


def test_parse_scope_lists_params_in_order_including_globs_and_optional_ones() -> None:
    scope = parse_scope("url:PUT|/api/v1/courses/:course_id(/sections/:section_id)/*rest")
    assert scope.params == ("course_id", "section_id", "rest")
    assert scope.globs == frozenset({"rest"})


def test_parse_scope_strips_surrounding_whitespace() -> None:
    scope = parse_scope(f"  \t{ASSIGNMENTS}\n ")
    assert scope.raw == ASSIGNMENTS


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_parse_scope_accepts_every_canvas_method(method: str) -> None:
    assert parse_scope(f"url:{method}|/api/v1/users/self").method == method


def test_parse_scope_accepts_nested_optional_groups() -> None:
    scope = parse_scope("url:GET|/api/v1/a(/b(/:c))")
    assert scope.match("GET", "/api/v1/a/b/1") == {"c": "1"}


def test_scope_with_a_group_right_after_a_parameter_is_inert() -> None:
    # Canvas reads `:id(.:format` as one parameter name, so its regex never compiles as meant.
    scope = parse_scope("url:GET|/api/v1/courses/:id(.:format)")
    assert scope.params == ("id", "format")
    assert scope.inert is not None
    assert "one parameter name" in scope.inert
    assert scope.match("GET", "/api/v1/courses/1") is None


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("url:HEAD|/api/v1/courses/:course_id/assignments", "HEAD"),
        ("url:GET|/api/v1/a+b", "'+'"),
        ("url:GET|/api/v1/a[b]", "'['"),
        ("url:GET|/api/v1/a{2}", "'{'"),
        ("url:GET|/api/v1/a$", "'$'"),
        ("url:GET|/api/v1/^a", "'^'"),
        ("url:GET|/api/v1/a|/b", "'|'"),
        ("url:GET|/api/v1/a\\d", "'\\\\'"),
        ("url:GET|/api/v1/courses/:id(/x)", "one parameter name"),
        ("url:GET|/api/v1/files/*path(/x)", "one parameter name"),
        ("url:GET|/api/v1/files/:a*b", "one parameter name"),
        ("url:GET|/api/v1/files/:a.json(/x)", "one parameter name"),
        ("url:POST|/login/:action", "literally"),
        ("url:POST|/login/*rest", "literally"),
        ("url:POST|/api/:endpoint", "literally"),
        ("url:POST|/api/graphql(.:format)", "literally"),
        ("url:GET|/api/v2/courses/:id", "literally"),
        ("url:GET|/(api/v1/courses)", "literally"),
    ],
)
def test_scope_that_could_never_mean_what_it_says_is_inert_and_listed(
    text: str, named: str
) -> None:
    grant = Grant.compile([text, ASSIGNMENTS])
    [(raw, why)] = grant.inert_scopes()
    assert raw == text
    assert named in why
    scope = grant.scopes[0]
    assert scope.inert == why
    for method in ("GET", "HEAD", "POST", scope.method):
        path = scope.path.replace(":action", "x").replace("*rest", "x").replace(":id", "1")
        assert scope.match(method, path) is None
        assert grant.check(method, path).scope != text


@pytest.mark.parametrize(
    "text",
    [
        "url:GET|/api/v1/courses/:course_id/assignments",
        "url:GET|/api/v1/accounts/:account_id/bounced_communication_channels.csv",
        "url:GET|/api/sis/courses/:course_id/assignments",
        "url:GET|/api/quiz/v1/courses/:course_id/quizzes/:assignment_id",
        "url:POST|/api/graphql",
        "url:POST|/login/session_token",
        "url:GET|/api/v1",
        "url:OPTIONS|/api/v1/files/:id/create_success",
    ],
)
def test_scope_canvas_or_a_literal_path_can_mean_is_not_inert(text: str) -> None:
    assert parse_scope(text).inert is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "/auth/userinfo",
        "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem",
        "url:get|/api/v1/courses",
        "url:Get|/api/v1/courses",
        "url:options|/api/v1/courses",
        "url:TRACE|/api/v1/courses",
        "url:|/api/v1/courses",
        "URL:GET|/api/v1/courses",
        "url:GET /api/v1/courses",
        "url:GET|api/v1/courses",
        "url:GET|",
        "url:GET|/api/v1/courses (x)",
        "url:GET|/api/v1/courses?per_page=10",
        "url:GET|/api/v1/courses#x",
        "url:GET|/api/v1/cours\u00e9s",
        "url:GET|/api/v1/courses\t/x",
        "url:GET|/api/v1/courses/(:id",
        "url:GET|/api/v1/courses/:id)",
        "url:GET|/api/v1/courses/((:id)",
        "url:GET|/api/v1/courses/)(:id",
        "url:GET|/api/v1/courses/:",
        "url:GET|/api/v1/courses/:/x",
        "url:GET|/api/v1/courses/*",
        "url:GET|/api/v1/courses/:1id",
        "url:GET|/api/v1/courses/:-id",
        "url:GET|/api/v1/courses/:id/sections/:id",
        "url:GET|/api/v1/files/:path/*path",
    ],
)
def test_parse_scope_rejects_invalid_string_and_names_it(text: str) -> None:
    with pytest.raises(ScopeError) as caught:
        parse_scope(text)
    assert repr(text.strip()) in str(caught.value) or repr(text) in str(caught.value)


def test_scope_error_is_a_value_error() -> None:
    assert issubclass(ScopeError, ValueError)


# --- Scope.match ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v1/courses/1/assignments", {"course_id": "1"}),
        ("/api/v1/courses/1/assignments.json", {"course_id": "1"}),
        ("/api/v1/courses/sis_course_id:A%20B/assignments", {"course_id": "sis_course_id:A%20B"}),
        ("/api/v1/courses/1~23/assignments", {"course_id": "1~23"}),
        ("/api/v1/courses/1/assignments/2", None),
        ("/api/v1/courses//assignments", None),
        ("/api/v1/courses/assignments", None),
        ("/API/v1/courses/1/assignments", None),
        ("/api/v1/courses/1/Assignments", None),
        ("/api/v1/courses/1/assignments/", None),
        ("/api/v1/courses/1/2/assignments", None),
        ("/prefix/api/v1/courses/1/assignments", None),
        ("/api/v1/courses/1/assignmentsx", None),
        ("/api/v1/courses/1/assignments.", None),
        ("/api/v1/courses/1/assignments.json/x", None),
        ("/api/v1/courses/1/assignments\n", None),
    ],
)
def test_match_follows_canvas_rules_for_a_param_scope(
    path: str, expected: dict[str, str] | None
) -> None:
    assert parse_scope(ASSIGNMENTS).match("GET", path) == expected


def test_match_reads_a_dot_literally() -> None:
    # Canvas's regex would let '.' match any character: the broker is stricter.
    scope = parse_scope("url:GET|/api/v1/accounts/:account_id/unconfirmed_channels.csv")
    assert scope.match("GET", "/api/v1/accounts/1/unconfirmed_channels.csv") == {"account_id": "1"}
    assert scope.match("GET", "/api/v1/accounts/1/unconfirmed_channelsXcsv") is None


def test_match_checks_head_as_get() -> None:
    assert parse_scope(ASSIGNMENTS).match("HEAD", "/api/v1/courses/1/assignments") is not None


def test_head_scope_allows_nothing_since_canvas_checks_head_as_get() -> None:
    scope = parse_scope("url:HEAD|/api/v1/courses/:course_id/assignments")
    assert scope.match("HEAD", "/api/v1/courses/1/assignments") is None
    assert scope.match("GET", "/api/v1/courses/1/assignments") is None


@pytest.mark.parametrize(
    "method", ["get", "Get", "head", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
)
def test_match_refuses_other_methods_and_lower_case(method: str) -> None:
    assert parse_scope(ASSIGNMENTS).match(method, "/api/v1/courses/1/assignments") is None


def test_post_scope_does_not_allow_get() -> None:
    scope = parse_scope("url:POST|/api/v1/courses/:course_id/assignments")
    assert scope.match("GET", "/api/v1/courses/1/assignments") is None
    assert scope.match("POST", "/api/v1/courses/1/assignments") is not None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v1/courses/1/files", {"course_id": "1"}),
        ("/api/v1/courses/1/files.json", {"course_id": "1"}),
        ("/api/v1/courses/1/files/2", {"course_id": "1", "id": "2"}),
        ("/api/v1/courses/1/files/2.json", {"course_id": "1", "id": "2.json"}),
        ("/api/v1/courses/1/files/", None),
        ("/api/v1/courses/1/files/2/3", None),
    ],
)
def test_match_handles_optional_groups(path: str, expected: dict[str, str] | None) -> None:
    assert parse_scope(FILES).match("GET", path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v1/files/a", {"path": "a"}),
        ("/api/v1/files/a/b/c.pdf", {"path": "a/b/c.pdf"}),
        ("/api/v1/files/a//b", {"path": "a//b"}),
        ("/api/v1/files/", None),
        ("/api/v1/files", None),
    ],
)
def test_match_handles_globs(path: str, expected: dict[str, str] | None) -> None:
    assert parse_scope(GLOB).match("GET", path) == expected


def test_match_returns_raw_percent_encoded_values() -> None:
    scope = parse_scope(COURSE)
    assert scope.match("GET", "/api/v1/courses/sis_course_id%3AX") == {"id": "sis_course_id%3AX"}


# --- Grant.compile ---------------------------------------------------------------------------


def test_compile_keeps_scope_order_and_drops_repeats() -> None:
    grant = Grant.compile([ASSIGNMENTS, COURSE, f" {ASSIGNMENTS} "])
    assert grant.scope_strings() == [ASSIGNMENTS, COURSE]
    assert all(isinstance(scope, Scope) for scope in grant.scopes)


def test_compile_names_the_first_bad_scope() -> None:
    with pytest.raises(ScopeError, match=re.escape("'url:GET|/api/v1/(x'")):
        Grant.compile([ASSIGNMENTS, "url:GET|/api/v1/(x", "/auth/userinfo"])


def test_compile_refuses_a_bare_string_instead_of_a_list() -> None:
    with pytest.raises(ScopeError, match="list"):
        Grant.compile(ASSIGNMENTS)


def test_compile_refuses_a_non_string_scope() -> None:
    with pytest.raises(ScopeError, match="42"):
        Grant.compile([42])  # type: ignore[list-item]


def test_compile_turns_constraint_values_into_frozensets() -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["1201", "1202", "1201"]})
    assert grant.constraints == {"course_id": frozenset({"1201", "1202"})}


def test_compile_without_constraints_has_none() -> None:
    assert Grant.compile([ASSIGNMENTS]).constraints == {}


@pytest.mark.parametrize(
    ("constraints", "named"),
    [
        ({"course id": ["1"]}, "'course id'"),
        ({"": ["1"]}, "''"),
        ({"1course": ["1"]}, "'1course'"),
        ({"course_id": []}, "'course_id'"),
        ({"course_id": "1201"}, "'course_id'"),
        ({"course_id": [""]}, "''"),
        ({"course_id": ["1", 2]}, "2"),
        ({"course_id": None}, "'course_id'"),
        ({3: ["1"]}, "3"),
    ],
)
def test_compile_refuses_invalid_constraints_naming_them(
    constraints: dict[object, object], named: str
) -> None:
    with pytest.raises(ScopeError, match=re.escape(named)):
        Grant.compile([ASSIGNMENTS], constraints)  # type: ignore[arg-type]


def test_grant_constraints_cannot_be_mutated() -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["1"]})
    with pytest.raises(TypeError):
        grant.constraints["course_id"] = frozenset({"2"})  # type: ignore[index]


# --- Grant.check -----------------------------------------------------------------------------


def test_check_allows_a_matching_scope_and_reports_it() -> None:
    decision = Grant.compile([COURSE, ASSIGNMENTS]).check("GET", "/api/v1/courses/1/assignments")
    assert decision.allowed
    assert decision.scope == ASSIGNMENTS
    assert decision.reason is None
    assert decision.params == {"course_id": "1"}


def test_check_denies_by_default() -> None:
    decision = Grant.compile([ASSIGNMENTS]).check("GET", "/api/v1/users/self")
    assert decision == Decision(
        allowed=False, scope=None, reason="scope_not_granted", detail=decision.detail
    )
    assert "/api/v1/users/self" in decision.detail


def test_empty_grant_denies_everything() -> None:
    assert not Grant.compile([]).check("GET", "/api/v1/courses/1/assignments").allowed


def test_check_truncates_huge_paths_in_the_detail() -> None:
    decision = Grant.compile([]).check("GET", "/" + "a" * 10_000)
    assert len(decision.detail) < 200


def test_check_refuses_a_method_not_granted() -> None:
    decision = Grant.compile([ASSIGNMENTS]).check("DELETE", "/api/v1/courses/1/assignments")
    assert decision.reason == "scope_not_granted"


def test_check_allows_head_through_a_get_scope() -> None:
    assert Grant.compile([ASSIGNMENTS]).check("HEAD", "/api/v1/courses/1/assignments").allowed


def test_check_refuses_lower_case_request_method() -> None:
    assert not Grant.compile([ASSIGNMENTS]).check("get", "/api/v1/courses/1/assignments").allowed


@pytest.mark.parametrize(
    "value",
    [
        "1201",
        "sis_course_id:X",
        "self",
        "uuid:abcDEF123",
        "lti_context_id:4dde05e8",
        "1~23",
        "1201.json",
    ],
)
def test_check_allows_constrained_values_listed_literally(value: str) -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": [value]})
    assert grant.check("GET", f"/api/v1/courses/{value}/assignments").allowed


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/courses/1203/assignments",
        "/api/v1/courses/sis_course_id:1201/assignments",
        "/api/v1/courses/self/assignments",
        "/api/v1/courses/uuid:1201/assignments",
        "/api/v1/courses/lti_context_id:1201/assignments",
        "/api/v1/courses/1~1201/assignments",
        "/api/v1/courses/01201/assignments",
        "/api/v1/courses/12010/assignments",
        "/api/v1/courses/1201%20/assignments",
        "/api/v1/courses/%3120/assignments",
    ],
)
def test_check_refuses_aliases_not_listed(path: str) -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["1201"]})
    decision = grant.check("GET", path)
    assert not decision.allowed
    assert decision.reason == "constraint_violation"
    assert decision.scope == ASSIGNMENTS


def test_check_compares_constraints_after_percent_decoding() -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["sis_course_id:X", "sis_course_id:A B"]})
    assert grant.check("GET", "/api/v1/courses/sis_course_id%3AX/assignments").allowed
    assert grant.check("GET", "/api/v1/courses/sis_course_id%3aX/assignments").allowed
    assert grant.check("GET", "/api/v1/courses/sis_course_id:A%20B/assignments").allowed


def test_check_compares_percent_encoded_digits_as_decoded() -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["1201"]})
    assert grant.check("GET", "/api/v1/courses/%31201/assignments").allowed


def test_check_does_not_treat_plus_as_space_in_paths() -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["sis_course_id:A B"]})
    assert not grant.check("GET", "/api/v1/courses/sis_course_id:A+B/assignments").allowed


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/courses/sis_course_id%3/assignments",
        "/api/v1/courses/sis_course_id%ZZX/assignments",
        "/api/v1/courses/%FF/assignments",
        "/api/v1/courses/%C3/assignments",
    ],
)
def test_check_refuses_constrained_values_that_do_not_decode(path: str) -> None:
    grant = Grant.compile(
        [ASSIGNMENTS], {"course_id": ["sis_course_id%3", "sis_course_id%ZZX", "%FF", "\ufffd"]}
    )
    assert grant.check("GET", path).reason == "constraint_violation"


def test_check_decodes_utf8_constraint_values() -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["sis_course_id:\u00e9t\u00e9"]})
    assert grant.check("GET", "/api/v1/courses/sis_course_id:%C3%A9t%C3%A9/assignments").allowed


def test_check_detail_names_the_refused_value() -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["1201"]})
    decision = grant.check("GET", "/api/v1/courses/1203/assignments")
    assert decision.detail == "course_id '1203' is not allowed by the grant's constraints"


def test_check_applies_constraints_to_every_scope_with_that_param() -> None:
    grant = Grant.compile(
        [ASSIGNMENTS, "url:POST|/api/v1/courses/:course_id/quizzes"], {"course_id": ["1201"]}
    )
    assert grant.check("POST", "/api/v1/courses/1201/quizzes").allowed
    assert not grant.check("POST", "/api/v1/courses/1202/quizzes").allowed


def test_check_ignores_constraints_for_params_a_scope_does_not_have() -> None:
    grant = Grant.compile(["url:GET|/api/v1/users/:user_id"], {"course_id": ["1201"]})
    assert grant.check("GET", "/api/v1/users/99").allowed


def test_check_does_not_accept_a_value_listed_for_another_param() -> None:
    grant = Grant.compile(
        ["url:GET|/api/v1/courses/:course_id/users/:user_id"],
        {"course_id": ["1201"], "user_id": ["7"]},
    )
    assert grant.check("GET", "/api/v1/courses/1201/users/7").allowed
    assert not grant.check("GET", "/api/v1/courses/1201/users/1201").allowed
    assert not grant.check("GET", "/api/v1/courses/7/users/7").allowed


def test_check_requires_every_constrained_param_to_pass() -> None:
    grant = Grant.compile(
        ["url:GET|/api/v1/accounts/:account_id/courses/:course_id"],
        {"course_id": ["1201"], "account_id": ["1"]},
    )
    decision = grant.check("GET", "/api/v1/accounts/2/courses/1201")
    assert decision.reason == "constraint_violation"
    assert "account_id" in decision.detail


def test_check_prefers_a_matching_scope_whose_constraints_pass() -> None:
    grant = Grant.compile(
        ["url:GET|/api/v1/courses/:course_id/users", "url:GET|/api/v1/courses/:other/users"],
        {"course_id": ["1201"]},
    )
    decision = grant.check("GET", "/api/v1/courses/55/users")
    assert decision.allowed
    assert decision.scope == "url:GET|/api/v1/courses/:other/users"


def test_check_reports_the_first_scope_on_constraint_violation() -> None:
    grant = Grant.compile(
        ["url:GET|/api/v1/courses/:course_id/users", "url:GET|/api/v1/courses/:course_id/*rest"],
        {"course_id": ["1201"]},
    )
    decision = grant.check("GET", "/api/v1/courses/55/users")
    assert decision.scope == "url:GET|/api/v1/courses/:course_id/users"
    assert decision.reason == "constraint_violation"


def test_check_strips_a_format_from_a_numeric_id_in_the_last_segment() -> None:
    grant = Grant.compile([COURSE], {"id": ["1201"]})
    assert grant.check("GET", "/api/v1/courses/1201.json").allowed


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/courses/1201/assignments.xml",
        "/api/v1/courses/1201/assignments.json.json",
        "/api/v1/courses/1201/assignments.JSON",
        "/api/v1/courses/1201/assignments.js",
        "/api/v1/courses/1201/assignments.",
    ],
)
def test_match_accepts_no_format_suffix_but_json(path: str) -> None:
    assert parse_scope(ASSIGNMENTS).match("GET", path) is None
    assert parse_scope(ASSIGNMENTS).match("GET", "/api/v1/courses/1201/assignments.json") == {
        "course_id": "1201"
    }


def test_check_strips_a_format_from_a_shard_id_in_the_last_segment() -> None:
    grant = Grant.compile([COURSE], {"id": ["1~23"]})
    assert grant.check("GET", "/api/v1/courses/1~23.json").allowed


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/courses/1203.1201",
        "/api/v1/courses/1203.json",
        "/api/v1/courses/1201.json.json",
        "/api/v1/courses/1201.xml",
        "/api/v1/courses/1201.js-on",
        "/api/v1/courses/1201.",
        "/api/v1/courses/1201%2Ejson",
    ],
)
def test_check_refuses_format_suffixes_that_do_not_leave_an_allowed_id(path: str) -> None:
    grant = Grant.compile([COURSE], {"id": ["1201"]})
    assert grant.check("GET", path).reason == "constraint_violation"


def test_check_never_strips_a_format_in_a_middle_segment() -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": ["1201"]})
    assert not grant.check("GET", "/api/v1/courses/1201.json/assignments").allowed


def test_check_never_strips_a_format_from_a_non_numeric_alias() -> None:
    grant = Grant.compile([COURSE], {"id": ["sis_course_id:X"]})
    assert not grant.check("GET", "/api/v1/courses/sis_course_id:X.json").allowed
    listed = Grant.compile([COURSE], {"id": ["sis_course_id:X.json"]})
    assert listed.check("GET", "/api/v1/courses/sis_course_id:X.json").allowed


def test_check_compares_whole_glob_remainder() -> None:
    grant = Grant.compile([GLOB], {"path": ["a/b c.pdf"]})
    assert grant.check("GET", "/api/v1/files/a/b%20c.pdf").allowed
    assert not grant.check("GET", "/api/v1/files/a/b%20c").allowed
    assert not grant.check("GET", "/api/v1/files/a").allowed


def test_check_never_strips_a_format_from_a_glob() -> None:
    grant = Grant.compile([GLOB], {"path": ["1201"]})
    assert not grant.check("GET", "/api/v1/files/1201.json").allowed


def test_check_refuses_a_constrained_optional_param_that_is_absent() -> None:
    grant = Grant.compile([FILES], {"id": ["5"]})
    assert grant.check("GET", "/api/v1/courses/1/files/5").allowed
    decision = grant.check("GET", "/api/v1/courses/1/files")
    assert decision.reason == "constraint_violation"
    assert "absent" in decision.detail


# --- Grant.subset -----------------------------------------------------------------------------


def test_subset_keeps_requested_scopes_and_constraints() -> None:
    grant = Grant.compile([ASSIGNMENTS, COURSE, GLOB], {"course_id": ["1201"]})
    smaller = grant.subset([GLOB, f"  {ASSIGNMENTS}\t"])
    assert smaller.scope_strings() == [GLOB, ASSIGNMENTS]
    assert smaller.constraints == grant.constraints
    assert not smaller.check("GET", "/api/v1/courses/1").allowed
    assert not smaller.check("GET", "/api/v1/courses/1202/assignments").allowed
    assert smaller.check("GET", "/api/v1/courses/1201/assignments").allowed


def test_subset_drops_repeated_requests() -> None:
    grant = Grant.compile([ASSIGNMENTS, COURSE])
    assert grant.subset([COURSE, COURSE]).scope_strings() == [COURSE]


@pytest.mark.parametrize(
    "unknown",
    [
        "url:GET|/api/v1/courses/:id/users",
        "url:GET|/api/v1/courses/:course_id/assignments/:id",
        "url:GET|/api/v1/courses/:cid/assignments",
        "url:get|/api/v1/courses/:course_id/assignments",
        "url:GET|/api/v1/courses/:course_id/assignments.json",
    ],
)
def test_subset_refuses_scopes_not_in_the_grant(unknown: str) -> None:
    grant = Grant.compile([ASSIGNMENTS, COURSE])
    with pytest.raises(ScopeError, match=re.escape(repr(unknown))):
        grant.subset([COURSE, unknown, "url:GET|/other"])


def test_subset_refuses_a_bare_string() -> None:
    with pytest.raises(ScopeError):
        Grant.compile([ASSIGNMENTS]).subset(ASSIGNMENTS)


def test_subset_of_nothing_denies_everything() -> None:
    grant = Grant.compile([ASSIGNMENTS]).subset([])
    assert not grant.check("GET", "/api/v1/courses/1/assignments").allowed


# --- Property tests against an independent matcher ---------------------------------------------


@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class Param:
    glob: bool


@dataclass(frozen=True)
class Opt:
    nodes: tuple[Node, ...]


Node = Lit | Param | Opt


def render(nodes: tuple[Node, ...], names: list[str]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, Lit):
            out.append(node.text)
        elif isinstance(node, Param):
            names.append(f"p{len(names)}")
            out.append(("*" if node.glob else ":") + names[-1])
        else:
            out.append("(" + render(node.nodes, names) + ")")
    return "".join(out)


def ends(nodes: tuple[Node, ...], path: str, start: int) -> set[int]:
    """Every position where ``nodes`` matched from ``start`` can end (Canvas's rule)."""
    positions = {start}
    for node in nodes:
        following: set[int] = set()
        for position in positions:
            following |= node_ends(node, path, position)
        positions = following
    return positions


def node_ends(node: Node, path: str, start: int) -> set[int]:
    if isinstance(node, Lit):
        return {start + len(node.text)} if path.startswith(node.text, start) else set()
    if isinstance(node, Opt):
        return {start} | ends(node.nodes, path, start)
    found = set()
    for end in range(start + 1, len(path) + 1):
        if not node.glob and path[end - 1] == "/":
            break
        found.add(end)
    return found


def format_suffix_ok(path: str, position: int) -> bool:
    # Canvas accepts any `.suffix` here; the broker only `.json` (see broker.core.scopes).
    return path[position:] in {"", ".json"}


def reference_match(nodes: tuple[Node, ...], path: str) -> bool:
    return any(format_suffix_ok(path, end) for end in ends(nodes, path, 0))


WORDS = st.sampled_from(["a", "b", "ab", "a.b", "v1", "-", "~"])


@st.composite
def segment(draw: st.DrawFn, depth: int) -> tuple[Node, ...]:
    kind = draw(st.sampled_from(["word", "param", "glob", "param_ext", "pre_param", "opt"]))
    if kind == "opt" and depth < 2:
        inner = draw(st.lists(segment(depth + 1), min_size=1, max_size=2))
        return (Opt(tuple(node for part in inner for node in part)),)
    if kind == "param":
        return (Lit("/"), Param(glob=False))
    if kind == "glob":
        return (Lit("/"), Param(glob=True))
    if kind == "param_ext":
        return (Lit("/"), Param(glob=False), Lit(".b"))
    if kind == "pre_param":
        return (Lit("/a-"), Param(glob=False))
    return (Lit("/" + draw(WORDS)),)


@st.composite
def patterns(draw: st.DrawFn) -> tuple[Node, ...]:
    # Patterns apply under the Canvas API prefixes (elsewhere they are inert), and the first
    # segment after the prefix is never optional.
    parts = [(Lit("/api/v1"),), draw(segment(2)), *draw(st.lists(segment(0), max_size=3))]
    return tuple(node for part in parts for node in part)


VALUE_CHARS = "ab1.~%-"


@st.composite
def realise(draw: st.DrawFn, nodes: tuple[Node, ...]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, Lit):
            out.append(node.text)
        elif isinstance(node, Param):
            alphabet = VALUE_CHARS + ("/" if node.glob else "")
            out.append(draw(st.text(alphabet, min_size=draw(st.sampled_from([0, 1])))))
        elif draw(st.booleans()):
            out.append(draw(realise(node.nodes)))
    suffix = draw(
        st.sampled_from(["", "", ".json", ".json", ".xml", ".json.json", ".", "/", ".a/b", "x"])
    )
    return "".join(out) + suffix


@st.composite
def scope_and_path(draw: st.DrawFn) -> tuple[tuple[Node, ...], str]:
    nodes = draw(patterns())
    path = draw(st.one_of(realise(nodes), st.text("/ab.1-~:", max_size=12)))
    return nodes, path


@settings(max_examples=600)
@given(scope_and_path())
def test_match_agrees_with_a_reference_matcher(case: tuple[tuple[Node, ...], str]) -> None:
    nodes, path = case
    names: list[str] = []
    text = "url:GET|" + render(nodes, names)
    scope = parse_scope(text)
    assert scope.params == tuple(names)
    values = scope.match("GET", path)
    canvas_names = re.findall(r"[:*][^/)]+", text.removeprefix("url:GET|"))
    if any(char in name[1:] for name in canvas_names for char in ":*("):
        # Canvas would read the '(' as part of a parameter's name: inert, matches nothing.
        assert scope.inert is not None
        assert values is None
        return
    assert scope.inert is None
    assert (values is not None) == reference_match(nodes, path)
    if values is not None:
        assert set(values) <= set(names)
        assert all(values.values())
        assert all("/" not in value for name, value in values.items() if name not in scope.globs)


@settings(max_examples=300)
@given(
    st.lists(patterns(), min_size=1, max_size=3),
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "get"]),
    st.data(),
)
def test_check_never_allows_a_path_no_scope_matches(
    pattern_list: list[tuple[Node, ...]], method: str, data: st.DataObject
) -> None:
    scope_methods = [data.draw(st.sampled_from(["GET", "POST", "PUT"])) for _ in pattern_list]
    texts = [
        f"url:{scope_method}|{render(nodes, [])}"
        for scope_method, nodes in zip(scope_methods, pattern_list, strict=True)
    ]
    constraints = data.draw(
        st.dictionaries(
            st.sampled_from(["p0", "p1"]), st.lists(st.text("ab1.", min_size=1), min_size=1)
        )
    )
    grant = Grant.compile(texts, constraints)
    path = data.draw(st.one_of(*(realise(nodes) for nodes in pattern_list)))
    decision = grant.check(method, path)
    if decision.allowed:
        assert any(
            (scope_method == method or (method == "HEAD" and scope_method == "GET"))
            and reference_match(nodes, path)
            for scope_method, nodes in zip(scope_methods, pattern_list, strict=True)
        )
        assert decision.scope in texts
    else:
        assert decision.reason in {"scope_not_granted", "constraint_violation"}


@settings(max_examples=300)
@given(
    st.text("ab1~.%:/", max_size=10),
    st.sets(st.text("ab1~.:", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_constrained_middle_segment_is_allowed_only_if_listed_exactly(
    value: str, allowed: set[str]
) -> None:
    grant = Grant.compile([ASSIGNMENTS], {"course_id": sorted(allowed)})
    decision = grant.check("GET", f"/api/v1/courses/{value}/assignments")
    assert decision.allowed == (value in allowed)


# --- Exact-only endpoints --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "method", "path"),
    [
        ("url:GET|/api/v1/*path", "GET", "/api/v1/login/session_token"),
        ("url:GET|/api/v1/*path", "GET", "/api/v1/login/session_token.json"),
        ("url:GET|/api/v1/:a/:b", "GET", "/api/v1/login/session_token"),
        ("url:GET|/api/v1/login/:what", "HEAD", "/api/v1/login/session_token"),
        ("url:POST|/api/v1/users/:user_id/*rest", "POST", "/api/v1/users/self/tokens"),
        ("url:PUT|/api/v1/users/:a/:b/:c", "PUT", "/api/v1/users/self/tokens/5"),
        ("url:POST|/api/v1/:x", "POST", "/api/v1/inst_access_tokens"),
        ("url:GET|/api/v1/accounts/:account_id/:x", "GET", "/api/v1/accounts/1/developer_keys"),
        ("url:PUT|/api/v1/developer_keys(/:id)", "PUT", "/api/v1/developer_keys/9"),
        (
            "url:GET|/api/v1/courses/:course_id/external_tools/:id",
            "GET",
            "/api/v1/courses/1/external_tools/sessionless_launch",
        ),
    ],
)
def test_pattern_scope_never_opens_an_exact_only_endpoint(
    scope: str, method: str, path: str
) -> None:
    decision = Grant.compile([scope]).check(method, path)
    assert not decision.allowed
    assert (decision.reason, decision.scope) == ("exact_scope_required", scope)
    assert "exactly" in decision.detail


@pytest.mark.parametrize(
    ("scope", "path"),
    [
        ("url:GET|/api/v1/login/session_token", "/api/v1/login/session_token"),
        ("url:POST|/api/v1/users/:user_id/tokens", "/api/v1/users/self/tokens"),
        ("url:POST|/api/v1/users/:id/tokens", "/api/v1/users/7/tokens"),
        ("url:POST|/api/v1/users/7/tokens", "/api/v1/users/7/tokens"),
        ("url:POST|/api/v1/accounts/:account/developer_keys", "/api/v1/accounts/1/developer_keys"),
        ("url:POST|/api/graphql", "/api/graphql"),
        ("url:POST|/login/session_token", "/login/session_token"),
    ],
)
def test_scope_naming_an_exact_only_endpoint_opens_it(scope: str, path: str) -> None:
    method = scope.split("|", maxsplit=1)[0].removeprefix("url:")
    decision = Grant.compile([scope]).check(method, path)
    assert decision.allowed, decision.detail
    assert decision.scope == scope


def test_exact_only_endpoint_is_allowed_by_a_later_scope_naming_it() -> None:
    grant = Grant.compile(["url:GET|/api/v1/*path", "url:GET|/api/v1/login/session_token"])
    assert grant.check("GET", "/api/v1/login/session_token").scope == grant.scopes[1].raw
    assert grant.check("GET", "/api/v1/courses/1").scope == "url:GET|/api/v1/*path"


@pytest.mark.parametrize("endpoint", EXACT_ONLY, ids=lambda endpoint: endpoint.path)
def test_no_glob_scope_reaches_any_exact_only_endpoint(endpoint: ExactOnly) -> None:
    path = re.sub(r":[a-z_]+", "1", endpoint.path).replace("*rest", "x/y")
    grant = Grant.compile([f"url:{method}|/api/v1/*path" for method in ("GET", "POST")])
    for method in ("GET", "POST", "HEAD"):
        decision = grant.check(method, path)
        assert not decision.allowed
        assert decision.reason in {"exact_scope_required", "path_not_proxied"}


def test_paths_outside_the_canvas_api_need_a_literal_scope() -> None:
    decision = Grant.compile(["url:GET|/api/v1/courses"]).check("GET", "/api/graphql")
    assert (decision.reason, decision.scope) == ("path_not_proxied", None)


# --- Large grants: the segment index -------------------------------------------------------


@settings(max_examples=300)
@given(st.lists(patterns(), min_size=9, max_size=24), st.data())
def test_an_indexed_grant_decides_as_a_scan_of_every_scope(
    pattern_list: list[tuple[Node, ...]], data: st.DataObject
) -> None:
    methods = [data.draw(st.sampled_from(["GET", "POST"])) for _ in pattern_list]
    texts = [
        f"url:{method}|{render(nodes, [])}"
        for method, nodes in zip(methods, pattern_list, strict=True)
    ]
    grant = Grant.compile(texts)
    path = data.draw(
        st.one_of(*(realise(nodes) for nodes in pattern_list), st.text("/apiv1.ab-~:", max_size=20))
    )
    method = data.draw(st.sampled_from(["GET", "POST", "HEAD"]))
    expected = next((s.raw for s in grant.scopes if s.match(method, path) is not None), None)
    decision = grant.check(method, path)
    assert decision.allowed == (expected is not None)
    assert decision.scope == expected


def test_a_grant_of_every_canvas_scope_allows_each_route_through_a_matching_scope() -> None:
    grant = Grant.compile(canvas_scopes())
    for scope in grant.scopes:
        plain = scope.path.replace("(", "").replace(")", "")
        path = re.sub(r"([:*])[A-Za-z_]+", lambda m: "1201" if m[1] == ":" else "a/b", plain)
        decision = grant.check(scope.method, path)
        assert decision.allowed, (scope.raw, decision.detail)
        assert decision.scope is not None
        assert parse_scope(decision.scope).match(scope.method, path) is not None


# Constraints that no scope has -------------------------------------------------------------


def test_grant_lists_the_parameters_of_all_its_scopes_once_sorted() -> None:
    grant = Grant.compile(
        [
            "url:GET|/api/v1/courses/:course_id/assignments(/:id)",
            "url:GET|/api/v1/courses/:course_id",
            "url:GET|/api/v1/files/*path",
        ]
    )
    assert grant.parameters() == ["course_id", "id", "path"]


@pytest.mark.parametrize(
    ("constraints", "unknown"),
    [
        ({"courseid": ["1201"]}, ["courseid"]),
        ({"course_id": ["1201"], "user_id": ["5"], "Course_id": ["1"]}, ["Course_id", "user_id"]),
        ({"course_id": ["1201"]}, []),
        ({"id": ["1"]}, []),  # inside an optional group, still a parameter of the scope
        ({"path": ["a/b"]}, []),  # a glob
        ({}, []),
    ],
)
def test_grant_names_constraints_that_no_scope_has(
    constraints: dict[str, list[str]], unknown: list[str]
) -> None:
    grant = Grant.compile(
        ["url:GET|/api/v1/courses/:course_id/assignments(/:id)", "url:GET|/api/v1/files/*path"],
        constraints,
    )
    assert grant.unknown_constraints() == unknown


def test_a_constraint_no_scope_has_would_constrain_nothing() -> None:
    # Why saving refuses one: the misspelt constraint leaves every course open.
    grant = Grant.compile(["url:GET|/api/v1/courses/:course_id"], {"courseid": ["1201"]})
    assert grant.check("GET", "/api/v1/courses/9999").allowed
    assert grant.unknown_constraints() == ["courseid"]


def test_a_token_subset_may_lack_a_constrained_parameter() -> None:
    grant = Grant.compile(
        ["url:GET|/api/v1/courses/:course_id", "url:GET|/api/v1/users/:user_id"],
        {"course_id": ["1201"]},
    )
    subset = grant.subset(["url:GET|/api/v1/users/:user_id"])
    assert subset.unknown_constraints() == ["course_id"]
    assert subset.check("GET", "/api/v1/users/5").allowed
