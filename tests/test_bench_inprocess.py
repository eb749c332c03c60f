"""bench/inprocess.py still drives both apps end to end (bench/README.md, "Profiling yourself")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "inprocess.py"


def test_the_in_process_benchmark_measures_both_legs() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--calls", "200", "--concurrency", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Every call answered 200 (anything else stops the run), in both legs, then the ratio.
    assert [line.split()[0] for line in lines] == ["floor", "broker", "broker/floor"]
    assert re.fullmatch(
        r"broker/floor c=4: [\d.]+x; the broker's own work [\d.-]+ us per call", lines[2]
    )
