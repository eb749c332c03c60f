"""The ``broker`` command line (docs/interfaces.md#command-line).

Commands that create a secret print that secret alone on standard output and everything else
on standard error, so ``KEY=$(broker admin-key create ...)`` works in scripts.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, get_args

import httpx
import typer
from pydantic import AwareDatetime, ValidationError
from sqlalchemy.exc import SQLAlchemyError

from broker import audit_filter, cli_output
from broker.audit_filter import AuditFilter
from broker.config import Settings
from broker.core.workload import TOKEN_EXCHANGE, TOKEN_TYPE_JWT
from broker.errors import ConfigurationError
from broker.storage.database import Database

if TYPE_CHECKING:
    from collections.abc import Callable

    from broker.keyring import Keyring

# Tracebacks never show local variables: they would print secrets (client secrets, worker
# tokens, admin keys) held by the command that failed. Typer adds --install-completion and
# --show-completion (bash, zsh, fish, PowerShell).
app = typer.Typer(
    help="Canvas Token Broker",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
admin_key_app = typer.Typer(
    help="Management keys (local bootstrap and recovery).", no_args_is_help=True
)
upstreams_app = typer.Typer(help="Canvas instances (over HTTP).", no_args_is_help=True)
credentials_app = typer.Typer(help="Worker credentials (over HTTP).", no_args_is_help=True)
clients_app = typer.Typer(help="Clients and their grants (over HTTP).", no_args_is_help=True)
keys_app = typer.Typer(help="The keyring (local).", no_args_is_help=True)
tokens_app = typer.Typer(help="Live proxy tokens (over HTTP).", no_args_is_help=True)
issuers_app = typer.Typer(
    help="Workload identity issuers trust policies may name (over HTTP; admins edit).",
    no_args_is_help=True,
)
audit_app = typer.Typer(
    help="The audit log: query, export and hash over HTTP; verify and prune locally.",
    no_args_is_help=True,
)
for sub, name in (
    (admin_key_app, "admin-key"),
    (upstreams_app, "upstreams"),
    (credentials_app, "credentials"),
    (clients_app, "clients"),
    (tokens_app, "tokens"),
    (issuers_app, "issuers"),
    (keys_app, "keys"),
    (audit_app, "audit"),
):
    app.add_typer(sub, name=name)


OUTPUT = {"json": False}
"""The global output mode, set by the ``--json`` option before any command runs."""


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            typer.echo(f"broker {version('canvas-token-broker')}")
        except PackageNotFoundError:
            typer.echo("broker (not installed as a package: version unknown)")
        raise typer.Exit


@app.callback()
def options(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="print the API's JSON unchanged (for scripts) instead of tables"
        ),
    ] = False,
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Canvas Token Broker: tables for people by default, `broker --json ...` for scripts."""
    OUTPUT["json"] = as_json


def say(message: str) -> None:
    """A message for the human: standard error."""
    typer.echo(message, err=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error to standard error and exit non-zero."""
    say(f"error: {message}")
    raise typer.Exit(code)


Yes = Annotated[bool, typer.Option("--yes", "-y", help="do it without asking")]
"""The option of destructive commands that skips their confirmation (for scripts)."""


def confirm(action: str, yes: bool) -> None:
    """Ask before ``action`` unless ``--yes``; without a terminal to ask on, refuse at once."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"refusing to {action} without --yes (no terminal to confirm on)")
    # Asked and read here rather than with click's confirm, which echoes to standard output
    # (the answer of a command must stay alone there).
    typer.echo(f"{action[0].upper()}{action[1:]}? [y/N]: ", err=True, nl=False)
    if sys.stdin.readline().strip().lower() not in {"y", "yes"}:
        fail("cancelled; nothing was changed")


def _settings(code: int = 1) -> Settings:
    from broker.config import settings_from_environment  # noqa: PLC0415

    try:
        return settings_from_environment()
    except ConfigurationError as exc:
        fail(str(exc), code)


# Local commands -----------------------------------------------------------------------------


@app.command()
def init(
    admin_key: Annotated[
        bool,
        typer.Option(
            "--admin-key/--no-admin-key",
            help="print a first admin key if none exists (skip in jobs whose output is logged)",
        ),
    ] = True,
) -> None:
    """Create or upgrade the schema, create the key file if needed, print a first admin key once."""
    from broker import bootstrap  # noqa: PLC0415 - keep CLI start-up light

    settings = _settings()
    try:
        keyring = bootstrap.ensure_keyring(settings)
        sealed = bootstrap.migrate(settings, keyring)
    except ConfigurationError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        problem = _database_problem(exc)
        fail(f"BROKER_DATABASE_URL points at a database that cannot be set up ({problem})")
    say("database schema is up to date")
    if sealed:
        say(f"sealed {sealed} audit events written before the audit chain existed")
    if not admin_key:
        return
    key = bootstrap.create_admin_key(
        settings, keyring, name="initial-admin", role="admin", only_if_none=True
    )
    if key is None:
        say("admin keys already exist; use `broker admin-key create` for another")
        return
    say("first admin key (shown once; store it in your secret manager):")
    typer.echo(key)


@admin_key_app.command("create")
def admin_key_create(
    name: Annotated[str, typer.Option(help="a label for the key")],
    role: Annotated[str, typer.Option(help="admin or auditor")] = "admin",
    via_api: Annotated[
        bool,
        typer.Option(
            "--via-api", help="create it over HTTP (BROKER_URL, BROKER_ADMIN_KEY), not locally"
        ),
    ] = False,
) -> None:
    """Create a management key directly in the database; prints the key alone."""
    from broker import bootstrap  # noqa: PLC0415

    if via_api:
        created = api("POST", "/admin-keys", body={"name": name, "role": role})
        say(f"created {created['role']} key {created['name']!r} ({created['id']}; shown once)")
        typer.echo(created["key"])
        return
    from broker.errors import BrokerError  # noqa: PLC0415
    from broker.keyring import load_keyring  # noqa: PLC0415

    settings = _settings()
    try:
        keyring = load_keyring(settings)
        bootstrap.migrate(settings, keyring)
        key = bootstrap.create_admin_key(settings, keyring, name=name, role=role)
    except (ConfigurationError, BrokerError) as exc:
        fail(str(exc))
    say(f"created {role} key {name!r} (shown once)")
    typer.echo(key)


@keys_app.command("rotate")
def keys_rotate(
    new_key: Annotated[
        bool,
        typer.Option(
            "--new-key/--no-new-key",
            help="add a fresh primary key to the key file first; --no-new-key re-encrypts "
            "under the primary already there (you set it in every replica's key file)",
        ),
    ] = True,
) -> None:
    """Re-encrypt stored worker tokens under a new primary key.

    With a key file, a new key is added as primary (old keys stay, so everything still
    decrypts). With BROKER_KEYS, put the new key first yourself, then run this. Running
    brokers that read the same key file take the new key on without a restart.
    """
    from broker import bootstrap  # noqa: PLC0415

    settings = _settings()
    try:
        with cli_output.spinner("re-encrypting worker credentials under the new key"):
            primary, count = bootstrap.rotate_keys(settings, new_key=new_key)
    except ConfigurationError as exc:
        fail(str(exc))
    say(f"primary key is now {primary!r}; re-encrypted {count} worker credential(s)")
    say("keep the old keys: client secrets and admin keys hashed under them still verify")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (BROKER_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (BROKER_PORT)")] = None,
    workers: Annotated[int, typer.Option(help="worker processes")] = 1,
) -> None:
    """Run the service."""
    from broker.keyring import load_keyring  # noqa: PLC0415
    from broker.services.audit_hub import AuditHub  # noqa: PLC0415
    from broker.supervision import HUB_SOCKET, SharedDirectory  # noqa: PLC0415

    settings = _settings()
    try:
        keyring = load_keyring(settings)
    except ConfigurationError as exc:
        fail(str(exc))
    if workers < 1:
        fail("--workers must be at least 1")
    _refuse_unusable_database(settings)
    if settings.audit_socket is not None:
        fail("BROKER_AUDIT_SOCKET is set by `broker serve --workers N` for its workers; unset it")
    if workers == 1:
        _run_server(settings, host, port, workers)
        return
    # The workers share one audit writer (the hub, a thread of this process) through a Unix
    # socket, and see each other's revocations at once through the epoch file; both live in
    # a directory of this server's own (0700), and the environment carries their names to
    # the spawned workers.
    # The directory is locked while this process lives, so the next start removes it if this
    # one is killed (broker/supervision.py).
    shared = SharedDirectory()
    try:
        if settings.epoch_file is None:
            os.environ["BROKER_EPOCH_FILE"] = str(shared.path / "revocation-epoch")
        hub = AuditHub(
            Database(settings.async_database_url, timeout=settings.audit_timeout),
            keyring,
            shared.path / HUB_SOCKET,
            retained=settings.audit_retained_completions,
        )
        hub.start()
    except (ConfigurationError, RuntimeError) as exc:
        shared.remove()
        fail(str(exc))
    os.environ["BROKER_AUDIT_SOCKET"] = str(hub.path)
    try:
        _run_server(settings, host, port, workers)
    finally:
        os.environ.pop("BROKER_AUDIT_SOCKET", None)
        hub.stop()
        shared.remove()


def _refuse_unusable_database(settings: Settings) -> None:
    """Exit naming BROKER_DATABASE_URL and the fix if the database cannot serve (not at head)."""
    from broker.storage.database import check_database  # noqa: PLC0415

    problem = check_database(settings.async_database_url)
    if problem is not None:
        fail(f"BROKER_DATABASE_URL {problem}")


def _run_server(settings: Settings, host: str | None, port: int | None, workers: int) -> None:
    import uvicorn  # noqa: PLC0415

    from broker.serving import RequestTargetProtocol, raise_open_file_limit  # noqa: PLC0415

    raise_open_file_limit()  # before the workers start: they inherit it
    uvicorn.run(
        "broker.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port if port is not None else settings.port,
        workers=workers,
        # The proxy must see absolute-form targets and fragments as sent, to refuse them.
        http=RequestTargetProtocol,
        # The source address is taken from X-Forwarded-For by the broker itself, and only from
        # BROKER_TRUSTED_PROXIES; uvicorn must not rewrite it first.
        proxy_headers=False,
        server_header=False,
        log_level="info",
        # Access lines would carry query strings (a refused ?access_token=... included);
        # the audit log is the record of every request, with sensitive values as HMACs.
        access_log=False,
    )


@app.command("canvas-sim")
def canvas_sim(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8900,
    token: Annotated[
        list[str] | None, typer.Option(help="a valid Canvas token (repeatable)")
    ] = None,
    developer_key: Annotated[
        list[str] | None,
        typer.Option(help="CLIENT_ID:SECRET[:REDIRECT_URI], an OAuth developer key (repeatable)"),
    ] = None,
) -> None:
    """Run the Canvas simulator alone."""
    from broker.sim.server import parse_developer_key, run_sim  # noqa: PLC0415

    tokens = set(token or ["sim-token"])
    try:
        client_ids = [parse_developer_key(spec)[0] for spec in developer_key or []]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--developer-key") from None
    say(f"Canvas simulator on http://{host}:{port}; valid tokens: {', '.join(sorted(tokens))}")
    if client_ids:
        say(f"developer keys (client ids): {', '.join(client_ids)}")
    run_sim(host, port, tokens, developer_key)


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="broker port")] = 8000,
    workdir: Annotated[Path | None, typer.Option(help="where to keep the demo database")] = None,
    check: Annotated[
        bool, typer.Option("--check", help="run the printed flow once, report, and exit")
    ] = False,
) -> None:
    """The whole product on this machine: Canvas simulator, broker on SQLite, sample client."""
    from broker.demo import run_demo  # noqa: PLC0415

    raise typer.Exit(run_demo(port=port, workdir=workdir, check=check))


