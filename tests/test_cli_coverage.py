"""Every operation of the management and audit API is reachable from ``broker`` (issue 12).

The table below is the map an admin reads in docs/interfaces.md#command-line: an API
operation added without a command fails here, and so does a command that disappears.
"""

from __future__ import annotations

from typing import Any, cast

import typer.main

from broker.app import create_app
from broker.cli import app

COMMANDS: dict[str, tuple[str, ...]] = {
    "token_broker_v1_oauth_token_post": ("token",),
    "introspect_broker_v1_oauth_introspect_post": ("tokens", "introspect"),
    "list_upstreams_broker_v1_upstreams_get": ("upstreams", "list"),
    "create_upstream_broker_v1_upstreams_post": ("upstreams", "create"),
    "get_upstream_broker_v1_upstreams__ref__get": ("upstreams", "get"),
    "update_upstream_broker_v1_upstreams__ref__patch": ("upstreams", "update"),
    "disable_upstream_broker_v1_upstreams__ref__disable_post": ("upstreams", "disable"),
    "enable_upstream_broker_v1_upstreams__ref__enable_post": ("upstreams", "enable"),
    "list_credentials_broker_v1_credentials_get": ("credentials", "list"),
    "create_credential_broker_v1_credentials_post": ("credentials", "create"),
    "get_credential_broker_v1_credentials__ref__get": ("credentials", "get"),
    "update_credential_broker_v1_credentials__ref__patch": ("credentials", "update"),
    "rotate_credential_broker_v1_credentials__ref__rotate_post": ("credentials", "rotate"),
    "disable_credential_broker_v1_credentials__ref__disable_post": ("credentials", "disable"),
    "enable_credential_broker_v1_credentials__ref__enable_post": ("credentials", "enable"),
    "authorize_credential_broker_v1_credentials__ref__authorize_post": (
        "credentials",
        "authorize",
    ),
    "list_clients_broker_v1_clients_get": ("clients", "list"),
    "create_client_broker_v1_clients_post": ("clients", "create"),
    "get_client_broker_v1_clients__ref__get": ("clients", "get"),
    # Scopes and constraints through `grant`, flags through `set`.
    "update_client_broker_v1_clients__ref__patch": ("clients", "grant"),
    "rotate_client_secret_broker_v1_clients__ref__rotate_secret_post": (
        "clients",
        "rotate-secret",
    ),
    "disable_client_broker_v1_clients__ref__disable_post": ("clients", "disable"),
    "enable_client_broker_v1_clients__ref__enable_post": ("clients", "enable"),
    "revoke_client_tokens_broker_v1_clients__ref__revoke_tokens_post": (
        "clients",
        "revoke-tokens",
    ),
    "check_policy_broker_v1_clients__ref__check_post": ("clients", "check"),
    "list_tokens_broker_v1_tokens_get": ("tokens", "list"),
    "revoke_token_value_broker_v1_tokens_revoke_post": ("tokens", "revoke"),  # --stdin
    "revoke_token_broker_v1_tokens__token_id__revoke_post": ("tokens", "revoke"),
    "list_admin_keys_broker_v1_admin_keys_get": ("admin-key", "list"),
    "create_admin_key_broker_v1_admin_keys_post": ("admin-key", "create"),  # --via-api
    "revoke_admin_key_broker_v1_admin_keys__key_id__revoke_post": ("admin-key", "revoke"),
    "query_audit_broker_v1_audit_get": ("audit", "query"),
    "export_audit_broker_v1_audit_export_get": ("audit", "export"),
    # `broker audit verify` and `prune` run the same service on the database directly.
    "verify_audit_broker_v1_audit_verify_get": ("audit", "verify"),
    "hash_audit_value_broker_v1_audit_hash_post": ("audit", "hash"),
    "prune_audit_broker_v1_audit_prune_post": ("audit", "prune"),
    "add_trusted_issuer_broker_v1_trusted_issuers_post": ("issuers", "add"),
    "list_trusted_issuers_broker_v1_trusted_issuers_get": ("issuers", "list"),
    "remove_trusted_issuer_broker_v1_trusted_issuers__ref__remove_post": ("issuers", "remove"),
}
"""API operationId -> the ``broker`` command that performs it."""

NOT_FOR_ADMINS: dict[str, str] = {
    "revoke_broker_v1_oauth_revoke_post": (
        "RFC 7009: a script revokes its own token with its client credentials; an admin "
        "revokes any token with `broker tokens revoke`"
    ),
    "callback_broker_v1_oauth_callback_get": (
        "the worker user's browser lands there from Canvas; `broker credentials authorize` "
        "prints the link that leads to it"
    ),
}
"""API operations that are a script's, not an admin's, and why."""


def _operations() -> set[str]:
    schema = create_app().openapi()
    return {
        operation["operationId"]
        for path, item in schema["paths"].items()
        if path.startswith("/broker/v1/")
        for operation in item.values()
    }


def _command(path: tuple[str, ...]) -> object | None:
    """The command at ``path`` (e.g. ``("tokens", "list")``) in the ``broker`` tree, if any."""
    # Typer ships its own click: walk the tree by its interface, not by click's classes.
    command: Any = typer.main.get_command(app)
    for name in path:
        if command is None or not hasattr(command, "get_command"):
            return None
        command = command.get_command(None, name)
    return cast("object | None", command)


def test_every_management_and_audit_operation_has_a_cli_command() -> None:
    missing = _operations() - COMMANDS.keys() - NOT_FOR_ADMINS.keys()
    assert not missing, f"API operations with no `broker` command (add one, then map it): {missing}"


def test_every_mapped_operation_still_exists() -> None:
    stale = (COMMANDS.keys() | NOT_FOR_ADMINS.keys()) - _operations()
    assert not stale, f"mapped operations the API no longer has: {stale}"


def test_every_mapped_command_exists() -> None:
    absent = {op: path for op, path in COMMANDS.items() if _command(path) is None}
    assert not absent, f"commands that do not exist: {absent}"


def test_a_command_that_does_not_exist_is_not_found() -> None:
    # The lookup itself must be able to fail, or the test above proves nothing.
    assert _command(("tokens", "no-such-command")) is None
    assert _command(("tokens", "list")) is not None
