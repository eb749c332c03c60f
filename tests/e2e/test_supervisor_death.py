"""A killed ``broker serve --workers 2``: its workers go with it, the next start cleans up.

Contract: docs/deployment.md#processes. Run as an operator meets it: real processes, SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from broker.supervision import SHARED_PREFIX

if TYPE_CHECKING:
    from collections.abc import Iterator

BROKER = [sys.executable, "-m", "broker"]
ORPHAN_SECONDS = 8.0  # the watch notices within 0.25 s; shutdown is given 5 s at most


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    """The pids still running after waiting up to ``seconds``."""
    deadline = time.monotonic() + seconds
    alive = [pid for pid in pids if _running(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _running(pid)]
    return alive


@pytest.fixture
def broker_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An initialised SQLite broker's environment, its temporary files in a directory of its own.

    That directory is short, as a Unix socket's path must be.
    """
    scratch = Path(tempfile.mkdtemp(prefix="ctbs-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    env["BROKER_KEY_FILE"] = str(tmp_path / "broker.key")
    env["TMPDIR"] = str(scratch)
    init = subprocess.run(
        [*BROKER, "init"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert init.returncode == 0, init.stderr
    try:
        yield env
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as output:
        server = subprocess.Popen(
            [*BROKER, "serve", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=output,
            stderr=output,
        )
    deadline = time.monotonic() + 60
    while log.read_text().count("Application startup complete") < 2:
        assert server.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return server


def test_workers_exit_when_their_supervisor_is_killed_and_the_next_start_cleans_up(
    broker_env: dict[str, str], tmp_path: Path
) -> None:
    scratch = Path(broker_env["TMPDIR"])
    port = _free_port()
    first = _serve(broker_env, port, tmp_path / "first.log")
    [shared] = scratch.glob(f"{SHARED_PREFIX}*")
    workers = _children(first.pid)
    assert len(workers) >= 2

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert _wait_gone(workers, ORPHAN_SECONDS) == [], (tmp_path / "first.log").read_text()
    assert "supervising `broker serve`" in (tmp_path / "first.log").read_text()
    assert shared.exists()  # nothing of the killed supervisor could remove it

    # The port is free again, and the next start removes what the killed one left.
    second = _serve(broker_env, port, tmp_path / "second.log")
    try:
        assert not shared.exists()
        assert len(list(scratch.glob(f"{SHARED_PREFIX}*"))) == 1
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert list(scratch.glob(f"{SHARED_PREFIX}*")) == []  # a normal exit removes its own
