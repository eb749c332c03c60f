"""``broker serve`` as an operator runs it: a subprocess on a loopback port, for e2e tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

BROKER = [sys.executable, "-m", "broker"]
START_SECONDS = 60


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sqlite_env(workdir: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any BROKER_*, for a SQLite broker in ``workdir``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["BROKER_DATABASE_URL"] = f"sqlite:///{workdir / 'broker.sqlite3'}"
    env["BROKER_KEY_FILE"] = str(workdir / "broker.key")
    return {**env, **extra}


def init(env: dict[str, str]) -> dict[str, str]:
    """Run ``broker init``; the admin key's Authorization header."""
    done = subprocess.run(
        [*BROKER, "init"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return {"Authorization": f"Bearer {done.stdout.strip()}"}


def serve(
    env: dict[str, str],
    port: int,
    log: Path,
    *,
    workers: int = 1,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``broker serve`` and wait (bounded) until every worker has started.

    If it does not start, it is killed and the assertion names what it logged.
    """
    argv = [*BROKER, "serve", "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    with log.open("w") as output:
        server = subprocess.Popen(
            argv,
            env=env,
            stdout=output,
            stderr=output,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - the callers' only set a resource limit
        )
    deadline = time.monotonic() + START_SECONDS
    try:
        while log.read_text().count("Application startup complete") < workers:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    except BaseException:
        server.kill()
        server.wait(timeout=30)
        raise
    return server
