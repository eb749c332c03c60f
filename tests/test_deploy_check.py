"""deploy/check.py lints the keyless CronJob example, and its checks can fail."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(scope="module")
def check() -> Any:
    sys.path.insert(0, str(DEPLOY))  # it imports lock_files from beside itself
    try:
        spec = importlib.util.spec_from_file_location("deploy_check", DEPLOY / "check.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(DEPLOY))
    return module


def cronjob_pod(check: Any) -> dict[str, Any]:
    documents = check.yaml.safe_load_all(
        (DEPLOY / "kubernetes" / "keyless-cronjob.yaml").read_text()
    )
    [cronjob] = [d for d in documents if d["kind"] == "CronJob"]
    [pod] = check.pod_specs(cronjob)
    return copy.deepcopy(pod)


def problems_of(check: Any, pod: dict[str, Any]) -> list[str]:
    found: list[str] = []
    check.check_projected_tokens(pod, "keyless-cronjob.yaml", found)
    return found


def test_the_shipped_manifests_pass(check: Any) -> None:
    found: list[str] = []
    check.check_kubernetes(found)
    assert found == []
    assert problems_of(check, cronjob_pod(check)) == []


def test_a_projected_token_without_an_audience_is_a_problem(check: Any) -> None:
    pod = cronjob_pod(check)
    del pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"]
    [problem] = problems_of(check, pod)
    assert "no audience" in problem


def test_a_short_lived_projected_token_is_a_problem(check: Any) -> None:
    pod = cronjob_pod(check)
    pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"] = 60
    [problem] = problems_of(check, pod)
    assert "expirationSeconds" in problem


def test_a_subject_token_file_that_is_not_mounted_is_a_problem(check: Any) -> None:
    pod = cronjob_pod(check)
    pod["containers"][0]["volumeMounts"][0]["mountPath"] = "/elsewhere"
    [problem] = problems_of(check, pod)
    assert "/var/run/secrets/broker/token is no mounted" in problem


def test_a_keyless_job_with_a_client_secret_is_a_problem(check: Any) -> None:
    pod = cronjob_pod(check)
    pod["containers"][0]["env"].append({"name": "BROKER_CLIENT_SECRET", "value": "x"})
    [problem] = problems_of(check, pod)
    assert "BROKER_CLIENT_SECRET" in problem
