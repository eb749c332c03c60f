"""The broker's exception tree.

Every error a client can see is a ``BrokerError`` carrying its machine-readable ``error`` code
and HTTP ``status``; one handler per surface turns it into a response (Canvas-shaped on the
proxy, ``{"error", "message"}`` on the management API, RFC 6749 on the token endpoint)::

    BrokerError
    ├── BadRequestError            400 invalid_request
    ├── AuthenticationError        401 invalid_token / invalid_admin_key
    ├── PermissionDeniedError      403 forbidden
    ├── NotFoundError              404 not_found
    ├── ConflictError              409 conflict
    ├── ValidationFailedError      422 invalid_field
    ├── AuditUnavailableError      503 audit_unavailable
    └── OAuthError                 RFC 6749 §5.2 codes
ConfigurationError is separate: it stops the process at start-up and names the setting.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error shown to a client."""

    status: int = 500
    error: str = "internal_error"

    def __init__(self, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if error is not None:
            self.error = error


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


class ValidationFailedError(BrokerError):
    """A field of the request body has an unusable value; ``field`` names it."""

    status = 422
    error = "invalid_field"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class AuditUnavailableError(BrokerError):
    """The audit store could not commit; nothing is forwarded (fail closed)."""

    status = 503
    error = "audit_unavailable"


class OAuthError(BrokerError):
    """An RFC 6749 §5.2 error from the token endpoint."""

    def __init__(self, error: str, message: str, status: int = 400) -> None:
        super().__init__(message, error=error)
        self.status = status


class ConfigurationError(Exception):
    """A setting is unusable; the message names the environment variable."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
