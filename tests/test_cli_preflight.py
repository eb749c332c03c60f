"""The command line refuses an unusable database or setting in one line, never a traceback.

Run as a user runs it (a subprocess). Contract: docs/configuration.md#settings,
docs/deployment.md.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from broker.storage.database import head_revision

BROKER = [sys.executable, "-m", "broker"]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BROKER, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    env["BROKER_KEY_FILE"] = str(tmp_path / "broker.key")
    env.update(extra)
    return env


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The single error line of a refused command, checked to contain every needle."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _initialised(tmp_path: Path) -> dict[str, str]:
    env = _env(tmp_path)
    init = _run(["init", "--no-admin-key"], env)
    assert init.returncode == 0, init.stderr
    return env


def test_serve_refuses_a_sqlite_file_in_a_missing_directory(tmp_path: Path) -> None:
    env = _initialised(tmp_path)
    env["BROKER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'nowhere' / 'broker.sqlite3'}"
    line = _one_line_error(_run(["serve"], env), "BROKER_DATABASE_URL", "broker init")
    assert f"{tmp_path / 'nowhere'}, a directory that does not exist" in line
    assert not (tmp_path / "nowhere").exists()


def test_init_says_so_too_for_a_sqlite_file_in_a_missing_directory(tmp_path: Path) -> None:
    env = _env(tmp_path, BROKER_DATABASE_URL=f"sqlite:///{tmp_path / 'nowhere' / 'b.db'}")
    _one_line_error(_run(["init"], env), "BROKER_DATABASE_URL", "does not exist")


def test_serve_refuses_a_sqlite_file_that_does_not_exist_and_does_not_create_it(
    tmp_path: Path,
) -> None:
    env = _initialised(tmp_path)
    missing = tmp_path / "other.sqlite3"
    env["BROKER_DATABASE_URL"] = f"sqlite:///{missing}"
    _one_line_error(_run(["serve"], env), "BROKER_DATABASE_URL", "run `broker init`")
    assert not missing.exists()


def test_serve_refuses_a_database_that_was_never_initialised(tmp_path: Path) -> None:
    env = _initialised(tmp_path)
    empty = tmp_path / "empty.sqlite3"
    sqlite3.connect(empty).close()
    env["BROKER_DATABASE_URL"] = f"sqlite:///{empty}"
    _one_line_error(_run(["serve"], env), "BROKER_DATABASE_URL", "never initialised", "init")


def test_serve_refuses_a_database_behind_the_migration_head(tmp_path: Path) -> None:
    env = _initialised(tmp_path)
    with sqlite3.connect(tmp_path / "broker.sqlite3") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0001'")
    result = _run(["serve"], env)
    _one_line_error(
        result, "BROKER_DATABASE_URL", f"at migration 0001, not {head_revision()}", "broker init"
    )


def test_serve_refuses_a_database_that_does_not_answer(tmp_path: Path) -> None:
    env = _initialised(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["BROKER_DATABASE_URL"] = f"postgresql://broker@127.0.0.1:{port}/broker"
    _one_line_error(_run(["serve"], env), "BROKER_DATABASE_URL", "cannot be used", "running")


def test_keys_rotate_on_a_missing_database_leaves_the_key_file_alone(tmp_path: Path) -> None:
    env = _initialised(tmp_path)
    before = (tmp_path / "broker.key").read_text()
    env["BROKER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'nowhere' / 'broker.sqlite3'}"
    _one_line_error(_run(["keys", "rotate"], env), "BROKER_DATABASE_URL", "does not exist")
    assert (tmp_path / "broker.key").read_text() == before


@pytest.mark.parametrize(
    ("args", "code"),
    [(["serve"], 1), (["init"], 1), (["keys", "rotate"], 1), (["audit", "verify"], 2)],
)
def test_a_setting_of_the_wrong_type_is_named_in_one_line(
    tmp_path: Path, args: list[str], code: int
) -> None:
    result = _run(args, _env(tmp_path, BROKER_PORT="abc"))
    assert result.returncode == code
    _one_line_error(result, "BROKER_PORT is not valid", "integer")


def test_bad_broker_keys_are_named_without_their_value(tmp_path: Path) -> None:
    result = _run(["serve"], _env(tmp_path, BROKER_KEYS="k1:not-base64!"))
    line = _one_line_error(result, "BROKER_KEYS", "base64")
    assert "not-base64!" not in line


def test_a_key_file_in_a_directory_it_cannot_write_is_named(tmp_path: Path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    # Root ignores directory permissions; sysfs refuses new files even to root.
    key_file = Path("/sys/broker-test.key") if os.geteuid() == 0 else read_only / "broker.key"
    result = _run(["init"], _env(tmp_path, BROKER_KEY_FILE=str(key_file)))
    _one_line_error(result, "BROKER_KEY_FILE", "cannot be written", "writable")


def test_an_unknown_broker_variable_warns_naming_the_close_match(tmp_path: Path) -> None:
    env = _initialised(tmp_path)
    env["BROKER_DATABSE_URL"] = env["BROKER_DATABASE_URL"]
    result = _run(["keys", "rotate"], env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    expected = (
        "warning: BROKER_DATABSE_URL is not a broker setting and is ignored; "
        "did you mean BROKER_DATABASE_URL?"
    )
    assert warnings == [expected]
