"""Check the deployment artefacts with what runs here (no Docker engine in CI).

- every YAML file parses; Kubernetes documents have apiVersion/kind/metadata.name;
- every BROKER_* variable the compose file, manifests and Dockerfile set is a real setting
  (or a variable the `broker` command reads, such as BROKER_URL);
- a projected service-account token (a keyless job's) names an audience, so it is not an
  API-server token, and lives at least Kubernetes' minimum of 600 s; a container that runs
  `broker token --subject-token-file F` mounts such a token at F and sets no client secret;
- the containers run the `broker` commands that exist (`serve`, `init --no-admin-key`);
- the Dockerfile installs requirements.txt with --require-hashes, and every other pip install
  or pip wheel in it passes --no-deps;
- requirements.txt pins every package with == and hashes, and names no index;
- the wheel the image installs contains the package and the Alembic migrations, and every
  package its metadata requires is pinned in requirements.txt within the wheel's range.

Usage: python deploy/check.py dist/canvas_token_broker-*.whl
"""

from __future__ import annotations

import itertools
import re
import shlex
import sys
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Any

import yaml
from lock_files import Lock, read_lock  # beside this script: run as deploy/check.py
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from broker.cli import app as cli_app
from broker.config import CLIENT_VARIABLES, Settings

ROOT = Path(__file__).resolve().parent.parent
LOCK = "requirements.txt"  # the runtime lock, which the image installs
SETTINGS = {f"BROKER_{name.upper()}" for name in Settings.model_fields} | CLIENT_VARIABLES
MIN_PROJECTED_SECONDS = 600  # the shortest expirationSeconds Kubernetes accepts
COMMANDS = {
    command.name or command.callback.__name__.replace("_", "-")
    for command in cli_app.registered_commands
    if command.callback is not None
}


def check_env_names(text: str, where: str, problems: list[str]) -> None:
    """Every BROKER_* name in ``text`` is a real setting."""
    names = set(re.findall(r"\bBROKER_[A-Z_]+\b", text))
    problems.extend(f"{where}: {name} is not a broker setting" for name in names - SETTINGS)


def check_args(args: object, where: str, problems: list[str]) -> None:
    """A container's arguments start with a real `broker` command."""
    if isinstance(args, list) and args and args[0] not in COMMANDS:
        problems.append(f"{where}: `broker {args[0]}` is not a command")


def check_compose(problems: list[str]) -> None:
    """The compose file parses and its broker services run real commands and settings."""
    path = ROOT / "deploy" / "docker-compose.yml"
    compose = yaml.safe_load(path.read_text())
    for name, service in compose["services"].items():
        if "image" not in service and "build" not in service:
            problems.append(f"compose service {name} has neither image nor build")
        if service.get("image") == "canvas-token-broker":
            check_args(service.get("command"), f"compose {name}", problems)
    check_env_names(path.read_text(), "docker-compose.yml", problems)


def check_kubernetes(problems: list[str]) -> None:
    """Every manifest parses and names its kind, API version and name."""
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            problems.extend(
                f"{path.name}: a document has no {field}"
                for field in ("apiVersion", "kind")
                if field not in document
            )
            if not document.get("metadata", {}).get("name"):
                problems.append(f"{path.name}: a {document.get('kind')} has no metadata.name")
            for pod in pod_specs(document):
                for container in pod.get("containers", []):
                    where = f"{path.name} {container['name']}"
                    check_args(container.get("args"), where, problems)
                check_projected_tokens(pod, path.name, problems)
        check_env_names(path.read_text(), path.name, problems)