@app.command()
def backup(
    dest: Annotated[Path, typer.Argument(help="the new backup file (must not exist)")],
) -> None:
    """Copy the live SQLite database consistently (online backup); for PostgreSQL, use pg_dump.

    The key file (or BROKER_KEYS) is not in the database: back it up separately, or the
    worker tokens in the copy cannot be decrypted.
    """
    from broker.backup import BackupError, backup_sqlite, pg_dump_command  # noqa: PLC0415
    from broker.storage.database import sqlite_path  # noqa: PLC0415

    settings = _settings()
    if sqlite_path(settings.database_url) is None:
        say("broker backup copies SQLite databases; for PostgreSQL run pg_dump, e.g.:")
        say(f"  {pg_dump_command(settings.database_url, dest)}")
        raise typer.Exit(2)
    try:
        result = backup_sqlite(settings.database_url, dest)
    except BackupError as exc:
        fail(str(exc))
    say(f"backed up {result.source} to {result.destination} ({result.size} bytes)")
    say("the key file is not in the backup: keep a copy of it (or of BROKER_KEYS) as well")


@app.command()
def token(
    scope: Annotated[str | None, typer.Option(help="space-separated subset of the grant")] = None,
    expires_in: Annotated[int | None, typer.Option(help="seconds")] = None,
    subject_token_file: Annotated[
        Path | None,
        typer.Option(
            help="a keyless job: exchange the platform token in this file (a CI ID token, a "
            "projected service-account token) for client BROKER_CLIENT_ID; no secret"
        ),
    ] = None,
) -> None:
    """For scripts: mint a proxy token from BROKER_URL/BROKER_CLIENT_ID/BROKER_CLIENT_SECRET.

    With --subject-token-file, BROKER_CLIENT_SECRET is not used: the platform's token is
    exchanged (RFC 8693) under the client's trust policies.
    """
    names = ["BROKER_URL", "BROKER_CLIENT_ID"]
    if subject_token_file is None:
        names.append("BROKER_CLIENT_SECRET")
    env = {name: os.environ.get(name) or "" for name in names}
    missing = [name for name, value in env.items() if not value]
    if missing:
        fail(f"set {', '.join(missing)}")
    form = {"grant_type": "client_credentials"}
    auth: tuple[str, str] | None = (env["BROKER_CLIENT_ID"], env.get("BROKER_CLIENT_SECRET", ""))
    if subject_token_file is not None:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "client_id": env["BROKER_CLIENT_ID"],
            "subject_token": _subject_token(subject_token_file),
            "subject_token_type": TOKEN_TYPE_JWT,
        }
        auth = None
    if scope:
        form["scope"] = scope
    if expires_in is not None:
        form["expires_in"] = str(expires_in)
    try:
        response = httpx.post(
            f"{env['BROKER_URL'].rstrip('/')}/broker/v1/oauth/token",
            data=form,
            auth=auth,
            timeout=30,
        )
    except httpx.HTTPError as exc:
        fail(_unreachable(env["BROKER_URL"], exc))
    body = _json(response)
    if not isinstance(body.get("access_token" if response.is_success else "error"), str):
        fail(_not_a_broker(response, env["BROKER_URL"]))
    if response.status_code != 200:  # noqa: PLR2004
        hint = (
            " (BROKER_CLIENT_ID and BROKER_CLIENT_SECRET were refused: check them)"
            if response.status_code == 401 and subject_token_file is None  # noqa: PLR2004
            else ""
        )
        fail(f"{body.get('error')}: {body.get('error_description')}{hint}")
    say(f"token expires in {body['expires_in']} s; scope: {body['scope']}")
    typer.echo(body["access_token"])


