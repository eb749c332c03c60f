"""Run tests/support/rack_replay.rb under a real Rack, from Python.

``available_racks()`` says which Racks this machine can run: the Rack ``ruby`` finds by
itself (``require "rack"``: an installed gem or Debian's ruby-rack), plus every lib
directory named in ``BROKER_TEST_RACK_DIRS`` (colon-separated, e.g. checkouts of Rack's
v3.0.18 and v3.1.22 tags: ``/work/.rack/3.0/lib:/work/.rack/3.1/lib``). ``replay()`` sends
one request description (see :func:`tests.support.rack_readings.replay_request`) through
one of them and returns rack_replay.rb's JSON; ``replay_many()`` sends a batch through one
Ruby process. Nothing here raises because Ruby or Rack is missing: ``available_racks()`` is
then empty, so tests can skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("rack_replay.rb")
ENV_VAR = "BROKER_TEST_RACK_DIRS"
DEFAULT_TIMEOUT = 30.0
_RUBY_ENV = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


class ReplayError(RuntimeError):
    """Ruby could not run the replay (not a Rack error: those come back in the JSON)."""


@dataclass(frozen=True)
class RackInstall:
    """A Rack that can be run: its version, and the lib dir to put first (None: ruby's own)."""

    version: str
    lib_dir: Path | None

    @property
    def label(self) -> str:
        """``"3.1.22 (/work/.rack/3.1/lib)"`` or ``"2.2.22 (system)"``."""
        return f"{self.version} ({self.lib_dir or 'system'})"


def _ruby() -> str | None:
    return shutil.which("ruby")


def _run(args: list[str], stdin: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **_RUBY_ENV}
    env.pop("RUBYOPT", None)
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def _load_path(lib_dir: Path | None) -> list[str]:
    return [] if lib_dir is None else ["-I", str(lib_dir)]


def rack_version(lib_dir: Path | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """The release of the Rack ``ruby`` loads (from ``lib_dir`` first), or None if none."""
    ruby = _ruby()
    if ruby is None:
        return None
    if lib_dir is not None and not (lib_dir / "rack.rb").is_file():
        return None
    args = [ruby, *_load_path(lib_dir), "-e", 'require "rack"; puts Rack.release']
    try:
        done = _run(args, "", timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = done.stdout.strip()
    return version if done.returncode == 0 and version else None


def available_racks(*, timeout: float = DEFAULT_TIMEOUT) -> list[RackInstall]:
    """Every Rack this machine can run: ruby's own, then each dir in ``BROKER_TEST_RACK_DIRS``."""
    found: list[RackInstall] = []
    system = rack_version(None, timeout=timeout)
    if system is not None:
        found.append(RackInstall(system, None))
    for entry in os.environ.get(ENV_VAR, "").split(":"):
        if not entry.strip():
            continue
        lib_dir = Path(entry.strip())
        version = rack_version(lib_dir, timeout=timeout)
        if version is not None:
            found.append(RackInstall(version, lib_dir))
    return found


def replay_many(
    rack: RackInstall, requests: list[dict[str, Any]], *, timeout: float = DEFAULT_TIMEOUT
) -> list[dict[str, Any]]:
    """Replay each request description through ``rack``, in one Ruby process."""
    ruby = _ruby()
    if ruby is None:
        raise ReplayError("ruby is not installed")
    args = [ruby, *_load_path(rack.lib_dir), str(SCRIPT)]
    try:
        done = _run(args, json.dumps(requests), timeout)
    except subprocess.TimeoutExpired as exc:
        raise ReplayError(f"rack_replay.rb under {rack.label} timed out after {timeout}s") from exc
    if done.returncode != 0:
        raise ReplayError(
            f"rack_replay.rb under {rack.label} failed: {done.stderr.strip()[-2000:]}"
        )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if len(results) != len(requests):
        raise ReplayError(f"rack_replay.rb gave {len(results)} results for {len(requests)}")
    return results


def replay(
    rack: RackInstall, request: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """Replay one request description through ``rack``; rack_replay.rb's JSON result."""
    return replay_many(rack, [request], timeout=timeout)[0]
