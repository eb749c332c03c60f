"""The values the closed columns of an audit event take (docs/audit.md#what-is-audited).

``kind``, ``decision`` and ``state`` are enumerations; ``action`` and ``reason`` are the
catalogues of what the broker writes. The review filters refuse any other value
(``broker.audit_filter``), so a typo is an error naming the allowed values rather than an
empty answer; ``tests/core/test_audit_values.py`` reads the broker's source to keep both
catalogues complete.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Kind(StrEnum):
    """What an event records."""

    PROXY = "proxy"
    """A proxied call."""
    TOKEN = "token"  # noqa: S105 - an event kind, not a secret
    """A token request or a client's revocation of its own token."""
    ADMIN = "admin"
    """A management action, or a refused management request."""


class Decision(StrEnum):
    """Whether the broker let the request through."""

    ALLOW = "allow"
    DENY = "deny"


class State(StrEnum):
    """Whether an event's outcome is recorded."""

    COMPLETE = "complete"
    PENDING = "pending"
    """A call committed before it was forwarded whose completion was never recorded."""


ACTIONS: Final = frozenset(
    {
        "proxy",
        "proxy.complete",
        "token.mint",
        "token.exchange",  # a platform's token exchanged for a proxy token (services.exchange)
        "token.revoke",
        *(f"upstream.{verb}" for verb in ("create", "update", "enable", "disable")),
        *(
            f"credential.{verb}"
            for verb in (
                "create",
                "update",
                "enable",
                "disable",
                "rotate",
                # OAuth credentials (services.worker_oauth)
                "authorize_start",
                "authorize",
                "refresh",
            )
        ),
        *(
            f"client.{verb}"
            for verb in (
                "create",
                "update",
                "enable",
                "disable",
                "rotate_secret",
                "revoke_tokens",
            )
        ),
        *(f"admin_key.{verb}" for verb in ("create", "revoke", "authenticate", "authorize")),
        "issuer.add",
        "issuer.remove",
        "keys.rotate",
        *(f"audit.{verb}" for verb in ("export", "hash", "prune")),
        # The security console (services.console)
        *(f"console.{verb}" for verb in ("sign_in", "sign_out", "verify", "csrf")),
    }
)
"""Every ``action`` an event may have."""

REVIEWED_ACTIONS: Final = ACTIONS - {"proxy.complete"}
"""The actions review selects by: a completion shows only merged into the call it completes."""

PROXY_REASONS: Final = frozenset(
    {
        # The token (services.tokens).
        "missing_token",
        "malformed_token",
        "unknown_token",
        "token_revoked",
        "token_expired",
        "client_disabled",
        "credential_disabled",
        "upstream_disabled",
        "credential_undecryptable",  # written before it became credential_unavailable
        "credential_unavailable",
        "credential_expired",  # a manual token past its expiry at Canvas
        "token_store_unavailable",
        # The request and the grant (core.admission, core.rules, core.scopes).
        "malformed_request",
        "non_canonical_path",
        "path_too_long",
        "path_not_proxied",
        "scope_not_granted",
        "constraint_violation",
        "exact_scope_required",
        "credential_param_denied",
        "method_override_denied",
        "masquerade_denied",
        "include_not_allowed",
        "unsupported_media_type",
        "malformed_body",
        "body_too_large",
        "source_not_allowed",
        "rate_limited",
        "rate_limit_unavailable",
        "canvas_capacity",
        "audit_unavailable",
        # Canvas and the connection (services.proxy, api.proxy).
        "upstream_unreachable",
        "upstream_timeout",
        "upstream_credential_exposed",
        "upstream_credential_rejected",
        "canvas_rate_limited",
        "upstream_body_failed",
        "client_disconnected",
        "not_found",
        "invalid_request",
        "service_unavailable",
    }
)
"""Why a proxied call was refused or fell short."""

TOKEN_REASONS: Final = frozenset(
    {
        "invalid_client",
        "client_disabled",
        "invalid_assertion",
        "assertion_replayed",
        "invalid_scope",
        "source_not_allowed",
        "credential_disabled",
        "upstream_disabled",
        "invalid_request",
        "unsupported_grant_type",
        "unauthorized_client",
        "malformed_token",
        "unknown_token",
        "token_revoked",
        "token_rate_limited",
        # Token exchange (services.exchange, core.workload).
        "invalid_target",
        "invalid_subject_token",
        "subject_token_expired",
        "subject_token_replayed",
        "issuer_not_trusted",
        "issuer_not_allowed",
        "issuer_unavailable",
        "audience_mismatch",
        "claim_mismatch",
    }
)
"""Why a token request or a client's revocation was refused or did nothing."""

ADMIN_REASONS: Final = frozenset(
    {
        "missing_admin_key",
        "malformed_admin_key",
        "unknown_admin_key",
        "revoked_admin_key",
        "invalid_admin_key",
        "read_only_key",
        "audit_chain_broken",
        # The security console (services.console)
        "sign_in_rate_limited",
        "csrf_token_invalid",
        # OAuth credentials (services.worker_oauth)
        "authorization_refused",
        "credential_unavailable",
    }
)
"""Why a management request was refused."""

REASONS: Final = PROXY_REASONS | TOKEN_REASONS | ADMIN_REASONS
"""Every ``reason`` an event may have."""
