"""Service settings, read from ``BROKER_*`` environment variables (docs/configuration.md#settings).

Every setting has a default that works for the embedded single-process setup (SQLite file and a
key file in ``BROKER_HOME``, by default the working directory). Relative file paths are made
absolute against that home when the settings are read, so every message names the real file
and a process that changes directory keeps using the same files. ``Settings.validated()``
refuses unusable values with the name of the offending setting, so a misconfigured service
never starts half-working.
"""

from __future__ import annotations

import difflib
import ipaddress
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import make_url

from broker.core.rules import SENSITIVE_QUERY_KEYS
from broker.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///broker.sqlite3"
MIB = 1024 * 1024
MAX_PORT = 65535
DAY = 86_400

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalise_database_url(url: str) -> str:
    """Map plain ``postgresql://`` and ``sqlite://`` URLs to the async drivers the broker uses."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError("BROKER_DATABASE_URL", "must be a URL such as sqlite:///broker.db")
    drivers = {
        "postgres": "postgresql+asyncpg",
        "postgresql": "postgresql+asyncpg",
        "postgresql+asyncpg": "postgresql+asyncpg",
        "sqlite": "sqlite+aiosqlite",
        "sqlite+aiosqlite": "sqlite+aiosqlite",
    }
    if scheme not in drivers:
        raise ConfigurationError(
            "BROKER_DATABASE_URL", f"unsupported database {scheme!r}; use sqlite or postgresql"
        )
    return f"{drivers[scheme]}://{rest}"


class Settings(BaseSettings):
    """Configuration of one broker process."""

    model_config = SettingsConfigDict(env_prefix="BROKER_", extra="ignore")

    home: Path | None = Field(
        default=None,
        description="Directory that relative paths (the SQLite file, the key file) are in; "
        "unset: the working directory",
    )
    database_url: str = Field(
        default=DEFAULT_DATABASE_URL, description="SQLAlchemy URL; sqlite or postgresql"
    )
    keys: str | None = Field(
        default=None,
        description="Keyring as 'id:base64key,...' (first is primary); overrides key_file",
        repr=False,
    )
    key_file: Path = Field(default=Path("broker.key"), description="JSON keyring file (0600)")
    public_url: str | None = Field(
        default=None,
        description="Public base URL of the broker, used in rewritten Link/Location headers",
    )
    trusted_proxies: str = Field(
        default="", description="Comma-separated CIDRs whose X-Forwarded-For is believed"
    )
    max_body_bytes: int = Field(default=10 * MIB, description="Largest proxied request body")
    upstream_timeout: float = Field(default=60.0, description="Upstream read timeout, seconds")
    upstream_connect_timeout: float = Field(default=5.0, description="Upstream connect timeout")
    upstream_pool_size: int = Field(default=100, description="Upstream keep-alive connections")
    max_token_ttl: int = Field(default=12 * 3600, description="Ceiling for any proxy token TTL")
    audit_sensitive_params: str = Field(
        default="",
        description="Comma-separated query parameter names whose values the audit log keeps "
        "only as keyed HMACs, besides the built-in ones",
    )
    epoch_file: Path | None = Field(
        default=None,
        description="Set by `broker serve --workers N` for its workers: the file through which "
        "they see each other's revocations at once",
    )
    audit_socket: Path | None = Field(
        default=None,
        description="Set by `broker serve --workers N` for its workers: the Unix socket of the "
        "one audit writer they share",
    )
    access_log: bool = Field(
        default=True,
        description="One JSON line per request on standard error (sensitive query values "
        "redacted); false turns it off",
    )
    canvas_reserve: float = Field(
        default=200.0,
        description="Canvas rate-limit capacity under which a worker credential's clients share "
        "it by weight (429 canvas_capacity beyond a client's share); 0 turns sharing off",
    )
    canvas_outflow: float = Field(
        default=10.0,
        description="Units a second Canvas's rate-limit bucket leaks (Canvas's default, 10)",
    )
    audit_timeout: float = Field(
        default=2.0,
        description="Seconds a request waits for its audit commit, and the bound of every "
        "database wait (connect, statement, lock, idle in transaction); past it: 503",
    )
    audit_retained_completions: int = Field(
        default=10_000,
        description="Completions kept in memory while the audit store is down, written once "
        "it is back",
    )
    token_rate_per_source: float = Field(
        default=20.0,
        description="Token-endpoint requests a second one source address may make (bursts of "
        "ten seconds' worth); beyond it 429 with Retry-After; 0 turns the limit off",
    )
    token_rate_per_client: float = Field(
        default=5.0,
        description="Token-endpoint requests a second one authenticated client may make "
        "(bursts of ten seconds' worth); beyond it 429 with Retry-After; 0 turns it off",
    )
    header_timeout: float = Field(
        default=10.0,
        description="Seconds a client has to send a whole request head, from connecting or "
        "from its first byte; then 408 (or, if it sent nothing, the connection is closed)",
    )
    keepalive_timeout: float = Field(
        default=5.0, description="Seconds an idle keep-alive connection is kept open"
    )
    max_connections: int = Field(
        default=0,
        description="Client connections a process holds at once (0: the open-file limit less "
        "what the database, the upstream pool and the process need)",
    )
    console_idle_timeout: int = Field(
        default=900,
        description="Seconds a security-console session may sit unused before it ends (sign "
        "in again)",
    )
    console_session_lifetime: int = Field(
        default=8 * 3600,
        description="Seconds a security-console session lasts at most, however busy",
    )
    workload_fetch_timeout: float = Field(
        default=5.0,
        description="Seconds each request for a workload identity issuer's discovery document "
        "or keys may take (the whole fetch: twice that)",
    )
    workload_allow_loopback_http: bool = Field(
        default=False,
        description="Allow plain-http workload identity issuers on a loopback address (tests "
        "and development only; real issuers are https)",
    )
    host: str = Field(default="127.0.0.1", description="Address `broker serve` binds")
    port: int = Field(default=8000, description="Port `broker serve` binds")

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        """Resolve relative file paths against ``home`` (or the working directory), once."""
        base = (self.home or Path()).expanduser().absolute()
        if not self.key_file.is_absolute():
            self.key_file = base / self.key_file.expanduser()
        try:
            url = make_url(self.database_url)
        except ValueError:
            return self  # ``validated`` names the setting
        database = url.database
        if url.drivername.startswith("sqlite") and database and database != ":memory:":
            path = Path(database).expanduser()
            if not path.is_absolute() and not database.startswith("file:"):
                self.database_url = url.set(database=str(base / path)).render_as_string(
                    hide_password=False
                )
        return self

    def validated(self) -> Settings:
        """Return self after checking every value, or raise naming the bad setting."""
        if self.home is not None and not self.home.expanduser().is_dir():
            raise ConfigurationError("BROKER_HOME", f"{self.home} is not a directory")
        normalise_database_url(self.database_url)
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if parts.scheme not in {"http", "https"} or not parts.netloc:
                raise ConfigurationError("BROKER_PUBLIC_URL", "must be an absolute http(s) URL")
            if parts.path not in {"", "/"} or parts.query or parts.fragment:
                raise ConfigurationError(
                    "BROKER_PUBLIC_URL", "must not have a path, query or fragment"
                )
        _ = self.trusted_networks
        _ = self.sensitive_query_keys
        checks = {
            "BROKER_MAX_BODY_BYTES": self.max_body_bytes > 0,
            "BROKER_UPSTREAM_TIMEOUT": self.upstream_timeout > 0,
            "BROKER_UPSTREAM_CONNECT_TIMEOUT": self.upstream_connect_timeout > 0,
            "BROKER_UPSTREAM_POOL_SIZE": self.upstream_pool_size > 0,
            "BROKER_MAX_TOKEN_TTL": 0 < self.max_token_ttl <= 12 * 3600,
            "BROKER_PORT": 0 <= self.port <= MAX_PORT,
            "BROKER_CANVAS_RESERVE": 0 <= self.canvas_reserve < 100_000,  # noqa: PLR2004
            "BROKER_CANVAS_OUTFLOW": 0 < self.canvas_outflow < 100_000,  # noqa: PLR2004
            "BROKER_AUDIT_TIMEOUT": 0 < self.audit_timeout <= 3600,  # noqa: PLR2004
            "BROKER_AUDIT_RETAINED_COMPLETIONS": 0 <= self.audit_retained_completions <= 10**7,
            "BROKER_TOKEN_RATE_PER_SOURCE": 0 <= self.token_rate_per_source <= 10**6,
            "BROKER_TOKEN_RATE_PER_CLIENT": 0 <= self.token_rate_per_client <= 10**6,
            "BROKER_HEADER_TIMEOUT": 0 < self.header_timeout <= 3600,  # noqa: PLR2004
            "BROKER_KEEPALIVE_TIMEOUT": 0 < self.keepalive_timeout <= 3600,  # noqa: PLR2004
            "BROKER_MAX_CONNECTIONS": 0 <= self.max_connections <= 10**7,
            "BROKER_CONSOLE_IDLE_TIMEOUT": 0 < self.console_idle_timeout <= DAY,
            "BROKER_CONSOLE_SESSION_LIFETIME": 0 < self.console_session_lifetime <= 7 * DAY,
            "BROKER_WORKLOAD_FETCH_TIMEOUT": 0 < self.workload_fetch_timeout <= 60,  # noqa: PLR2004
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigurationError(name, "is out of range")
        return self

    @property
    def async_database_url(self) -> str:
        """The database URL with the async driver the broker uses."""
        return normalise_database_url(self.database_url)

    @cached_property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        """Parsed ``BROKER_TRUSTED_PROXIES``."""
        networks: list[IPNetwork] = []
        for item in self.trusted_proxies.split(","):
            text = item.strip()
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ConfigurationError(
                    "BROKER_TRUSTED_PROXIES", f"{text!r} is not an IP address or CIDR"
                ) from exc
        return tuple(networks)

    @cached_property
    def sensitive_query_keys(self) -> frozenset[str]:
        """Query parameters the audit log hashes: the built-in ones and the configured ones."""
        extra = {name.strip() for name in self.audit_sensitive_params.split(",") if name.strip()}
        if any(not name.isprintable() or " " in name for name in extra):
            raise ConfigurationError(
                "BROKER_AUDIT_SENSITIVE_PARAMS", "must be parameter names separated by commas"
            )
        return SENSITIVE_QUERY_KEYS | extra

    @property
    def public_base(self) -> str | None:
        """``public_url`` without a trailing slash."""
        return self.public_url.rstrip("/") if self.public_url else None


def settings_from_environment() -> Settings:
    """The settings the ``BROKER_*`` variables give, checked; else ``ConfigurationError``.

    The error names the first unusable variable and what it must be, never its value (it may
    be a key).
    """
    try:
        settings = Settings()
    except ValidationError as exc:
        [error, *_] = exc.errors()
        name = "BROKER_" + "_".join(str(part) for part in error["loc"]).upper()
        raise ConfigurationError(name, f"is not valid: {error['msg'].lower()}") from None
    return settings.validated()


CLIENT_VARIABLES = frozenset(
    {
        "BROKER_URL",
        "BROKER_ADMIN_KEY",
        "BROKER_CLIENT_ID",
        "BROKER_CLIENT_SECRET",
        "BROKER_WORKER_TOKEN",
    }
)
"""``BROKER_*`` variables the command line reads for itself (not service settings)."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per ``BROKER_*`` variable that nothing reads (a typo), naming close matches."""
    known = {f"BROKER_{name.upper()}" for name in Settings.model_fields} | CLIENT_VARIABLES
    warnings = []
    for name in sorted(environ):
        if not name.startswith("BROKER_") or name in known or name.startswith("BROKER_TEST_"):
            continue
        # Compared without the prefix every name shares, which would make anything look close.
        suffixes = sorted(k.removeprefix("BROKER_") for k in known)
        close = difflib.get_close_matches(name.removeprefix("BROKER_"), suffixes, n=3, cutoff=0.7)
        hint = f"; did you mean {' or '.join(f'BROKER_{c}' for c in close)}?" if close else ""
        warnings.append(f"warning: {name} is not a broker setting and is ignored{hint}")
    return warnings
