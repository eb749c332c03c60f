"""Every exception of the broker, in one tree (docs/interfaces.md#status-codes-and-error-codes).

Errors a client sees are ``BrokerError``s: each carries its HTTP ``status``, its
machine-readable ``error`` code, a message and any response headers, from wherever it is
raised (core rules included) to the one handler per surface that shapes the response
(Canvas-shaped on the proxy, ``{"error", "message"}`` on the management API, RFC 6749 on the
token endpoint). The others are raised and caught inside the broker, which turns each into a
``BrokerError`` (or, for ``ConfigurationError``, stops at start-up naming the setting)::

    Exception
    ├── BrokerError                  status, error code, message, headers
    │   ├── Refusal                  a proxied call not forwarded; status and code name the
    │   │                            rule (docs/proxy-rules.md), attribution names the caller
    │   ├── BadRequestError          400 invalid_request
    │   ├── AuthenticationError      401 invalid_token / invalid_admin_key
    │   ├── PermissionDeniedError    403 forbidden
    │   ├── NotFoundError            404 not_found
    │   ├── ConflictError            409 conflict
    │   │   └── ChainBrokenError     409 audit_chain_broken
    │   ├── ValidationFailedError    422 invalid_field
    │   ├── UnavailableError         503: a store the broker needs does not answer; fail closed
    │   │   └── AuditUnavailableError   503 audit_unavailable
    │   └── OAuthError               RFC 6749 section 5.2 codes
    ├── ValueError
    │   ├── ScopeError               an invalid scope string or constraint
    │   ├── MalformedSecretError     a token, secret or key that is not of its kind's form
    │   ├── InvalidAssertionError    a private_key_jwt assertion that does not verify
    │   ├── InvalidKeySetError       a JWK Set that cannot verify assertions
    │   └── MultipartError           a multipart body outside the form every Rack reads alike
    ├── UpstreamError                Canvas unreachable, or not answering in time
    ├── AuditWriteError              an audit event could not be committed
    │   └── AuditStoreUnavailableError  the store failed or ran past the bound: retry later
    ├── WriteLockBusy                the database's write lock is taken (a signal, not a failure)
    ├── DecryptionError              a stored secret does not decrypt under the keyring
    ├── UnsealedLogError             events written before the chain existed: run broker init
    └── ConfigurationError           a setting is unusable; the message names it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


class BrokerError(Exception):
    """Base of every error shown to a client."""

    status: int = 500
    error: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if error is not None:
            self.error = error
        self.headers = tuple(headers)


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who a refused call came from, as far as its token told (for the audit event)."""

    client_id: str
    token_id: str
    credential_id: str
    upstream: str


class Refusal(BrokerError):  # noqa: N818 - a refusal is an outcome of the rules, not a fault
    """A proxied call the broker will not forward; ``status`` and ``error`` name the rule."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
        attribution: Attribution | None = None,
    ) -> None:
        super().__init__(message, error=error, headers=headers)
        self.status = status
        self.attribution = attribution


class BadRequestError(BrokerError):
    """The request is malformed."""

    status = 400
    error = "invalid_request"


class AuthenticationError(BrokerError):
    """No valid credential was presented."""

    status = 401
    error = "invalid_token"


class PermissionDeniedError(BrokerError):
    """The credential is valid but may not do this."""

    status = 403
    error = "forbidden"


class NotFoundError(BrokerError):
    """The named resource does not exist."""

    status = 404
    error = "not_found"


class ConflictError(BrokerError):
    """The change conflicts with existing state (for example a duplicate name)."""

    status = 409
    error = "conflict"


class ChainBrokenError(ConflictError):
    """Retention refused: the events it would remove do not verify."""

    error = "audit_chain_broken"


class ValidationFailedError(BrokerError):
    """A field of the request body has an unusable value; ``field`` names it."""

    status = 422
    error = "invalid_field"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnavailableError(BrokerError):
    """A store the broker needs does not answer: it refuses rather than guess (fail closed)."""

    status = 503
    error = "service_unavailable"


class AuditUnavailableError(UnavailableError):
    """The audit store could not commit; nothing is forwarded (fail closed)."""

    error = "audit_unavailable"


class OAuthError(BrokerError):
    """An RFC 6749 section 5.2 error from the token endpoint."""

    def __init__(
        self, error: str, message: str, status: int = 400, *, retry_after: int | None = None
    ) -> None:
        super().__init__(message, error=error)
        self.status = status
        self.retry_after = retry_after
        """Seconds to wait, for a ``429`` (sent as ``Retry-After``)."""


class ScopeError(ValueError):
    """An invalid scope string or constraint; the message names the offending string."""


class MalformedSecretError(ValueError):
    """A string that is not a well-formed secret of the expected kind."""


class InvalidAssertionError(ValueError):
    """A client assertion that must be refused; the message says why (safe to show)."""


class InvalidKeySetError(ValueError):
    """A JWK Set an admin supplied that cannot be used to verify assertions."""


class MultipartError(ValueError):
    """A multipart body outside the form every Rack release reads alike; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"multipart body: {message}")


class UpstreamError(Exception):
    """The upstream could not be reached (``timeout`` False) or did not answer in time."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


class AuditWriteError(Exception):
    """An audit event could not be committed."""


class AuditStoreUnavailableError(AuditWriteError):
    """The audit store failed, or did not answer within ``BROKER_AUDIT_TIMEOUT``: try later."""


class WriteLockBusy(Exception):  # noqa: N818 - a signal to hand the event on, not an error
    """The database's write lock is taken and the caller may not wait for it."""


class DecryptionError(Exception):
    """A ciphertext does not decrypt: wrong key, wrong record or purpose, or tampered."""


class UnsealedLogError(Exception):
    """Events written before the chain existed are still unsigned: run ``broker init``."""


class ConfigurationError(Exception):
    """A setting is unusable; the message names the environment variable."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
