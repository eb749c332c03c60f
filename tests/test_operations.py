"""Operations an admin relies on: demo clean-up, backups, default paths, the access log.

Contract: docs/deployment.md#operations, docs/configuration.md#settings. Run as a user runs
them (subprocesses of ``python -m broker``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