def _subject_token(path: Path) -> str:
    """The platform token in ``path``, without surrounding whitespace; exit if unreadable."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the subject token from {path}: {type(exc).__name__}")
    if not value:
        fail(f"{path} is empty: the platform wrote no token there")
    return value


# Management over HTTP -----------------------------------------------------------------------


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"error": "unexpected_response", "message": response.text[:200]}
    return body if isinstance(body, dict) else {"items": body}


def _management_access() -> tuple[str, str]:
    """BROKER_URL (without a trailing slash) and BROKER_ADMIN_KEY, or exit saying to set them."""
    url, key = os.environ.get("BROKER_URL"), os.environ.get("BROKER_ADMIN_KEY")
    if not url or not key:
        fail("set BROKER_URL and BROKER_ADMIN_KEY")
    return url.rstrip("/"), key


def api(method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None) -> Any:  # noqa: ANN401
    """Call the management API with BROKER_URL and BROKER_ADMIN_KEY; exit on errors."""
    url, key = _management_access()
    try:
        response = httpx.request(
            method,
            f"{url}/broker/v1{path}",
            json=body,
            params={k: v for k, v in (params or {}).items() if v is not None},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        fail(_unreachable(url, exc))
    return _answer(response, url)


def _answer(response: httpx.Response, url: str) -> Any:  # noqa: ANN401
    """The JSON of a management API answer, or exit naming what is wrong."""
    if response.status_code >= 400:  # noqa: PLR2004
        fail(_refusal(response, url))
    try:
        return response.json()
    except ValueError:
        fail(_not_a_broker(response, url))


def _unreachable(url: str, exc: httpx.HTTPError) -> str:
    """Why the broker at BROKER_URL could not be asked, and what to check."""
    if isinstance(exc, httpx.ConnectError):
        return (
            f"cannot connect to the broker at BROKER_URL={url} ({exc}); "
            "check the URL and that `broker serve` runs there"
        )
    if isinstance(exc, httpx.TimeoutException):
        return f"the broker at BROKER_URL={url} did not answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return f"BROKER_URL={url!r} is not an http(s) URL: {exc}"
    return f"cannot reach the broker at BROKER_URL={url}: {exc}"


def _not_a_broker(response: httpx.Response, url: str) -> str:
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    return (
        f"BROKER_URL={url} does not look like a Canvas Token Broker: "
        f"{response.request.method} {response.request.url.path} answered "
        f"{response.status_code} {kind}; set BROKER_URL to the broker's base URL "
        "(the one serving /broker/v1/...)"
    )


def _refusal(response: httpx.Response, url: str) -> str:
    """The broker's error as one line; a key problem names BROKER_ADMIN_KEY."""
    try:
        error = response.json()
    except ValueError:
        error = None
    if not isinstance(error, dict) or not isinstance(error.get("error"), str):
        return _not_a_broker(response, url)
    line = f"{response.status_code} {error['error']}: {error.get('message')}"
    if response.status_code == 401:  # noqa: PLR2004
        return f"{line} (the key in BROKER_ADMIN_KEY was refused: check or replace it)"
    if response.status_code == 403:  # noqa: PLR2004
        return f"{line} (the key in BROKER_ADMIN_KEY may not do this: use an admin key)"
    return line


def show(value: Any) -> None:  # noqa: ANN401
    """An API answer on standard output: a table, or its JSON with ``--json``."""
    cli_output.render(value, as_json=OUTPUT["json"])
    hint = None if OUTPUT["json"] else cli_output.next_page_hint(value)
    if hint:
        say(hint)


@upstreams_app.command("create")
def upstreams_create(name: str, base_url: str) -> None:
    """Register a Canvas instance."""
    show(api("POST", "/upstreams", body={"name": name, "base_url": base_url}))


@upstreams_app.command("list")
def upstreams_list() -> None:
    """List upstreams."""
    show(api("GET", "/upstreams"))


@upstreams_app.command("disable")
def upstreams_disable(ref: str, yes: Yes = False) -> None:
    """Disable an upstream: every token bound to it stops working at once."""
    confirm(f"disable upstream {ref!r} (every token through it stops working)", yes)
    show(api("POST", f"/upstreams/{ref}/disable"))


@upstreams_app.command("enable")
def upstreams_enable(ref: str) -> None:
    """Re-enable an upstream."""
    show(api("POST", f"/upstreams/{ref}/enable"))


@upstreams_app.command("get")
def upstreams_get(ref: str) -> None:
    """Show one upstream (id or name)."""
    show(api("GET", f"/upstreams/{ref}"))


@upstreams_app.command("update")
def upstreams_update(
    ref: str,
    name: Annotated[str | None, typer.Option(help="a new name")] = None,
    base_url: Annotated[str | None, typer.Option(help="a new Canvas base URL")] = None,
) -> None:
    """Rename an upstream or move it to another base URL; only the options given change."""
    body = {k: v for k, v in {"name": name, "base_url": base_url}.items() if v is not None}
    if not body:
        fail("name at least one setting to change: --name or --base-url")
    show(api("PATCH", f"/upstreams/{ref}", body=body))


@credentials_app.command("create")
def credentials_create(
    upstream: Annotated[str, typer.Option(help="upstream id or name")],
    name: Annotated[str, typer.Option()],
    canvas_user_id: Annotated[str | None, typer.Option()] = None,
    notes: Annotated[str | None, typer.Option()] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="store without asking Canvas (offline setup)")
    ] = False,
    developer_key_id: Annotated[
        str | None,
        typer.Option(help="an OAuth credential: the Canvas developer key's Client ID"),
    ] = None,
    key_scope: Annotated[
        list[str] | None,
        typer.Option(help="a scope of the developer key, as set in Canvas (repeat for each)"),
    ] = None,
    rotate_every: Annotated[
        str | None,
        typer.Option(
            help="regenerate the token at Canvas on this schedule: seconds, 30d, 12h, 90m or "
            "ISO 8601 (P30D); at least an hour"
        ),
    ] = None,
) -> None:
    """Store a worker token, read from BROKER_WORKER_TOKEN or a hidden prompt (never argv).

    Canvas is asked who the token belongs to first (GET /api/v1/users/self); a token it
    rejects is refused and nothing is stored. The token's expiry and purpose are read from
    Canvas's Access Tokens API and shown; --rotate-every has the broker regenerate it.

    With --developer-key-id the credential is a Canvas developer key instead (its secret read
    from BROKER_DEVELOPER_KEY_SECRET or a hidden prompt): usable once the worker user has
    authorised it with `broker credentials authorize NAME`, then renewed by the broker.
    """
    if developer_key_id is not None and rotate_every is not None:
        fail("--rotate-every is for manual tokens; an OAuth credential is renewed already")
    if developer_key_id is not None:
        key_secret = os.environ.get("BROKER_DEVELOPER_KEY_SECRET") or typer.prompt(
            "the developer key's secret", hide_input=True, err=True
        )
        key = {
            "client_id": developer_key_id,
            "client_secret": key_secret,
            "scopes": key_scope or None,
        }
        show(
            api(
                "POST",
                "/credentials",
                body={
                    "upstream": upstream,
                    "name": name,
                    "developer_key": key,
                    "canvas_user_id": canvas_user_id,
                    "notes": notes,
                },
            )
        )
        return
    if key_scope:
        fail("--key-scope goes with --developer-key-id")

    secret = os.environ.get("BROKER_WORKER_TOKEN") or typer.prompt(
        "Canvas token of the worker user", hide_input=True, err=True
    )
    body = {
        "upstream": upstream,
        "name": name,
        "token": secret,
        "canvas_user_id": canvas_user_id,
        "notes": notes,
        "verify": not no_verify,
    }
    if rotate_every is not None:
        body["rotate_every"] = rotate_every
    show(api("POST", "/credentials", body=body))


