"""The ``broker`` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

BROKER = [sys.executable, "-m", "broker"]
ADMIN_KEY = re.compile(r"cba_[0-9A-Za-z]{36}")


def _run(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BROKER, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    env["BROKER_KEY_FILE"] = str(tmp_path / "cli.key")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_init_creates_key_file_schema_and_prints_only_the_first_admin_key(tmp_path: Path) -> None:
    env = _env(tmp_path)
    first = _run(["init"], env)
    assert first.returncode == 0, first.stderr
    assert ADMIN_KEY.fullmatch(first.stdout.strip())
    assert (tmp_path / "cli.key").stat().st_mode & 0o077 == 0
    again = _run(["init"], env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert "already exist" in again.stderr


def test_admin_key_create_prints_the_key_alone(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _run(["init"], env).returncode == 0
    created = _run(["admin-key", "create", "--role", "auditor", "--name", "siem"], env)
    assert created.returncode == 0, created.stderr
    assert ADMIN_KEY.fullmatch(created.stdout.strip())


def test_admin_key_create_refuses_unknown_role(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _run(["init"], env).returncode == 0
    created = _run(["admin-key", "create", "--role", "root", "--name", "x"], env)
    assert created.returncode != 0
    assert "role" in created.stderr
    assert created.stdout == ""


def test_unusable_setting_is_named(tmp_path: Path) -> None:
    result = _run(["init"], _env(tmp_path, BROKER_DATABASE_URL="mysql://x/y"))
    assert result.returncode != 0
    assert "BROKER_DATABASE_URL" in result.stderr


def test_serve_refuses_settings_only_it_may_make(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _run(["init"], env).returncode == 0
    no_workers = _run(["serve", "--workers", "0"], env)
    assert no_workers.returncode != 0
    assert "--workers" in no_workers.stderr
    inherited = _run(["serve"], {**env, "BROKER_AUDIT_SOCKET": str(tmp_path / "a.sock")})
    assert inherited.returncode != 0
    assert "BROKER_AUDIT_SOCKET" in inherited.stderr


def test_token_command_needs_its_environment(tmp_path: Path) -> None:
    result = _run(["token"], _env(tmp_path))
    assert result.returncode != 0
    assert "BROKER_URL" in result.stderr


def test_demo_check_runs_the_printed_flow(tmp_path: Path) -> None:
    result = _run(
        ["demo", "--check", "--port", str(_free_port()), "--workdir", str(tmp_path / "demo")],
        _env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("[ok]") == 7  # five manual, two OAuth
    assert "FAILED" not in result.stderr


def test_keys_rotate_reencrypts_credentials_under_a_new_primary_key(tmp_path: Path) -> None:
    import asyncio  # noqa: PLC0415
    import json  # noqa: PLC0415

    from sqlalchemy import select  # noqa: PLC0415

    from broker.bootstrap import LOCAL  # noqa: PLC0415
    from broker.config import Settings  # noqa: PLC0415
    from broker.keyring import load_key_file  # noqa: PLC0415
    from broker.services.management import ManagementService  # noqa: PLC0415
    from broker.services.tokens import WORKER_TOKEN_PURPOSE  # noqa: PLC0415
    from broker.storage.database import create_engine, session_factory  # noqa: PLC0415
    from broker.storage.models import WorkerCredential  # noqa: PLC0415

    env = _env(tmp_path)
    assert _run(["init"], env).returncode == 0
    settings = Settings(
        database_url=env["BROKER_DATABASE_URL"], key_file=tmp_path / "cli.key", keys=None
    )

    async def add_credential() -> None:
        engine = create_engine(settings.async_database_url, pool=False)
        service = ManagementService(
            session_factory(engine), load_key_file(settings.key_file), settings
        )
        await service.create_upstream(LOCAL, name="c", base_url="https://canvas.example")
        await service.create_credential(
            LOCAL, upstream="c", name="w", token="canvas-token-1234", verify=False
        )
        await engine.dispose()

    async def stored_key_id() -> tuple[str, str]:
        # What is at rest: the service hands out a credential's metadata only.
        engine = create_engine(settings.async_database_url, pool=False)
        async with session_factory(engine)() as session:
            [credential] = await session.scalars(select(WorkerCredential))
        plaintext = load_key_file(settings.key_file).decrypt(
            credential.token_key_id,
            credential.token_ciphertext,
            purpose=WORKER_TOKEN_PURPOSE,
            record_id=credential.id,
        )
        await engine.dispose()
        return credential.token_key_id, plaintext.decode()

    asyncio.run(add_credential())
    assert asyncio.run(stored_key_id()) == ("k1", "canvas-token-1234")

    rotated = _run(["keys", "rotate"], env)
    assert rotated.returncode == 0, rotated.stderr
    assert "re-encrypted 1" in rotated.stderr
    assert json.loads((tmp_path / "cli.key").read_text())["primary"] == "k2"
    assert asyncio.run(stored_key_id()) == ("k2", "canvas-token-1234")


def test_tracebacks_never_show_local_variables() -> None:
    # A crash inside a command holding a client secret or worker token must not print it.
    from broker.cli import app  # noqa: PLC0415

    assert app.pretty_exceptions_show_locals is False


def test_demo_printed_commands_work_when_pasted(tmp_path: Path) -> None:
    import textwrap  # noqa: PLC0415
    import time  # noqa: PLC0415

    port = _free_port()
    log = tmp_path / "demo.log"
    with log.open("w") as stderr:
        demo = subprocess.Popen(
            [*BROKER, "demo", "--port", str(port), "--workdir", str(tmp_path / "demo")],
            env=_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the demo did not start"
            time.sleep(0.2)
        printed = log.read_text()
        shell = printed[printed.index("  export BROKER_URL") : printed.index("Or from Python")]
        heredoc = printed.rindex("\n", 0, printed.index("<<'PY'")) + 1
        python = printed[heredoc : printed.index("\n  PY\n", heredoc) + 6]
        script = textwrap.dedent(shell) + "\n" + textwrap.dedent(python)
        result = subprocess.run(
            ["bash", "-c", script],  # noqa: S607 - bash from PATH, as a user pastes
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
        )
    finally:
        demo.terminate()
        demo.wait(timeout=20)
    assert result.returncode == 0, result.stderr
    assert '"name":"Week 1 exercise"' in result.stdout  # the allowed call's Canvas JSON
    assert '"error": "constraint_violation"' in result.stdout  # the refused call
    assert '"decision":"deny"' in result.stdout
    assert '"decision":"allow"' in result.stdout
    assert "refused:" in result.stdout  # canvasapi raised Forbidden


def test_serve_refuses_absolute_form_targets_and_ignores_forwarding_headers(
    tmp_path: Path,
) -> None:
    import time  # noqa: PLC0415

    import httpx  # noqa: PLC0415

    from tests.support import rawhttp  # noqa: PLC0415

    env = _env(tmp_path)
    init = _run(["init"], env)
    assert init.returncode == 0, init.stderr
    admin = {"Authorization": f"Bearer {init.stdout.strip()}"}
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [*BROKER, "serve", "--port", str(port)], env=env, stdout=output, stderr=output
        )
    try:
        deadline = time.monotonic() + 60
        while "Uvicorn running on" not in log.read_text():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.2)
        request = rawhttp.build(
            b"GET http://other-host/api/v1/courses/1 HTTP/1.1",
            [
                (b"Host", f"127.0.0.1:{port}".encode()),
                (b"X-Forwarded-For", b"203.0.113.9"),
                (b"X-Forwarded-Proto", b"https"),
                (b"Connection", b"close"),
            ],
        )
        response = rawhttp.exchange("127.0.0.1", port, request)
        events = httpx.get(
            f"http://127.0.0.1:{port}/broker/v1/audit", params={"kind": "proxy"}, headers=admin
        ).json()["events"]
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert response.status == 400, response.body
    assert response.json()["error"] == "non_canonical_path"
    [event] = events
    assert event["request_id"] == response.header("x-request-id")
    assert event["path"] == "http://other-host/api/v1/courses/1"
    assert (event["decision"], event["source_ip"]) == ("deny", "127.0.0.1")


def test_audit_filter_the_api_would_refuse_is_refused_before_calling_it(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{_free_port()}"
    env = _env(tmp_path, BROKER_URL=nobody, BROKER_ADMIN_KEY="cba_" + "A" * 36)
    result = _run(["audit", "query", "--status", "99"], env)
    assert result.returncode == 2, result.stderr
    assert "--status" in result.stderr
    assert "cannot reach" not in result.stderr


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    from importlib.metadata import version  # noqa: PLC0415

    result = _run(["--version"], _env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"broker {version('canvas-token-broker')}\n"


def test_shell_completion_script_is_shown_and_completes_commands(tmp_path: Path) -> None:
    env = _env(tmp_path)
    script = _run(["--show-completion", "bash"], env)
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _broker_completion broker" in script.stdout
    assert "_BROKER_COMPLETE=complete_bash" in script.stdout
    # What the script runs on <TAB>: the completions of `broker tokens intro`.
    completed = _run(
        [],
        {**env, "_BROKER_COMPLETE": "complete_bash", "COMP_WORDS": "broker tokens intro"}
        | {"COMP_CWORD": "2"},
    )
    assert completed.stdout.split() == ["introspect"]


def _with_terminal_stderr(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``broker ARGS`` with standard error on a pseudo-terminal; what it drew there."""
    import pty  # noqa: PLC0415

    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [*BROKER, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=120,
            check=False,
        )
        os.close(terminal)
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other end is closed: all was read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
    return result.returncode, drawn.decode(errors="replace")


def test_key_rotation_draws_progress_only_on_a_terminal(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _run(["init"], env).returncode == 0
    piped = _run(["keys", "rotate"], env)
    assert piped.returncode == 0, piped.stderr
    assert "re-encrypting" not in piped.stderr
    assert "\x1b" not in piped.stderr
    code, drawn = _with_terminal_stderr(["keys", "rotate"], env)
    assert code == 0, drawn
    assert "re-encrypting worker credentials under the new key" in drawn
    assert "primary key is now 'k3'" in drawn
