"""What the processes of one ``broker serve`` share, and how a worker notices its supervisor die.

Contract: docs/deployment.md#processes. The end-to-end run with real processes and SIGKILL is
tests/e2e/test_supervisor_death.py.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import TYPE_CHECKING

from broker.supervision import (
    HUB_SOCKET,
    LOCK_NAME,
    SHARED_PREFIX,
    ParentWatch,
    SharedDirectory,
    sweep_stale,
)

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def test_a_live_supervisors_directory_is_kept_and_a_dead_ones_removed(tmp_path: Path) -> None:
    live = SharedDirectory(tmp_path)
    dead = tmp_path / f"{SHARED_PREFIX}dead"
    dead.mkdir(mode=0o700)
    (dead / LOCK_NAME).write_text("")  # its supervisor's flock went with the supervisor
    (dead / "revocation-epoch").write_text("3")
    try:
        assert sweep_stale(tmp_path) == [dead]
        assert live.path.is_dir()
        assert not dead.exists()
        # A second supervisor starting next to a live one leaves it alone too.
        other = SharedDirectory(tmp_path)
        assert live.path.is_dir()
        other.remove()
    finally:
        live.remove()
    assert list(tmp_path.iterdir()) == []


def test_a_directory_from_before_the_lock_is_removed_only_when_its_hub_is_gone(
    tmp_path: Path,
) -> None:
    answering = tmp_path / f"{SHARED_PREFIX}answering"
    silent = tmp_path / f"{SHARED_PREFIX}silent"
    for directory in (answering, silent):
        directory.mkdir(mode=0o700)
    (silent / HUB_SOCKET).write_text("")  # a socket file nothing listens on any more
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hub:
        hub.bind(str(answering / HUB_SOCKET))
        hub.listen()
        assert sweep_stale(tmp_path) == [silent]
    assert answering.is_dir()


def test_what_is_not_a_directory_of_this_user_is_never_removed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    (tmp_path / f"{SHARED_PREFIX}link").symlink_to(target)
    (tmp_path / f"{SHARED_PREFIX}file").write_text("")
    assert sweep_stale(tmp_path) == []
    assert (target / "precious").read_text() == "keep"
    assert (tmp_path / f"{SHARED_PREFIX}file").exists()


def test_the_watch_fires_once_when_the_parent_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    fired = threading.Event()
    calls = []

    def gone() -> None:
        calls.append(os.getppid())
        fired.set()

    watch = ParentWatch(gone, interval=0.01)
    parent = watch.parent
    watch.start()
    assert not fired.wait(0.1)  # the parent is still there
    monkeypatch.setattr(os, "getppid", lambda: parent + 1)  # re-parented (init, a subreaper)
    assert fired.wait(5)
    assert watch.gone
    assert calls == [parent + 1]
