"""bench/run.py keeps every run's results: a second run on one day takes the next name."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def run_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(BENCH))  # the bench scripts import their siblings
    module = importlib.import_module("run")
    yield module
    sys.modules.pop("run", None)


def test_a_second_run_on_one_day_does_not_replace_the_first(
    run_module: ModuleType, tmp_path: Path
) -> None:
    unused_stem = run_module.unused_stem
    assert unused_stem(tmp_path, "2026-12-07-sqlite") == "2026-12-07-sqlite"
    (tmp_path / "2026-12-07-sqlite.json").write_text("{}")
    assert unused_stem(tmp_path, "2026-12-07-sqlite") == "2026-12-07-sqlite-2"
    (tmp_path / "2026-12-07-sqlite-2.md").write_text("")  # either file marks the name taken
    assert unused_stem(tmp_path, "2026-12-07-sqlite") == "2026-12-07-sqlite-3"
    assert unused_stem(tmp_path, "2026-12-07-postgresql") == "2026-12-07-postgresql"