@credentials_app.command("authorize")
def credentials_authorize(ref: str) -> None:
    """Start authorising an OAuth credential: prints a URL to open once as the worker user.

    Canvas then sends the browser back to the broker's callback, which stores the grant
    encrypted (the URL works once, for ten minutes). The developer key must list the
    printed redirect URI.
    """
    answer = api("POST", f"/credentials/{ref}/authorize")
    if OUTPUT["json"]:
        show(answer)
        return
    typer.echo(
        f"Open this URL once, signed in to Canvas as the worker user (until "
        f"{answer['expires_at']}):\n\n  {answer['authorization_url']}\n\n"
        f"The developer key must list this redirect URI: {answer['redirect_uri']}"
    )


@credentials_app.command("list")
def credentials_list() -> None:
    """List worker credentials (metadata only)."""
    show(api("GET", "/credentials"))


@credentials_app.command("rotate")
def credentials_rotate(
    ref: str,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="store without asking Canvas (offline setup)")
    ] = False,
    regenerate: Annotated[
        bool,
        typer.Option(
            "--regenerate",
            help="have Canvas regenerate the stored token (no token to give); the old one "
            "stops working at once",
        ),
    ] = False,
    yes: Yes = False,
) -> None:
    """Replace a stored worker token (read from BROKER_WORKER_TOKEN or a hidden prompt).

    The new token is verified with Canvas first; a rejected one leaves the old token in place.
    With --regenerate Canvas regenerates the stored token through its Access Tokens API and
    the broker stores the new value; if Canvas refuses, nothing changes.
    """
    if regenerate:
        if no_verify:
            fail("--no-verify does not go with --regenerate: Canvas is asked either way")
        confirm(
            f"have Canvas regenerate the token of credential {ref!r} (the old value stops "
            "working at once)",
            yes,
        )
        show(api("POST", f"/credentials/{ref}/rotate", body={"regenerate": True}))
        return
    confirm(f"replace the Canvas token stored for credential {ref!r}", yes)
    secret = os.environ.get("BROKER_WORKER_TOKEN") or typer.prompt(
        "new Canvas token", hide_input=True, err=True
    )
    body = {"token": secret, "verify": not no_verify}
    show(api("POST", f"/credentials/{ref}/rotate", body=body))


@credentials_app.command("disable")
def credentials_disable(ref: str, yes: Yes = False) -> None:
    """Disable a credential: every token minted through it fails at once."""
    confirm(f"disable credential {ref!r} (every token minted through it fails at once)", yes)
    show(api("POST", f"/credentials/{ref}/disable"))


@credentials_app.command("get")
def credentials_get(ref: str) -> None:
    """Show one credential's metadata (id or name; never the token)."""
    show(api("GET", f"/credentials/{ref}"))


@credentials_app.command("update")
def credentials_update(
    ref: str,
    canvas_user_id: Annotated[str | None, typer.Option()] = None,
    notes: Annotated[str | None, typer.Option()] = None,
    expires_at: Annotated[
        str | None, typer.Option(help="ISO date-time after which it is unusable")
    ] = None,
    key_scope: Annotated[
        list[str] | None,
        typer.Option(help="an OAuth credential's developer-key scope (repeat; replaces them)"),
    ] = None,
    rotate_every: Annotated[
        str | None,
        typer.Option(
            help="regenerate the manual token on this schedule (30d, 12h, seconds or ISO "
            "8601); 'never' removes the schedule"
        ),
    ] = None,
) -> None:
    """Change a credential's metadata; only the options given change (the token: `rotate`)."""
    given = {"canvas_user_id": canvas_user_id, "notes": notes}
    body: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if key_scope:
        body["key_scopes"] = key_scope
    if rotate_every is not None:
        body["rotate_every"] = None if rotate_every.strip().lower() == "never" else rotate_every
    if expires_at is not None:
        body["expires_at"] = utc_time(expires_at).isoformat()
    if not body:
        fail("name at least one setting to change, e.g. --notes")
    show(api("PATCH", f"/credentials/{ref}", body=body))


@credentials_app.command("enable")
def credentials_enable(ref: str) -> None:
    """Re-enable a credential."""
    show(api("POST", f"/credentials/{ref}/enable"))


def _constraints(values: list[str] | None) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for item in values or []:
        name, sep, allowed = item.partition("=")
        if not sep or not name or not allowed:
            fail(f"constraint {item!r} must look like course_id=1201,1202")
        result.setdefault(name, []).extend(v for v in allowed.split(",") if v)
    return result


@clients_app.command("create")
def clients_create(
    name: Annotated[str, typer.Option()],
    credential: Annotated[str, typer.Option(help="credential id or name")],
    scope: Annotated[list[str], typer.Option(help="Canvas scope string (repeatable)")],
    constraint: Annotated[
        list[str] | None, typer.Option(help="param=value1,value2 (repeatable)")
    ] = None,
    token_ttl: Annotated[int, typer.Option()] = 900,
    max_token_ttl: Annotated[int, typer.Option()] = 3600,
    allow_masquerade: Annotated[bool, typer.Option()] = False,
    allow_includes: Annotated[
        bool, typer.Option(help="may pass include[] other than uuid (Canvas's allow_includes)")
    ] = False,
    rate_limit: Annotated[
        float | None, typer.Option(help="requests per second (default: no limit)")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(help="calls allowed at once (default: ceil of the rate)")
    ] = None,
    canvas_weight: Annotated[
        float, typer.Option(help="weight in the credential's share of Canvas's rate limit")
    ] = 1.0,
    jwks_file: Annotated[
        Path | None,
        typer.Option(help="public JWK Set file: the client uses private_key_jwt, no secret"),
    ] = None,
    trust_issuer: Annotated[
        str | None,
        typer.Option(help="keyless: the workload identity issuer whose tokens it accepts"),
    ] = None,
    trust_audience: Annotated[
        str | None, typer.Option(help="keyless: the aud the platform token must name")
    ] = None,
    claim: Annotated[
        list[str] | None, typer.Option(help="keyless: claim=exact value (repeatable)")
    ] = None,
    claim_pattern: Annotated[
        list[str] | None,
        typer.Option(help="keyless: claim=regex the whole value must match (repeatable)"),
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="check the issuer answers now (--no-verify: offline setup)")
    ] = True,
) -> None:
    """Create a client; its JSON goes to stderr and the secret alone to stdout.

    With --jwks-file the client authenticates with signed assertions (private_key_jwt) and
    no secret exists: the client id alone goes to stdout. So too with --trust-issuer: a
    keyless client (workload_identity) that exchanges its platform's tokens under one trust
    policy (add more with `broker clients trust`).
    """
    policies = []
    if trust_issuer is not None:
        if jwks_file is not None:
            fail("give --jwks-file or --trust-issuer, not both", 2)
        policies = [_trust_policy(trust_issuer, trust_audience, claim, claim_pattern)]
    elif trust_audience or claim or claim_pattern:
        fail("--trust-audience, --claim and --claim-pattern need --trust-issuer", 2)
    key_set = None
    if jwks_file is not None:
        try:
            key_set = json.loads(jwks_file.read_text())
        except (OSError, ValueError) as exc:
            fail(f"cannot read a JSON key set from {jwks_file}: {exc}")
    created = api(
        "POST",
        "/clients",
        body={
            "name": name,
            "credential": credential,
            "scopes": scope,
            "constraints": _constraints(constraint),
            "token_ttl": token_ttl,
            "max_token_ttl": max_token_ttl,
            "allow_masquerade": allow_masquerade,
            "allow_includes": allow_includes,
            "rate_limit": rate_limit,
            "rate_burst": burst,
            "canvas_weight": canvas_weight,
            "auth_method": "private_key_jwt"
            if key_set is not None
            else ("workload_identity" if policies else "client_secret"),
            "jwks": key_set,
            "trust_policies": policies,
            "verify": verify,
        },
    )
    secret = created.pop("client_secret")
    _warn(created.pop("warnings", []))
    if secret is None:
        cli_output.render(created, as_json=OUTPUT["json"], err=True)
        how = (
            "keyless: `broker token --subject-token-file FILE`"
            if policies
            else "private_key_jwt: sign assertions with your private key"
        )
        say(f"client_id ({how}) follows")
        typer.echo(created["client_id"])
        return
    cli_output.render(created, as_json=OUTPUT["json"], err=True)
    say(f"client_id: {created['client_id']}; client secret (shown once) follows on stdout")
    typer.echo(secret)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        say(f"warning: {warning}")


