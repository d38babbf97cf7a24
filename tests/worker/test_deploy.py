"""deploy/: Docker cannot run here, so check what can be checked by reading the files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert {"postgres", "redis", "minio", "create-bucket", "migrate", "api", "worker", "reconciler"} <= set(
        compose["services"]
    )


def test_compose_builds_reference_existing_files(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name


def test_worker_reserves_gpus_and_scales(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    assert worker["stop_grace_period"]


def test_visibility_timeout_exceeds_time_limit(compose: dict[str, Any]) -> None:
    for name in ("api", "worker", "reconciler"):
        env = compose["services"][name]["environment"]
        assert int(env["STYLEQUEUE_VISIBILITY_TIMEOUT_S"]) > int(env["STYLEQUEUE_TASK_TIME_LIMIT_S"])


def test_api_waits_for_migrations_and_bucket(compose: dict[str, Any]) -> None:
    deps = compose["services"]["api"]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["create-bucket"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_copies_existing_paths(dockerfile: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        sources = line.split()[:-1]
        for src in sources:
            if src == "README.md":
                continue  # written by the lead (pyproject's readme); checked at build time
            assert (REPO / src).exists(), f"{dockerfile}: COPY {src} does not exist"


def test_api_image_installs_no_torch() -> None:
    text = (DEPLOY / "Dockerfile.api").read_text()
    reqs = (DEPLOY / "api-requirements.txt").read_text()
    assert "--no-deps" in text
    assert not re.search(r"^(torch|torchvision)\b", reqs, flags=re.M)


def test_worker_image_bakes_weights() -> None:
    assert "stylequeue weights fetch" in (DEPLOY / "Dockerfile.worker").read_text()