def pod_specs(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates of a workload: a Deployment's or Job's, or a CronJob's job's."""
    spec = document.get("spec") or {}
    job = (spec.get("jobTemplate") or {}).get("spec") or {}
    templates = [spec.get("template"), job.get("template")]
    return [t["spec"] for t in templates if isinstance(t, dict) and t.get("spec")]


def check_projected_tokens(pod: dict[str, Any], where: str, problems: list[str]) -> None:
    """Projected tokens name an audience; a keyless exchange reads a mounted one."""
    tokens: dict[str, str] = {}
    for volume in pod.get("volumes", []):
        for source in (volume.get("projected") or {}).get("sources", []):
            token = source.get("serviceAccountToken")
            if token is None:
                continue
            tokens[volume["name"]] = str(token.get("path", ""))
            if not token.get("audience"):
                problems.append(
                    f"{where}: projected token {volume['name']} has no audience (it would "
                    "be an API-server token; name the broker's URL)"
                )
            lifetime = token.get("expirationSeconds", 3600)
            if not isinstance(lifetime, int) or lifetime < MIN_PROJECTED_SECONDS:
                problems.append(
                    f"{where}: projected token {volume['name']} expirationSeconds must be at "
                    f"least {MIN_PROJECTED_SECONDS}"
                )
    for container in pod.get("containers", []):
        words = " ".join(
            str(w) for w in [*container.get("command", []), *container.get("args", [])]
        )
        files = re.findall(r"--subject-token-file[ =]+[\"']?([^\s\"')]+)", words)
        mounted = {
            f"{mount['mountPath'].rstrip('/')}/{tokens[mount['name']]}"
            for mount in container.get("volumeMounts", [])
            if mount.get("name") in tokens
        }
        problems.extend(
            f"{where} {container['name']}: --subject-token-file {file} is no mounted "
            "projected service-account token"
            for file in files
            if file not in mounted
        )
        names = {variable.get("name") for variable in container.get("env", [])}
        if files and "BROKER_CLIENT_SECRET" in names:
            problems.append(
                f"{where} {container['name']}: a keyless job must not carry BROKER_CLIENT_SECRET"
            )


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` for each Dockerfile instruction, continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    return re.findall(r"^\s*([A-Z]+)\s+(.*)$", joined, flags=re.MULTILINE)


def pip_commands(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The words of every `pip install` and `pip wheel` that a RUN step runs."""
    found: list[list[str]] = []
    for instruction, arguments in steps:
        if instruction != "RUN":
            continue
        lexer = shlex.shlex(arguments, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in {"&&", "||", ";", "|", "&"}:
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            pip = words[2:] if words[:2] in (["python", "-m"], ["python3", "-m"]) else words
            if pip[:1] == ["pip"] and pip[1:2] in (["install"], ["wheel"]):
                found.append(pip)
    return found


def requirement_files(words: list[str]) -> list[str]:
    """The files a pip command installs from (``-r F``, ``--requirement F`` or ``=F``)."""
    files = [after for word, after in itertools.pairwise(words) if word in {"-r", "--requirement"}]
    return files + [word.partition("=")[2] for word in words if word.startswith("--requirement=")]


def check_dockerfile(problems: list[str]) -> None:
    """The image runs `broker serve`, copies files that exist, and installs only the lock."""
    text = (ROOT / "Dockerfile").read_text()
    check_env_names(text, "Dockerfile", problems)
    if 'ENTRYPOINT ["broker"]' not in text or 'CMD ["serve"]' not in text:
        problems.append("Dockerfile must run `broker serve`")
    steps = instructions(text)
    copies = [shlex.split(a) for i, a in steps if i == "COPY" and not a.startswith("--")]
    problems.extend(
        f"Dockerfile copies {source}, which does not exist"
        for *sources, _ in copies
        for source in sources
        if not (ROOT / source).exists()
    )
    # Where the lock lands in the image: a file destination, or a directory ending in "/".
    lock_paths = {
        destination + LOCK if destination.endswith("/") else destination
        for *sources, destination in copies
        if LOCK in sources
    }
    installs_lock = False
    for words in pip_commands(steps):
        command = " ".join(words)
        if "--require-hashes" not in words and "--no-deps" not in words:
            problems.append(f"Dockerfile: `{command}` resolves dependencies afresh")
        for file in requirement_files(words):
            if file not in lock_paths:
                problems.append(f"Dockerfile: `{command}` installs {file}, not the copied {LOCK}")
            elif "--require-hashes" in words:
                installs_lock = True
    if not installs_lock:
        problems.append(f"Dockerfile must copy {LOCK} and `pip install --require-hashes -r` it")


def check_wheel_requirements(wheel: Path, lock: Lock, problems: list[str]) -> None:
    """Every package the wheel requires is pinned in the lock, within the wheel's range.

    Markers are evaluated for this interpreter, which CI keeps the image's: Python 3.11 on Linux.
    """
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(metadata).decode())
    for line in message.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        pinned = lock.pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{wheel.name} requires {requirement.name}, which {LOCK} lacks")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{wheel.name} requires {requirement}; {LOCK} pins {pinned}")


def check_wheel(wheel: Path, problems: list[str]) -> None:
    """The wheel the image installs carries the package, entry point and every migration."""
    names = set(zipfile.ZipFile(wheel).namelist())
    required = (
        "broker/app.py",
        "broker/migrations/env.py",
        "broker/migrations/script.py.mako",
        # The security console's pages and assets (broker/api/console.py serves them).
        "broker/ui/templates/base.html",
        "broker/ui/static/console.js",
        "broker/ui/static/console.css",
    )
    problems.extend(f"{wheel.name} lacks {r}" for r in required if r not in names)
    migrations = {n for n in names if n.startswith("broker/migrations/versions/")}
    versions = (ROOT / "migrations" / "versions").glob("*.py")
    shipped = {f"broker/migrations/versions/{p.name}" for p in versions}
    if not shipped <= migrations:
        problems.append(f"{wheel.name} lacks migrations {sorted(shipped - migrations)}")
    if not any(n.endswith("entry_points.txt") and "broker" in n for n in names):
        problems.append(f"{wheel.name} has no entry points")


def main() -> int:
    """Run every check; non-zero exit on any problem."""
    problems: list[str] = []
    check_compose(problems)
    check_kubernetes(problems)
    check_dockerfile(problems)
    lock = read_lock(ROOT / LOCK)
    problems.extend(lock.problems)
    for wheel in sys.argv[1:]:
        check_wheel(Path(wheel), problems)
        check_wheel_requirements(Path(wheel), lock, problems)
    for problem in problems:
        print(f"deploy check: {problem}", file=sys.stderr)
    print(f"deploy check: {'FAILED' if problems else 'ok'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