@clients_app.command("list")
def clients_list() -> None:
    """List clients."""
    show(api("GET", "/clients"))


@clients_app.command("get")
def clients_get(ref: str) -> None:
    """Show one client."""
    show(api("GET", f"/clients/{ref}"))


@clients_app.command("grant")
def clients_grant(
    ref: str,
    scope: Annotated[
        list[str] | None,
        typer.Option(help="Canvas scope string (repeatable); replaces the scopes"),
    ] = None,
    constraint: Annotated[
        list[str] | None,
        typer.Option(help="param=v1,v2 (repeatable); replaces the constraints"),
    ] = None,
    clear_constraints: Annotated[
        bool, typer.Option("--clear-constraints", help="remove every constraint")
    ] = False,
) -> None:
    """Change a client's grant; prints each change as `field: old -> new`.

    Constraints not given are kept (they must fit the new scopes); only --clear-constraints
    removes them.
    """
    if constraint and clear_constraints:
        fail("give --constraint or --clear-constraints, not both", 2)
    body: dict[str, Any] = {}
    if scope:
        body["scopes"] = scope
    if constraint or clear_constraints:
        body["constraints"] = _constraints(constraint)
    if not body:
        fail("name what to change: --scope, --constraint or --clear-constraints", 2)
    _update_client(ref, body)


@clients_app.command("set")
def clients_set(
    ref: str,
    allow_includes: Annotated[
        bool | None,
        typer.Option(
            "--allow-includes/--no-allow-includes",
            help="may pass include[] other than uuid (Canvas's allow_includes)",
        ),
    ] = None,
    allow_masquerade: Annotated[
        bool | None,
        typer.Option("--allow-masquerade/--no-allow-masquerade", help="may pass as_user_id"),
    ] = None,
) -> None:
    """Change a client's flags; only the options given change."""
    body = {
        key: value
        for key, value in {
            "allow_includes": allow_includes,
            "allow_masquerade": allow_masquerade,
        }.items()
        if value is not None
    }
    if not body:
        fail("name at least one setting to change, e.g. --allow-includes")
    _update_client(ref, body)


@clients_app.command("update")
def clients_update(
    ref: str,
    token_ttl: Annotated[int | None, typer.Option(help="default token lifetime, seconds")] = None,
    max_token_ttl: Annotated[
        int | None, typer.Option(help="longest lifetime a script may ask for, seconds")
    ] = None,
    rate_limit: Annotated[float | None, typer.Option(help="requests per second")] = None,
    no_rate_limit: Annotated[
        bool, typer.Option("--no-rate-limit", help="remove the rate limit")
    ] = False,
    rate_burst: Annotated[
        int | None, typer.Option(help="calls allowed at once (needs a rate limit)")
    ] = None,
    canvas_weight: Annotated[
        float | None,
        typer.Option(help="weight in the credential's share of Canvas's rate limit (default 1)"),
    ] = None,
    cidr: Annotated[
        list[str] | None,
        typer.Option(help="network tokens may be requested from (repeatable); replaces the list"),
    ] = None,
    clear_cidrs: Annotated[
        bool, typer.Option("--clear-cidrs", help="allow token requests from anywhere")
    ] = False,
    allow_includes: Annotated[
        bool | None,
        typer.Option(
            "--allow-includes/--no-allow-includes",
            help="may pass include[] other than uuid (Canvas's allow_includes)",
        ),
    ] = None,
    allow_masquerade: Annotated[
        bool | None,
        typer.Option("--allow-masquerade/--no-allow-masquerade", help="may pass as_user_id"),
    ] = None,
) -> None:
    """Change a client's settings; only the options given change.

    Prints each change as `field: old -> new`. The grant itself: `broker clients grant`.
    """
    if rate_limit is not None and no_rate_limit:
        fail("give --rate-limit or --no-rate-limit, not both", 2)
    if cidr and clear_cidrs:
        fail("give --cidr or --clear-cidrs, not both", 2)
    given: dict[str, Any] = {
        "token_ttl": token_ttl,
        "max_token_ttl": max_token_ttl,
        "rate_limit": rate_limit,
        "rate_burst": rate_burst,
        "canvas_weight": canvas_weight,
        "allowed_cidrs": cidr or ([] if clear_cidrs else None),
        "allow_includes": allow_includes,
        "allow_masquerade": allow_masquerade,
    }
    body = {key: value for key, value in given.items() if value is not None}
    if no_rate_limit:
        body["rate_limit"] = None
    if not body:
        fail("name at least one setting to change, e.g. --token-ttl 600", 2)
    _update_client(ref, body)


def _update_client(ref: str, body: dict[str, Any]) -> None:
    """PATCH the client, print its warnings and each change, then the client."""
    saved: dict[str, Any] = api("PATCH", f"/clients/{ref}", body=body)
    saved.pop("tokens_revoked", None)
    _warn(saved.pop("warnings", []))
    _say_changes(saved)
    show(saved)


def _say_changes(saved: dict[str, Any]) -> None:
    """Each change of a client update as `field: old -> new` (standard error)."""
    changes: dict[str, dict[str, Any]] = saved.pop("changes", {})
    if not changes:
        say(f"no changes to {saved['name']}")
    for name, change in changes.items():
        say(f"{name}: {_shown(change['old'])} -> {_shown(change['new'])}")


def _shown(value: Any) -> str:  # noqa: ANN401 - any JSON value
    return json.dumps(value, separators=(", ", ": "))


