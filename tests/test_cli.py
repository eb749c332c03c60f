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


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - fixed argv
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
    assert result.stderr.count("[ok]") == 5
    assert "FAILED" not in result.stderr
