"""Child processes of the benchmark: start, wait for, measure and always stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TERM_GRACE_S = 5.0
KILL_GRACE_S = 3.0


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Child:
    """One started process (leader of its own process group) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the process's output, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Children:
    """Every process the benchmark started; ``stop_all`` ends them newest first."""

    workdir: Path
    started: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        """Start ``argv`` in its own session, output to ``<workdir>/<name>.log``."""
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            )
        child = Child(name, popen, log)
        self.started.append(child)
        return child

    def run(
        self, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """Run ``argv`` to completion (bounded by ``timeout``); its exit code and stdout."""
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        child = Child(name, popen, self.workdir / f"{name}.log")
        self.started.append(child)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            stop(child)
            raise BenchError(f"{name} did not finish within {timeout:.0f} s") from exc
        finally:
            if not child.alive():
                self.started.remove(child)
        if err:
            with child.log.open("ab") as log:
                log.write(err)
        return popen.returncode, out.decode(errors="replace")

    def stop(self, child: Child) -> None:
        """Stop one child and forget it."""
        stop(child)
        if child in self.started:
            self.started.remove(child)

    def stop_all(self) -> None:
        """Stop every child, newest first."""
        while self.started:
            self.stop(self.started[-1])


def stop(child: Child) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers (bounded waits)."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        if not child.alive():
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=grace)
    # Workers of a multi-process server may outlive their leader for a moment.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)


def wait_http(url: str, child: Child, timeout: float, expect: int = 200) -> None:
    """Poll ``url`` until it answers ``expect``; fail early if ``child`` exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == expect:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{child.name} not ready at {url} after {timeout:.0f} s ({last})")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def cpu_seconds(root: int) -> tuple[float, float]:
    """User and system CPU of ``root`` and every descendant (live, plus reaped children)."""
    parents: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        pid = int(entry.name)
        stats[pid] = fields
        parents.setdefault(int(fields[1]), []).append(pid)
    user = system = 0
    pending = [root]
    seen: set[int] = set()
    while pending:
        pid = pending.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        fields = stats[pid]
        # utime, stime, cutime, cstime are fields 14-17 of stat(5): here 11-14.
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
        pending.extend(parents.get(pid, []))
    return user / CLOCK_TICKS, system / CLOCK_TICKS
