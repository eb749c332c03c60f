"""Read the lock files `./dev lock` writes (pip-compile's hash-pinned requirements format).

Used by ``deploy/check.py`` and ``tests/test_lock.py``. A lock entry is ``name==version``
followed by its ``--hash=`` options; anything else in a lock is a problem: a range instead of a
pin, an entry without a hash (``pip install --require-hashes`` would refuse the whole file), or
an option line such as an index or find-links, which would write a host into the repository
and override the machine's own pip configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

if TYPE_CHECKING:
    from pathlib import Path

HASH = re.compile(r"\s--hash=(\S+)")


@dataclass(frozen=True)
class Lock:
    """The pins of one lock file, by canonical name, and what is wrong with the file."""

    pins: dict[NormalizedName, Version]
    problems: list[str]


def entries(text: str) -> list[str]:
    """The logical lines of a requirements file: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


def read_lock(path: Path) -> Lock:
    """Pins and problems of the lock file at ``path``."""
    pins: dict[NormalizedName, Version] = {}
    problems: list[str] = []
    for entry in entries(path.read_text(encoding="utf-8")):
        if entry.startswith("-"):
            problems.append(f"{path.name} carries the option `{entry.split()[0]}`")
            continue
        spec = HASH.split(entry, maxsplit=1)[0].strip()
        try:
            requirement = Requirement(spec)
        except InvalidRequirement:
            problems.append(f"{path.name}: `{spec}` is not a requirement")
            continue
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
            problems.append(f"{path.name}: `{spec}` is not pinned with ==")
            continue
        if not HASH.search(entry):
            problems.append(f"{path.name}: `{spec}` has no --hash")
        name = canonicalize_name(requirement.name)
        if name in pins:
            problems.append(f"{path.name} pins {name} twice")
        pins[name] = Version(specifiers[0].version)
    return Lock(pins, problems)
