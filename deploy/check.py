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
    for name in set(re.findall(r"\bBROKER_[A-Z_]+\b", text)):
        if name not in SETTINGS:
            problems.append(f"{where}: {name} is not a broker setting")


def check_args(args: object, where: str, problems: list[str]) -> None:
    if isinstance(args, list) and args and args[0] not in COMMANDS:
        problems.append(f"{where}: `broker {args[0]}` is not a command")


def check_compose(problems: list[str]) -> None:
    path = ROOT / "deploy" / "docker-compose.yml"
    compose = yaml.safe_load(path.read_text())
    for name, service in compose["services"].items():
        if "image" not in service and "build" not in service:
            problems.append(f"compose service {name} has neither image nor build")
        if service.get("image") == "canvas-token-broker":
            check_args(service.get("command"), f"compose {name}", problems)
    check_env_names(path.read_text(), "docker-compose.yml", problems)


def check_kubernetes(problems: list[str]) -> None:
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            for field in ("apiVersion", "kind"):
                if field not in document:
                    problems.append(f"{path.name}: a document has no {field}")
            if not document.get("metadata", {}).get("name"):
                problems.append(f"{path.name}: a {document.get('kind')} has no metadata.name")
            spec = document.get("spec", {})
            template = spec.get("template", {}).get("spec", {})
            for container in template.get("containers", []):
                check_args(container.get("args"), f"{path.name} {container['name']}", problems)
        check_env_names(path.read_text(), path.name, problems)


def check_dockerfile(problems: list[str]) -> None:
    text = (ROOT / "Dockerfile").read_text()
    check_env_names(text, "Dockerfile", problems)
    if 'ENTRYPOINT ["broker"]' not in text or 'CMD ["serve"]' not in text:
        problems.append("Dockerfile must run `broker serve`")
    for copied in re.findall(r"^COPY (?!--)(\S+)", text, flags=re.MULTILINE):
        if not (ROOT / copied).exists():
            problems.append(f"Dockerfile copies {copied}, which does not exist")


def check_wheel(wheel: Path, problems: list[str]) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("broker/app.py", "broker/migrations/env.py", "broker/migrations/script.py.mako"):
        if required not in names:
            problems.append(f"{wheel.name} lacks {required}")
    migrations = {n for n in names if n.startswith("broker/migrations/versions/")}
    shipped = {f"broker/migrations/versions/{p.name}" for p in (ROOT / "migrations" / "versions").glob("*.py")}
    if not shipped <= migrations:
        problems.append(f"{wheel.name} lacks migrations {sorted(shipped - migrations)}")
    if not any(n.endswith("entry_points.txt") and "broker" in n for n in names):
        problems.append(f"{wheel.name} has no entry points")


def main() -> int:
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
