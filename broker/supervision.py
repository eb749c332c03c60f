"""The processes of one ``broker serve --workers N`` live and die together.

Contract: docs/deployment.md#processes.

- The supervisor keeps what its workers share (the audit hub's socket, the revocation epoch
  file) in a private directory (:class:`SharedDirectory`) that it holds an exclusive ``flock``
  on for as long as it lives. The kernel drops that lock however the supervisor ends, SIGKILL
  included, so the next ``broker serve`` tells a dead supervisor's directory from a live one's
  and removes it (:func:`sweep_stale`); a normal exit removes its own.
- A worker watches its parent (:class:`ParentWatch`): once the supervisor is gone the worker
  is an orphan, whose audit hub is gone with it. It then shuts down as on SIGTERM (which
  closes its copy of the listening socket, freeing the port) and exits outright if that has
  not finished within a grace period.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)

SHARED_PREFIX: Final = "canvas-token-broker-"
LOCK_NAME: Final = "supervisor.lock"
HUB_SOCKET: Final = "audit.sock"
PARENT_POLL_SECONDS: Final = 0.25
ORPHAN_GRACE_SECONDS: Final = 5.0
"""How long an orphaned worker's graceful shutdown may take before it exits outright."""


def _locked_by_someone(lock: Path) -> bool:
    """Whether a live process holds ``lock``'s flock (a dead one's was dropped by the kernel)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if this took it
    return False


def _hub_answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _stale(directory: Path) -> bool:
    """Whether ``directory`` belongs to a supervisor of this user that is no longer running.

    A directory made before supervisors locked theirs has no lock file: it is stale when no
    hub answers on its socket.
    """
    try:
        info = directory.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    lock = directory / LOCK_NAME
    if lock.exists():
        return not _locked_by_someone(lock)
    return not _hub_answers(directory / HUB_SOCKET)


def sweep_stale(parent: Path | None = None) -> list[Path]:
    """Remove the shared directories of supervisors that died without removing them."""
    root = Path(parent or tempfile.gettempdir())
    removed = []
    for directory in sorted(root.glob(f"{SHARED_PREFIX}*")):
        if _stale(directory):
            shutil.rmtree(directory, ignore_errors=True)
            if not directory.exists():
                removed.append(directory)
    if removed:
        logger.info(
            "removed %d directory(ies) left by a broker serve that was killed", len(removed)
        )
    return removed


class SharedDirectory:
    """A supervisor's private directory (0700), locked for the supervisor's life."""

    def __init__(self, parent: Path | None = None) -> None:
        sweep_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=SHARED_PREFIX, dir=parent))
        self._lock: int | None = os.open(
            self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600
        )
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def remove(self) -> None:
        """Remove the directory and drop the lock (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class ParentWatch:
    """Calls ``on_gone`` once, from a daemon thread, when this process's parent is gone.

    A process whose parent dies is re-parented (to init or a subreaper), so its parent pid
    changes; polling ``getppid`` needs no cooperation from the parent and cannot fire for a
    thread of the parent ending, as ``PR_SET_PDEATHSIG`` would.
    """

    def __init__(
        self, on_gone: Callable[[], None], *, interval: float = PARENT_POLL_SECONDS
    ) -> None:
        self.parent = os.getppid()
        self.gone = False
        self._on_gone = on_gone
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="parent-watch", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the process is shutting down anyway)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if os.getppid() != self.parent:
                self.gone = True
                self._on_gone()
                return


def leave(grace: float = ORPHAN_GRACE_SECONDS) -> None:
    """Shut this worker down as SIGTERM does; exit outright if that takes longer than ``grace``."""
    logger.error(
        "the supervising `broker serve` (pid %d's parent) is gone; this worker exits",
        os.getpid(),
    )
    deadline = threading.Timer(grace, os._exit, (70,))  # EX_SOFTWARE
    deadline.daemon = True
    deadline.start()
    os.kill(os.getpid(), signal.SIGTERM)
