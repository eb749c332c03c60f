"""Check the deployment artefacts with what runs here (no Docker engine in CI).

- every YAML file parses; Kubernetes documents have apiVersion/kind/metadata.name;
- every BROKER_* variable the compose file, manifests and Dockerfile set is a real setting;
- the containers run the `broker` commands that exist (`serve`, `init --no-admin-key`);
- the wheel the image installs contains the package and the Alembic migrations.

Usage: python deploy/check.py dist/canvas_token_broker-*.whl
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

import yaml

from broker.cli import app as cli_app
from broker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {f"BROKER_{name.upper()}" for name in Settings.model_fields}
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
            spec = document.get("spec", {})
            template = spec.get("template", {}).get("spec", {})
            for container in template.get("containers", []):
                check_args(container.get("args"), f"{path.name} {container['name']}", problems)
        check_env_names(path.read_text(), path.name, problems)


def check_dockerfile(problems: list[str]) -> None:
    """The image runs `broker serve` and copies files that exist."""
    text = (ROOT / "Dockerfile").read_text()
    check_env_names(text, "Dockerfile", problems)
    if 'ENTRYPOINT ["broker"]' not in text or 'CMD ["serve"]' not in text:
        problems.append("Dockerfile must run `broker serve`")
    copied = re.findall(r"^COPY (?!--)(\S+)", text, flags=re.MULTILINE)
    problems.extend(
        f"Dockerfile copies {c}, which does not exist" for c in copied if not (ROOT / c).exists()
    )


def check_wheel(wheel: Path, problems: list[str]) -> None:
    """The wheel the image installs carries the package, entry point and every migration."""
    names = set(zipfile.ZipFile(wheel).namelist())
    required = ("broker/app.py", "broker/migrations/env.py", "broker/migrations/script.py.mako")
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
    for wheel in sys.argv[1:]:
        check_wheel(Path(wheel), problems)
    for problem in problems:
        print(f"deploy check: {problem}", file=sys.stderr)
    print(f"deploy check: {'FAILED' if problems else 'ok'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