def _trust_policy(
    issuer: str,
    audience: str | None,
    exact: list[str] | None,
    patterns: list[str] | None,
) -> dict[str, Any]:
    """A trust policy from command-line options."""
    if not audience:
        fail("--trust-audience is required: the aud the job requests its token for", 2)
    claims: dict[str, Any] = {}
    for items, as_rule in ((exact, str), (patterns, lambda v: {"pattern": v})):
        for item in items or []:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                fail(f"claim rule {item!r} must look like sub=repo:org/repo:ref:refs/heads/main")
            if name in claims:
                fail(f"claim {name!r} has two rules", 2)
            claims[name] = as_rule(value)
    if not claims:
        fail("give at least one --claim or --claim-pattern (pin sub or the repository)", 2)
    return {"issuer": issuer, "audience": audience, "claims": claims}


@clients_app.command("trust")
def clients_trust(
    ref: str,
    issuer: Annotated[str, typer.Option(help="the workload identity issuer (its iss)")],
    audience: Annotated[str, typer.Option(help="the aud the platform token must name")],
    claim: Annotated[list[str] | None, typer.Option(help="claim=exact value (repeatable)")] = None,
    claim_pattern: Annotated[
        list[str] | None, typer.Option(help="claim=regex the whole value must match")
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="check the issuer answers now (--no-verify: offline setup)")
    ] = True,
) -> None:
    """Add a trust policy: tokens from ISSUER with these claims may be exchanged."""
    new = _trust_policy(issuer, audience, claim, claim_pattern)
    current = api("GET", f"/clients/{ref}")
    _update_client(ref, {"trust_policies": [*current["trust_policies"], new], "verify": verify})


@clients_app.command("untrust")
def clients_untrust(
    ref: str, index: Annotated[int, typer.Argument(help="the policy's position, from 0")]
) -> None:
    """Remove one trust policy (by its position in `broker clients get`)."""
    policies = api("GET", f"/clients/{ref}")["trust_policies"]
    if not 0 <= index < len(policies):
        fail(f"the client has {len(policies)} trust policies; there is no {index}", 2)
    _update_client(ref, {"trust_policies": policies[:index] + policies[index + 1 :]})


@clients_app.command("check")
def clients_check(ref: str, method: str, path: str) -> None:
    """Would METHOD PATH be allowed for this client? Exit 0 if allowed, 1 if not."""
    decision = api("POST", f"/clients/{ref}/check", body={"method": method, "path": path})
    show(decision)
    raise typer.Exit(0 if decision["allowed"] else 1)


@clients_app.command("disable")
def clients_disable(ref: str, yes: Yes = False) -> None:
    """Disable a client: it cannot mint, and its live tokens are revoked."""
    confirm(f"disable client {ref!r} (its tokens fail at once)", yes)
    saved = api("POST", f"/clients/{ref}/disable")
    saved.pop("warnings", None)
    _say_changes(saved)
    say(f"revoked {saved.pop('tokens_revoked', 0)} live token(s)")
    show(saved)


@clients_app.command("enable")
def clients_enable(ref: str) -> None:
    """Re-enable a client; tokens minted before it was disabled stay revoked."""
    saved = api("POST", f"/clients/{ref}/enable")
    saved.pop("warnings", None)
    saved.pop("tokens_revoked", None)
    _say_changes(saved)
    say("tokens minted before it was disabled stay revoked; mint new ones")
    show(saved)


@clients_app.command("rotate-secret")
def clients_rotate_secret(
    ref: str,
    revoke_tokens: Annotated[
        bool, typer.Option(help="also revoke every live token of the client")
    ] = False,
    yes: Yes = False,
) -> None:
    """Issue a new client secret, printed alone on stdout."""
    if revoke_tokens:
        confirm(f"rotate the secret of client {ref!r} and revoke all its live tokens", yes)
    rotated = api("POST", f"/clients/{ref}/rotate-secret", body={"revoke_tokens": revoke_tokens})
    say(f"new secret for {rotated['client_id']} (shown once) follows on stdout")
    typer.echo(rotated["client_secret"])


@clients_app.command("revoke-tokens")
def clients_revoke_tokens(ref: str, yes: Yes = False) -> None:
    """Revoke every live token of a client."""
    confirm(f"revoke every live token of client {ref!r}", yes)
    show(api("POST", f"/clients/{ref}/revoke-tokens"))


@tokens_app.command("list")
def tokens_list(
    client: Annotated[str | None, typer.Option()] = None,
    include_inactive: Annotated[bool, typer.Option()] = False,
) -> None:
    """List live proxy tokens (ids only, never values)."""
    show(api("GET", "/tokens", params={"client": client, "include_inactive": include_inactive}))


MAX_TOKEN_INPUT = 4096
"""The most characters read as a token value (a proxy token has 40)."""


def read_secret_value(what: str, from_stdin: bool) -> str:
    """A secret value from standard input (``--stdin``) or a hidden prompt; never from argv.

    One trailing newline is dropped. The value is never echoed, not even in an error.
    """
    if from_stdin:
        value = sys.stdin.read(MAX_TOKEN_INPUT + 2).removesuffix("\n").removesuffix("\r")
    elif sys.stdin.isatty():
        value = typer.prompt(what, hide_input=True, err=True)
    else:
        fail(f"pipe the {what} with --stdin (it is never taken from the command line)")
    value = value.strip()
    if not value:
        fail(f"no {what} given")
    if len(value) > MAX_TOKEN_INPUT:
        fail(f"that is not a {what}: more than {MAX_TOKEN_INPUT} characters")
    return value


def _refuse_value_on_argv(text: str) -> None:
    if text.startswith("cbt_"):
        fail(
            "that is a token value, not a token id (tok_...): it is now in your shell history; "
            "pipe it instead: broker tokens revoke --stdin --yes"
        )


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[
        str | None, typer.Argument(help="the token's id (tok_...), from `tokens list`")
    ] = None,
    from_stdin: Annotated[
        bool,
        typer.Option("--stdin", help="read the token VALUE (cbt_...) from standard input"),
    ] = False,
    yes: Yes = False,
) -> None:
    """Revoke one proxy token, by id or by its value read from standard input."""
    if (token_id is None) == (not from_stdin):
        fail("give a token id, or --stdin to read a token value (not both)")
    if token_id is not None:
        _refuse_value_on_argv(token_id)
        confirm(f"revoke token {token_id}", yes)
        show(api("POST", f"/tokens/{token_id}/revoke"))
        return
    value = read_secret_value("token value", from_stdin=True)
    confirm("revoke the token read from standard input", yes)
    show(api("POST", "/tokens/revoke", body={"token": value}))


