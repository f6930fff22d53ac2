"""The container and Kubernetes files, validated offline (no Docker engine or cluster here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from core.celery_app import QUEUES
from core.config import Settings
from parley.cli import app as cli

ROOT = Path(__file__).parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in MANIFESTS:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _setting_names() -> set[str]:
    names = {"DATABASE_URL", "REDIS_URL"}
    names |= {f"PARLEY_{field.upper()}" for field in Settings.model_fields}
    return names


@pytest.mark.parametrize("doc", _documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_manifests_are_valid_in_strict_mode(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_every_variable_the_files_set_is_a_setting() -> None:
    known = _setting_names()
    used: set[str] = set()
    for doc in _documents():
        if doc["kind"] == "ConfigMap":
            used |= set(doc["data"])
    used |= set(COMPOSE["x-parley"]["environment"])
    config_comment = (ROOT / "deploy" / "kubernetes" / "config.yaml").read_text()
    used |= set(re.findall(r"--from-literal=([A-Z_]+)=", config_comment))
    assert used - known == set()
    # The secrets the pods expect are exactly the settings that must not be in a ConfigMap.
    assert {"DATABASE_URL", "REDIS_URL", "PARLEY_ENCRYPTION_KEYS"} <= used


def _worker_args() -> dict[str, list[str]]:
    lanes: dict[str, list[str]] = {}
    for doc in _documents():
        if doc["kind"] != "Deployment":
            continue
        args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[0] == "worker":
            lanes[args[args.index("--queues") + 1]] = args
    return lanes


def test_each_lane_has_its_own_deployment_and_compose_service_with_its_pool() -> None:
    k8s = _worker_args()
    compose = {
        c[c.index("--queues") + 1]: c
        for s in COMPOSE["services"].values()
        if (c := s.get("command")) and c[0] == "worker"
    }
    for lanes in (k8s, compose):
        assert set(lanes) == set(QUEUES)
        assert lanes["conversations"][lanes["conversations"].index("--pool") + 1] == "prefork"
        assert lanes["send"][lanes["send"].index("--pool") + 1] == "threads"
        assert lanes["maintenance"][lanes["maintenance"].index("--concurrency") + 1] == "1"


def test_commands_exist_in_the_cli() -> None:
    commands = {c.name or c.callback.__name__ for c in cli.registered_commands if c.callback}
    for doc in _documents():
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            assert container["args"][0] in commands
    for name, service in COMPOSE["services"].items():
        if "command" in service and service.get("image", "").startswith("parley"):
            assert service["command"][0] in commands, name


def test_probes_use_the_health_routes() -> None:
    for doc in _documents():
        if doc["kind"] != "Deployment" or doc["metadata"]["name"] == "parley-beat":
            continue
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_compose_services_are_health_checked_and_wait_for_migrations() -> None:
    services = COMPOSE["services"]
    for name, service in services.items():
        if name == "migrate":
            assert service["restart"] == "no"
            continue
        assert "healthcheck" in service, name
    for name in ("api", "worker-conversations", "worker-send", "worker-maintenance", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis


def test_dockerfile_is_multi_stage_non_root_and_ships_no_build_tools() -> None:
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    assert len(stages) >= 2
    final = stages[-1]
    assert "build-essential" in stages[0] and "cmake" in stages[0]
    assert not re.search(r"apt-get install|build-essential|cmake|gcc", final)
    user = re.search(r"^USER (\S+)", final, re.M)
    assert user is not None and user.group(1) not in ("root", "0")
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert 'ENTRYPOINT ["parley"]' in final
    assert "ARG LOCAL_MODEL=false" in stages[0]
