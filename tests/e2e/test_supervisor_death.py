"""A killed ``broker serve --workers 2``: its workers go with it, the next start cleans up.

Contract: docs/deployment.md#processes. Run as an operator meets it: real processes, SIGKILL.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from broker.supervision import SHARED_PREFIX
from tests.support.serve import free_port, init, serve, sqlite_env

if TYPE_CHECKING:
    from collections.abc import Iterator

ORPHAN_SECONDS = 8.0  # the watch notices within 0.25 s; shutdown is given 5 s at most


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
    env = sqlite_env(tmp_path, TMPDIR=str(scratch))
    init(env)
    try:
        yield env
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_workers_exit_when_their_supervisor_is_killed_and_the_next_start_cleans_up(
    broker_env: dict[str, str], tmp_path: Path
) -> None:
    scratch = Path(broker_env["TMPDIR"])
    port = free_port()
    first = serve(broker_env, port, tmp_path / "first.log", workers=2)
    [shared] = scratch.glob(f"{SHARED_PREFIX}*")
    workers = _children(first.pid)
    assert len(workers) >= 2

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert _wait_gone(workers, ORPHAN_SECONDS) == [], (tmp_path / "first.log").read_text()
    assert "supervising `broker serve`" in (tmp_path / "first.log").read_text()
    assert shared.exists()  # nothing of the killed supervisor could remove it

    # The port is free again, and the next start removes what the killed one left.
    second = serve(broker_env, port, tmp_path / "second.log", workers=2)
    try:
        assert not shared.exists()
        assert len(list(scratch.glob(f"{SHARED_PREFIX}*"))) == 1
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert list(scratch.glob(f"{SHARED_PREFIX}*")) == []  # a normal exit removes its own
