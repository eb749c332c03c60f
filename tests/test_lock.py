"""The lock files pin what pyproject.toml asks for.

``requirements.txt`` holds the runtime dependencies (the image installs it) and
``requirements-dev.txt`` those and the ``dev`` extra (``./dev`` and CI install it); ``./dev
lock`` writes both. These tests fail when pyproject.toml and the locks drift apart, as when a
dependency is added or its range moved without recompiling.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from deploy.lock_files import Lock, read_lock

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
RUNTIME = [Requirement(line) for line in PROJECT["dependencies"]]
DEV = [*RUNTIME, *(Requirement(line) for line in PROJECT["optional-dependencies"]["dev"])]
LOCKS = {"requirements.txt": RUNTIME, "requirements-dev.txt": DEV}


def applies(requirement: Requirement, extras: set[str]) -> bool:
    """Whether ``requirement`` holds here (the lock's Python and platform) for ``extras``."""
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": e}) for e in {"", *extras})


def unmet(requirement: Requirement, lock: Lock) -> str | None:
    """Why ``lock`` does not satisfy ``requirement``, or None when it does."""
    pinned = lock.pins.get(canonicalize_name(requirement.name))
    if pinned is None:
        return f"{requirement} is not pinned"
    if not requirement.specifier.contains(pinned, prereleases=True):
        return f"{requirement}, but the lock pins {pinned}"
    return None


@pytest.mark.parametrize("lock_name", LOCKS)
def test_lock_pins_every_pyproject_dependency_within_its_range(lock_name: str) -> None:
    lock = read_lock(ROOT / lock_name)
    wanted = [r for r in LOCKS[lock_name] if applies(r, set())]
    assert [reason for r in wanted if (reason := unmet(r, lock))] == []


@pytest.mark.parametrize("lock_name", LOCKS)
def test_lock_pins_exactly_what_pyproject_dependencies_need_in_turn(lock_name: str) -> None:
    # Followed through the installed packages' metadata: ./dev installs the dev lock, so each
    # one is the locked release (checked on the way). A pin nothing needs is left over from a
    # dependency pyproject.toml dropped.
    lock = read_lock(ROOT / lock_name)
    problems: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [r for r in LOCKS[lock_name] if applies(r, set())]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        if reason := unmet(requirement, lock):
            problems.append(reason)
        if name not in lock.pins:
            continue
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != lock.pins[name]:
            problems.append(f".venv holds {name} {installed}, not the locked one: run ./dev")
            continue
        needs = (Requirement(line) for line in metadata.requires(name) or [])
        todo.extend(r for r in needs if applies(r, requirement.extras))
    needed = {name for name, _ in seen}
    problems.extend(f"{name} is pinned but nothing needs it" for name in lock.pins.keys() - needed)
    assert sorted(problems) == []


@pytest.mark.parametrize("lock_name", LOCKS)
def test_lock_pins_each_package_with_hashes_and_names_no_index(lock_name: str) -> None:
    assert read_lock(ROOT / lock_name).problems == []


def test_dev_lock_pins_every_runtime_package_at_the_version_the_image_installs() -> None:
    runtime = read_lock(ROOT / "requirements.txt").pins
    dev = read_lock(ROOT / "requirements-dev.txt").pins
    assert {name: dev.get(name) for name in runtime} == runtime
