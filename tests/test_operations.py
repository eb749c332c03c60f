"""Operations an admin relies on: demo clean-up, backups, default paths, the access log.

Contract: docs/deployment.md#operations, docs/configuration.md#settings. Run as a user runs
them (subprocesses of ``python -m broker``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

BROKER = [sys.executable, "-m", "broker"]
BOUND = 60  # seconds: every wait for a subprocess is bounded by this


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'ops.sqlite3'}"
    env["BROKER_KEY_FILE"] = str(tmp_path / "ops.key")
    env.update(extra)
    return env


def _run(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BROKER, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=BOUND * 2,
        check=False,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# broker demo ---------------------------------------------------------------------------------


def test_demo_check_without_a_workdir_leaves_no_files_behind(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = _run(
        ["demo", "--check", "--port", str(_free_port())], _env(tmp_path, TMPDIR=str(temp))
    )
    assert result.returncode == 0, result.stderr
    assert "removing the demo's temporary files" in result.stderr
    assert list(temp.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_stopped_by_a_signal_removes_its_temporary_files(
    tmp_path: Path, signum: signal.Signals
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    log = tmp_path / "demo.log"
    with log.open("w") as stderr:
        demo = subprocess.Popen(
            [*BROKER, "demo", "--port", str(_free_port())],
            env=_env(tmp_path, TMPDIR=str(temp)),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + BOUND
        while "Press Ctrl-C" not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the demo did not start"
            time.sleep(0.2)
        [workdir] = temp.iterdir()
        assert (workdir / "demo.sqlite3").exists()
        demo.send_signal(signum)
        demo.wait(timeout=BOUND)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(timeout=BOUND)
    assert list(temp.iterdir()) == [], log.read_text()


# broker backup -------------------------------------------------------------------------------


def test_backup_of_a_database_being_written_is_a_consistent_copy(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _run(["init", "--no-admin-key"], env).returncode == 0
    live = tmp_path / "ops.sqlite3"
    with contextlib.closing(sqlite3.connect(live)) as setup:
        setup.execute("CREATE TABLE pairs (n INTEGER)")
        setup.commit()
    stop = threading.Event()
    written = [0]

    def write_pairs() -> None:
        # Every transaction adds two rows: a consistent copy holds an even number of them.
        with contextlib.closing(sqlite3.connect(live, timeout=BOUND)) as writer:
            while not stop.is_set():
                with writer:
                    writer.execute("INSERT INTO pairs VALUES (1)")
                    writer.execute("INSERT INTO pairs VALUES (2)")
                written[0] += 1

    thread = threading.Thread(target=write_pairs, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + BOUND
        while written[0] < 50:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        result = _run(["backup", str(tmp_path / "copy.sqlite3")], env)
        during = written[0]
    finally:
        stop.set()
        thread.join(timeout=BOUND)
    assert result.returncode == 0, result.stderr
    assert "key file is not in the backup" in result.stderr
    assert during > 50
    with contextlib.closing(sqlite3.connect(tmp_path / "copy.sqlite3")) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        (rows,) = copy.execute("SELECT count(*) FROM pairs").fetchone()
        tables = {name for (name,) in copy.execute("SELECT name FROM sqlite_master")}
    assert rows > 0
    assert rows % 2 == 0
    assert {"credentials", "audit_events", "alembic_version"} <= tables


def test_backup_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    env = _env(tmp_path)
    assert _run(["init", "--no-admin-key"], env).returncode == 0
    existing = tmp_path / "keep.sqlite3"
    existing.write_text("precious")
    result = _run(["backup", str(existing)], env)
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert existing.read_text() == "precious"


def test_backup_of_a_missing_database_names_the_setting(tmp_path: Path) -> None:
    result = _run(["backup", str(tmp_path / "copy.sqlite3")], _env(tmp_path))
    assert result.returncode == 1
    assert "BROKER_DATABASE_URL" in result.stderr
    assert not (tmp_path / "copy.sqlite3").exists()


def test_backup_on_postgresql_prints_the_pg_dump_command_and_fails(tmp_path: Path) -> None:
    env = _env(tmp_path, BROKER_DATABASE_URL="postgresql://ops:s3cret@db.internal:5433/broker")
    result = _run(["backup", "nightly.dump"], env)
    assert result.returncode == 2
    assert (
        "pg_dump --format=custom --file=nightly.dump --host=db.internal --port=5433 "
        "--username=ops broker"
    ) in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


# Default file locations ----------------------------------------------------------------------


def _bare_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(extra)
    return env


def test_broker_home_holds_the_default_database_and_key_file_wherever_it_runs(
    tmp_path: Path,
) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    env = _bare_env(BROKER_HOME=str(home))
    init = _run(["init", "--no-admin-key"], env, cwd=elsewhere)
    assert init.returncode == 0, init.stderr
    assert {p.name for p in home.iterdir()} >= {"broker.sqlite3", "broker.key"}
    assert list(elsewhere.iterdir()) == []
    created = _run(["admin-key", "create", "--name", "ops"], env, cwd=elsewhere)
    assert created.returncode == 0, created.stderr


def test_running_from_the_wrong_directory_names_the_absolute_path_and_broker_home(
    tmp_path: Path,
) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    assert _run(["init", "--no-admin-key"], _bare_env(), cwd=home).returncode == 0
    result = _run(["admin-key", "create", "--name", "ops"], _bare_env(), cwd=elsewhere)
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert str(elsewhere / "broker.key") in line
    assert "BROKER_HOME" in line
    assert "Traceback" not in result.stderr


def test_a_broker_home_that_is_not_a_directory_is_named(tmp_path: Path) -> None:
    result = _run(["init"], _bare_env(BROKER_HOME=str(tmp_path / "missing")), cwd=tmp_path)
    assert result.returncode != 0
    assert "BROKER_HOME" in result.stderr
    assert "not a directory" in result.stderr