@tokens_app.command("introspect")
def tokens_introspect(
    from_stdin: Annotated[
        bool, typer.Option("--stdin", help="read the token value from standard input")
    ] = False,
) -> None:
    """What a token value may do (RFC 7662): read from --stdin or a hidden prompt, never argv.

    Exit 0 if the token is active, 1 if not.
    """
    value = read_secret_value("token value", from_stdin)
    url, key = _management_access()
    try:
        response = httpx.post(
            f"{url}/broker/v1/oauth/introspect",
            data={"token": value},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        fail(_unreachable(url, exc))
    answer = _answer(response, url)
    if not isinstance(answer, dict) or "active" not in answer:
        fail(_not_a_broker(response, url))
    show(answer)
    raise typer.Exit(0 if answer["active"] else 1)


@issuers_app.command("add")
def issuers_add(
    issuer: Annotated[str, typer.Argument(help="issuer URL exactly as its tokens' iss")],
    description: Annotated[str | None, typer.Option()] = None,
    verify: Annotated[
        bool, typer.Option(help="fetch its discovery document now (--no-verify: offline)")
    ] = True,
) -> None:
    """Trust a workload identity issuer (GitHub Actions, GitLab, a Kubernetes cluster)."""
    show(
        api(
            "POST",
            "/trusted-issuers",
            body={"issuer": issuer, "description": description, "verify": verify},
        )
    )


@issuers_app.command("list")
def issuers_list() -> None:
    """The trusted workload identity issuers."""
    show(api("GET", "/trusted-issuers"))


@issuers_app.command("remove")
def issuers_remove(
    ref: Annotated[str, typer.Argument(help="the entry's id or the issuer URL")],
    yes: Yes = False,
) -> None:
    """Stop trusting an issuer: exchanges of its tokens are refused at once."""
    entries = api("GET", "/trusted-issuers")
    found = [e for e in entries if ref in {e["id"], e["issuer"]}]
    if not found:
        fail(f"no trusted issuer {ref!r} (see `broker issuers list`)")
    confirm(f"stop trusting {found[0]['issuer']}", yes)
    removed = api("POST", f"/trusted-issuers/{found[0]['id']}/remove")
    if removed["clients"]:
        say(f"clients whose trust policies name it: {', '.join(removed['clients'])}")
    show(removed)


@admin_key_app.command("list")
def admin_key_list() -> None:
    """List management keys, over HTTP (never their values)."""
    show(api("GET", "/admin-keys"))


@admin_key_app.command("revoke")
def admin_key_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (key_...), from `admin-key list`")],
    yes: Yes = False,
) -> None:
    """Revoke a management key, over HTTP; it is refused from its next request on."""
    if key_id.startswith("cba_"):
        fail("that is a key value, not a key id (key_...): find the id with `admin-key list`")
    confirm(f"revoke management key {key_id}", yes)
    show(api("POST", f"/admin-keys/{key_id}/revoke"))


# The audit log ------------------------------------------------------------------------------

UNUSABLE = 2
"""Exit status of local audit commands that could not run (settings, keyring, database)."""


def utc_time(text: str) -> datetime:
    """An ISO date or date-time; UTC if it names no offset (a date means its midnight)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not an ISO date or date-time") from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _filter_kind(name: str) -> type:
    """What the audit filter field ``name`` takes on the command line: text, number or time."""
    kinds = get_args(AuditFilter.model_fields[name].annotation)
    if AwareDatetime in kinds:
        return datetime
    return int if int in kinds else str


def _filter_option(name: str) -> inspect.Parameter:
    """The option of the audit filter field ``name``: named after its query parameter."""
    param = audit_filter.parameter(name)
    kind = _filter_kind(name)
    description = AuditFilter.model_fields[name].description or ""
    if kind is datetime:
        description += " (ISO date or date-time; UTC if no offset)"
    return inspect.Parameter(
        param,
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, f"--{param.replace('_', '-')}", help=description),
        annotation=int | None if kind is int else str | None,
    )


def _selection(given: dict[str, Any]) -> AuditFilter:
    """The audit filter options given, validated as the API validates its parameters."""
    times = {
        audit_filter.parameter(n) for n in AuditFilter.model_fields if _filter_kind(n) is datetime
    }
    values = {}
    for param, value in given.items():
        # A blank time is no bound, as it always was.
        parsed = (utc_time(value) if value else None) if param in times else value
        if parsed is not None:
            values[param] = parsed
    try:
        selection = AuditFilter.model_validate(values)
    except ValidationError as exc:
        [error, *_] = exc.errors()
        option = "--" + str(error["loc"][0]).replace("_", "-")
        raise typer.BadParameter(error["msg"], param_hint=option) from exc
    unknown = selection.unknown_value()
    if unknown is not None:
        raise typer.BadParameter(unknown[1], param_hint="--" + unknown[0].replace("_", "-"))
    return selection


def audit_filter_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give an audit command one option per audit filter (``broker.audit_filter``).

    The command takes a ``selection`` parameter instead, the options given as one validated
    ``AuditFilter``; its other parameters are its own options. A filter added to
    ``AuditFilter`` is thereby an option of every audit command.
    """
    signature = inspect.signature(command, eval_str=True)
    parameters = [
        *(p for p in signature.parameters.values() if p.name != "selection"),
        *(_filter_option(name) for name in AuditFilter.model_fields),
    ]
    params = [audit_filter.parameter(name) for name in AuditFilter.model_fields]

    @functools.wraps(command)
    def with_filters(**options: Any) -> None:  # noqa: ANN401 - the command's own options
        given = {param: options.pop(param) for param in params}
        command(selection=_selection(given), **options)

    # Typer reads the options from the signature and annotations.
    with_filters.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    with_filters.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_filters


@audit_app.command("query")
@audit_filter_options
def audit_query(
    selection: AuditFilter,
    limit: Annotated[int, typer.Option(help="events per page (at most 1000)")] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page")] = None,
) -> None:
    """Audit events, newest first: one page, with next_cursor for the next."""
    params = {**selection.query_params(), "limit": limit, "cursor": cursor}
    show(api("GET", "/audit", params=params))


@audit_app.command("export")
@audit_filter_options
def audit_export(
    selection: AuditFilter,
    export_format: Annotated[
        str, typer.Option("--format", help="ndjson (one JSON event per line) or csv")
    ] = "ndjson",
) -> None:
    """Stream every selected event, newest first, to standard output (`> file`)."""
    if export_format not in {"ndjson", "csv"}:
        raise typer.BadParameter("use ndjson or csv", param_hint="--format")
    params = selection.query_params()
    url, key = _management_access()
    written = 0
    try:
        with httpx.stream(
            "GET",
            f"{url}/broker/v1/audit/export",
            params={k: v for k, v in {**params, "format": export_format}.items() if v is not None},
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30, read=300),
        ) as response:
            if response.status_code >= 400:  # noqa: PLR2004
                response.read()
                fail(_refusal(response, url))
            if not response.headers.get("content-type", "").startswith(
                ("application/x-ndjson", "text/csv")
            ):
                fail(_not_a_broker(response, url))
            with cli_output.Transfer("exporting audit events") as progress:
                for chunk in response.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                    written += len(chunk)
                    progress.advance(len(chunk))
    except httpx.ConnectError as exc:
        fail(_unreachable(url, exc))
    except httpx.HTTPError as exc:
        fail(f"the export stopped after {written} bytes: {exc}")
    sys.stdout.buffer.flush()
    say(f"exported {written} bytes")


MAX_HASHED = 8192


@audit_app.command("hash")
def audit_hash() -> None:
    """The audit HMAC of a value (e.g. a leaked token), to search for with --query-contains.

    The value is read from a hidden prompt, or from standard input when it is not a terminal
    (one trailing newline is dropped); never from the command line.
    """
    if sys.stdin.isatty():
        value = typer.prompt("value to search for", hide_input=True, err=True)
    else:
        value = sys.stdin.read(MAX_HASHED + 2)
        value = value.removesuffix("\n").removesuffix("\r")
    if not value:
        fail("no value given")
    if len(value) > MAX_HASHED:
        fail(f"values are limited to {MAX_HASHED} characters")
    result = api("POST", "/audit/hash", body={"value": value})
    show(result)
    say("search with: broker audit query --query-contains <hash>")


