from __future__ import annotations

from broker.sim.params import nest_params


def test_bracketed_keys_nest() -> None:
    assert nest_params([("assignment[name]", "A"), ("assignment[rubric][id]", "7")]) == {
        "assignment": {"name": "A", "rubric": {"id": "7"}}
    }


def test_empty_brackets_collect_a_list() -> None:
    assert nest_params([("types[]", "a"), ("types[]", "b")]) == {"types": ["a", "b"]}


def test_plain_keys_keep_the_last_value() -> None:
    assert nest_params([("x", "1"), ("x", "2")]) == {"x": "2"}


def test_unsupported_bracket_forms_stay_literal() -> None:
    assert nest_params([("a[][b]", "1"), ("[x]", "2")]) == {"a[][b]": "1", "[x]": "2"}
