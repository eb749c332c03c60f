"""The audit value catalogues are complete: every action and reason the broker's source
writes as a literal is in them (docs/audit.md#what-is-audited)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from broker.core import audit_chain
from broker.core.audit_values import ACTIONS, REASONS, State

BROKER = Path(__file__).resolve().parents[2] / "broker"
# Calls whose positional argument at this index is a reason (or an action).
REASON_ARGUMENTS = {"Refusal": 1, "refuse": 1, "OAuthError": 0}
ACTION_ARGUMENTS = {"_event": 2, "record_admin": 0, "_token_event": 1}
# Error codes of the management API and the token endpoint that no event records.
# Error codes of management answers that no event records: a refused change is not audited
# (canvas_*: Canvas refusing or not answering a worker token's verification when it is stored,
# or its regeneration).
NOT_REASONS = {
    "conflict",
    "forbidden",
    "invalid_field",
    "internal_error",
    "invalid_token",
    "canvas_rejected_token",
    "canvas_unreachable",
    "canvas_refused_regenerate",  # Canvas refusing to regenerate a token: nothing changed
    "too_many_requests",  # the token endpoint's 429; audited as token_rate_limited
    "temporarily_unavailable",  # an issuer's keys unreadable; audited as issuer_unavailable
    "invalid_grant",  # a refused exchange; audited with the rule that failed
}


def _text(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _class_errors(node: ast.ClassDef) -> set[str]:
    """``error = "…"`` in a class body: an exception's error code."""
    return {
        _text(statement.value) or ""
        for statement in node.body
        if isinstance(statement, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "error" for t in statement.targets)
    }


def _call_literals(node: ast.Call, reasons: set[str], actions: set[str]) -> None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    for keyword in node.keywords:
        value = _text(keyword.value) or ""
        if keyword.arg in {"reason", "error"}:
            reasons.add(value)
        if keyword.arg == "action":
            actions.add(value)
    for table, found in ((REASON_ARGUMENTS, reasons), (ACTION_ARGUMENTS, actions)):
        index = table.get(name)
        if index is not None and len(node.args) > index:
            found.add(_text(node.args[index]) or "")


def _literals() -> tuple[set[str], set[str]]:
    """Every literal reason and action in the broker's source (the simulator aside)."""
    reasons: set[str] = set()
    actions: set[str] = set()
    for path in BROKER.rglob("*.py"):
        if "sim" in path.relative_to(BROKER).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                reasons |= _class_errors(node)
            elif isinstance(node, ast.Call):
                _call_literals(node, reasons, actions)
    return reasons - {""} - NOT_REASONS, actions - {""}


def test_every_reason_the_source_writes_is_in_the_catalogue() -> None:
    reasons, _actions = _literals()
    assert len(reasons) > 30  # the scan does find them
    assert reasons - REASONS == set()


def test_every_action_the_source_writes_is_in_the_catalogue() -> None:
    _reasons, actions = _literals()
    assert {"token.mint", "client.create", "audit.export"} <= actions
    assert actions - ACTIONS == set()


def test_the_event_states_are_the_chains_own() -> None:
    assert {State.PENDING, State.COMPLETE} == {audit_chain.PENDING, audit_chain.COMPLETE}


def test_the_actions_documented_are_the_catalogue() -> None:
    docs = (BROKER.parent / "docs" / "audit.md").read_text(encoding="utf-8")
    table = docs.split("## What is audited", 1)[1].split("\n\n", 2)[1]
    documented: set[str] = set()
    for row in table.splitlines()[2:]:
        base = ""
        for item in re.findall(r"`([a-z_.]+)`", row.split("|")[2]):
            if item.startswith("."):
                documented.add(base + item)
            else:
                base = item.split(".")[0]
                documented.add(item)
    documented.add("proxy.complete")
    assert documented == ACTIONS