@audit_app.command("verify")
def audit_verify(
    as_json: Annotated[bool, typer.Option("--json", help="the report as JSON")] = False,
    expect_head: Annotated[
        str | None,
        typer.Option(help="SEQ:MAC of a head printed by an earlier verify: it must still hold"),
    ] = None,
) -> None:
    """Check the audit chain (local: BROKER_DATABASE_URL and the keyring).

    Exit 0 when the log verifies, 1 when it does not (the first problem is named), 2 when it
    could not be checked.
    """
    from broker.services.audit import EarlierHead, verify_database  # noqa: PLC0415

    try:
        earlier = EarlierHead.parse(expect_head) if expect_head is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expect-head") from exc
    settings, keyring = _local_audit()
    try:
        report = verify_database(Database(settings.async_database_url), keyring, earlier)
    except SQLAlchemyError as exc:
        fail(f"cannot read the audit log: {_database_problem(exc)}", UNUSABLE)
    if as_json or OUTPUT["json"]:
        cli_output.render(report.as_dict(), as_json=True)
    else:
        typer.echo(verify_summary(report.as_dict()))
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("prune")
def audit_prune(
    before: Annotated[
        str, typer.Option(help="remove events older than this ISO date or date-time (UTC)")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="the result as JSON")] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="say what would be pruned and verify it; change nothing"),
    ] = False,
    yes: Yes = False,
) -> None:
    """Retention: remove events older than --before behind a signed checkpoint (local).

    Refused (exit 1) if the events to remove do not verify. Exit 2 if it could not run.
    """
    from broker.errors import BrokerError  # noqa: PLC0415
    from broker.requestid import current_request_id  # noqa: PLC0415
    from broker.services.audit import PruneReport, prune_database  # noqa: PLC0415

    as_json = as_json or OUTPUT["json"]
    cut = utc_time(before)
    settings, keyring = _local_audit()
    database = Database(settings.async_database_url)
    record = {"request_id": current_request_id(), "actor_key_id": None}

    def prune(*, dry: bool) -> PruneReport:
        try:
            with cli_output.spinner("verifying the audit log" if dry else "pruning the audit log"):
                return prune_database(database, keyring, cut, record, dry_run=dry)
        except BrokerError as exc:
            fail(exc.message)
        except SQLAlchemyError as exc:
            fail(f"cannot prune the audit log: {_database_problem(exc)}", UNUSABLE)

    if not dry_run and not yes:
        if not sys.stdin.isatty():
            fail("refusing to prune without --yes (no terminal to confirm on); try --dry-run")
        # Asked with what it would remove, and only once that part is known to verify.
        preview = prune(dry=True)
        if not preview.pruned:
            typer.echo(f"nothing older than {cut.isoformat()} to prune")
            return
        confirm(
            f"permanently remove {preview.pruned} audit events older than {cut.isoformat()}", yes
        )
    report = prune(dry=dry_run)
    if as_json:
        cli_output.render(report.as_dict(), as_json=True)
        return
    if dry_run:
        typer.echo(
            f"dry run: would prune {report.pruned} events older than {cut.isoformat()} "
            f"(through seq {report.through_seq}; {report.incomplete_pruned} incomplete); "
            "they verify. Nothing was changed."
            if report.pruned
            else f"dry run: nothing older than {cut.isoformat()} to prune. Nothing was changed."
        )
        return
    if report.pruned:
        typer.echo(
            f"pruned {report.pruned} events older than {cut.isoformat()} "
            f"(through seq {report.through_seq}; {report.incomplete_pruned} incomplete)"
        )
    else:
        typer.echo(f"nothing older than {cut.isoformat()} to prune")
    typer.echo(_checkpoint_line(report.checkpoint))
    typer.echo(f"recorded as audit event {report.seq} (audit.prune)")


def _local_audit() -> tuple[Settings, Keyring]:
    from broker.keyring import load_keyring  # noqa: PLC0415

    settings = _settings(UNUSABLE)
    try:
        return settings, load_keyring(settings)
    except ConfigurationError as exc:
        fail(str(exc), UNUSABLE)


def _database_problem(exc: SQLAlchemyError) -> str:
    """The driver's own first line (statement parameters are hidden by the engine)."""
    origin = getattr(exc, "orig", None) or exc
    lines = str(origin).strip().splitlines()
    return lines[0][:300] if lines else type(origin).__name__


def _checkpoint_line(checkpoint: dict[str, Any] | None) -> str:
    if checkpoint is None:
        return "checkpoint: none (nothing has been pruned)"
    return (
        f"checkpoint: events through seq {checkpoint['through_seq']} pruned "
        f"({checkpoint['events_pruned']} events, {checkpoint['incomplete_pruned']} incomplete) "
        f"at {checkpoint['created_at']}, signed with key {checkpoint['key']}"
    )


def verify_summary(report: dict[str, Any]) -> str:
    """``broker audit verify``'s report for a human."""
    problem = report["problem"]
    lines = [
        "audit log OK"
        if report["ok"]
        else f"audit log BROKEN at seq {problem['seq']}: {problem['kind']} ({problem['detail']})"
    ]
    span = (
        f" from seq {report['first_seq']} to {report['last_seq']}"
        if report["last_seq"] is not None
        else ""
    )
    keys = f", signed with keys {', '.join(report['keys'])}" if report["keys"] else ""
    lines.append(f"checked {report['checked']} events{span}{keys}")
    head = report["head"]
    lines.append(
        f"head: seq {head['seq']} mac {head['mac']} (keep a copy outside the broker)"
        if head
        else "head: none (empty log)"
    )
    earlier = report.get("earlier_head")
    if earlier and earlier["found"]:
        found = {"in_chain": "still in the chain", "pruned": "pruned since, not compared"}
        lines.append(f"earlier head seq {earlier['seq']}: {found[earlier['found']]}")
    lines.append(_checkpoint_line(report["checkpoint"]))
    incomplete = report["incomplete"]
    oldest = ", ".join(str(seq) for seq in incomplete["oldest"])
    lines.append(
        f"incomplete: {incomplete['count']} pending events never completed (oldest seqs {oldest})"
        if incomplete["count"]
        else "incomplete: none"
    )
    return "\n".join(lines)


def with_json_option(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` its own ``--json`` (the same as ``broker --json COMMAND``).

    Commands with a ``--json`` of their own (``as_json``) keep it.
    """
    signature = inspect.signature(command, eval_str=True)
    if "as_json" in signature.parameters:
        return command
    option = inspect.Parameter(
        "as_json",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--json", help="print the API's JSON unchanged"),  # noqa: FBT003
        annotation=bool,
    )

    @functools.wraps(command)
    def with_json(*args: Any, as_json: bool = False, **options: Any) -> None:  # noqa: ANN401
        OUTPUT["json"] = OUTPUT["json"] or as_json
        command(*args, **options)

    parameters = [*signature.parameters.values(), option]
    with_json.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    with_json.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_json


# Every command that prints what the API answered takes --json after its name too.
for _sub in (admin_key_app, upstreams_app, credentials_app, clients_app, tokens_app, audit_app):
    for _info in _sub.registered_commands:
        if _info.callback is not None:
            _info.callback = with_json_option(_info.callback)


def main() -> None:
    """Console-script entry point."""
    from broker.config import unknown_variables  # noqa: PLC0415

    for warning in unknown_variables(os.environ):
        say(warning)
    try:
        # The name completion scripts and usage lines use, also under `python -m broker`.
        app(prog_name="broker")
    except KeyboardInterrupt:
        sys.exit(130)
    except ConfigurationError as exc:
        # A setting found unusable deep inside a command: one line, never a traceback.
        say(f"error: {exc}")
        sys.exit(1)
    except SQLAlchemyError as exc:
        say(
            f"error: BROKER_DATABASE_URL points at a database that cannot be used "
            f"({_database_problem(exc)}): check it is running, then run `broker init`"
        )
        sys.exit(1)
