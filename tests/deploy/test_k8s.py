"""deploy/k8s: both overlays rendered by kustomize (``kubectl kustomize``), every object validated
against the Kubernetes API schema (tests/deploy/k8s_schema.py), the references between objects
resolved, and what the deployment promises checked: GPUs, the hand-back grace period, KEDA on the
backlog (its query run on a migrated PostgreSQL), private data services."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.jobs import JobStatus

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
POLICY = K8S.parent / "minio" / "stylequeue-app-policy.json"
OVERLAYS = ("cpu", "gpu")
DATA = {"postgres": 5432, "redis": 6379, "minio": 9000}
IMAGE_ROW = {"format": "PNG", "width": 8, "height": 8, "bytes": 1}


def kustomize() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    reason = "neither kustomize nor kubectl is installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true needs one to render deploy/k8s)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """overlay -> its objects, rendered from a copy whose secrets/*.env are filled from the examples."""
    yaml = pytest.importorskip("yaml")
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    for example in (tree / "base" / "secrets").glob("*.env.example"):
        text = re.sub(r"^(\w+)=$", r"\1=not-a-secret", example.read_text(), flags=re.M)
        example.with_suffix("").write_text(text)
    out = {}
    for overlay in OVERLAYS:
        done = subprocess.run(
            [*kustomize(), str(tree / "overlays" / overlay)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        out[overlay] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return out


def objects(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for overlay, objs in rendered.items():
        for obj in objs:
            yield overlay, obj


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]


def test_every_object_is_valid_against_the_api_schema(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from tests.deploy.k8s_schema import validate

    errors = [f"{overlay}: {e}" for overlay, obj in objects(rendered) for e in validate(obj)]
    assert errors == []
    kinds = {o["kind"] for o in rendered["gpu"]}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Job", "Secret", "NetworkPolicy"} <= kinds
    assert {"ScaledObject", "TriggerAuthentication", "StatefulSet", "Ingress", "ConfigMap"} <= kinds


def test_the_validator_catches_mistakes() -> None:
    from tests.deploy.k8s_schema import validate

    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "replica": 2,  # misspelt
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"spec": {"containers": [{"image": "i", "ports": [{"containerPort": "80"}]}]}},
        },
    }
    errors = "\n".join(validate(bad))
    assert "spec.replica: no such field" in errors
    assert "containerPort: int expected" in errors
    assert "name" in errors  # a container without its required name
    keda = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"}, "spec": {}}
    assert any("scaleTargetRef.name is required" in e for e in validate(keda))


def test_references_resolve(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Every Secret/ConfigMap a pod reads (and the key it reads) and every Service's pods exist."""
    for overlay, objs in rendered.items():
        data = {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"] in ("Secret", "ConfigMap")}
        for owner, template in pod_specs(objs):
            spec = template["spec"]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for src in c.get("envFrom", []):
                    kind, ref = (
                        ("Secret", src["secretRef"])
                        if "secretRef" in src
                        else ("ConfigMap", src["configMapRef"])
                    )
                    assert (kind, ref["name"]) in data, f"{overlay} {owner['metadata']['name']}: {kind} {ref}"
                for env in c.get("env", []):
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        secret = data[("Secret", ref["name"])]
                        assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}, ref
            for vol in spec.get("volumes", []):
                if "configMap" in vol:
                    assert ("ConfigMap", vol["configMap"]["name"]) in data, vol
        labels = [t["metadata"]["labels"] for _, t in pod_specs(objs)]
        for svc in (o for o in objs if o["kind"] == "Service"):
            sel = svc["spec"]["selector"]
            assert any(sel.items() <= lab.items() for lab in labels), (
                f"{overlay}: Service {svc['metadata']['name']}"
            )
        hpa = find(objs, "HorizontalPodAutoscaler", "stylequeue-api")
        find(objs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])


def test_gpu_workers_get_a_gpu_and_cpu_workers_none(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in OVERLAYS:
        worker = find(rendered[overlay], "Deployment", "stylequeue-worker")["spec"]["template"]["spec"]
        container = worker["containers"][0]
        limits = container.get("resources", {}).get("limits", {})
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if overlay == "gpu":
            assert limits["nvidia.com/gpu"] == "1"
            assert env["STYLEQUEUE_BATCH_MAX"] == "16"
        else:
            assert "nvidia.com/gpu" not in limits and env["STYLEQUEUE_DEVICE"] == "cpu"
            assert container["image"].startswith("stylequeue-worker-cpu")
        # The hand-back: warm shutdown on SIGTERM, a preStop hook, time to finish before the kill.
        assert worker["terminationGracePeriodSeconds"] >= 300
        assert "kill -TERM 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        assert container["livenessProbe"]["exec"]["command"] == ["stylequeue", "health", "worker"]


def test_keda_scales_workers_on_the_backlog_down_to_zero(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objs in rendered.items():
        scaled = find(objs, "ScaledObject", "stylequeue-worker")["spec"]
        find(objs, "Deployment", scaled["scaleTargetRef"]["name"])
        assert scaled["minReplicaCount"] == 0
        trigger = scaled["triggers"][0]
        assert trigger["type"] == "postgresql"
        per_pod = {"cpu": "1", "gpu": "16"}[overlay]
        assert trigger["metadata"]["targetQueryValue"] == per_pod
        auth = find(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
        (ref,) = auth["secretTargetRef"]
        assert ref["parameter"] == "connection"
        assert ref["key"] in find(objs, "Secret", ref["name"])["data"]


def test_keda_query_runs_on_the_real_schema(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The backlog query KEDA runs, on a freshly migrated database of its own: its columns exist, its
    statuses are ours, and it counts queued and running jobs only."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from shared.migrate import upgrade
    from shared.models import Job, StoredImage, Tenant, utcnow
    from tests.support.jobs import IMAGE
    from tests.support.servers import port_open, require, temporary_database

    scaled = find(rendered["gpu"], "ScaledObject", "stylequeue-worker")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert set(re.findall(r"'(\w+)'", query)) == {JobStatus.QUEUED, JobStatus.RUNNING}
    require(port_open("127.0.0.1", 5432), "PostgreSQL is not reachable on 127.0.0.1:5432")
    with temporary_database("sq_keda") as url:
        upgrade(url)
        engine = create_engine(url)
        try:
            with Session(engine) as s:
                s.add_all(
                    [
                        Tenant(id="t1", name="t1"),
                        StoredImage(id=IMAGE, storage_key=f"images/{IMAGE}", **IMAGE_ROW),
                    ]
                )
                s.flush()
                for status in [*JobStatus, JobStatus.QUEUED, JobStatus.RUNNING]:
                    s.add(Job(tenant_id="t1", content_image_id=IMAGE, style_image_ids=[IMAGE], status=status))
                s.add(
                    Job(tenant_id="t1", content_image_id=IMAGE, status=JobStatus.QUEUED, deleted_at=utcnow())
                )
                s.commit()
                assert s.execute(text(query)).scalar() == 4  # 2 queued + 2 running, not the deleted one
        finally:
            engine.dispose()


def test_data_services_are_private(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["gpu"]
    policies = [o["spec"] for o in objs if o["kind"] == "NetworkPolicy"]
    assert any(
        p["podSelector"] == {} and p["policyTypes"] == ["Ingress"] and not p.get("ingress") for p in policies
    )
    for component, port in DATA.items():
        svc = find(objs, "Service", component)
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
        mine = [
            p
            for p in policies
            if p["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == component
        ]
        assert len(mine) == 1, component
        (rule,) = mine[0]["ingress"]
        assert rule["from"] and [p["port"] for p in rule["ports"]] == [port]
        # every pod the policy admits by label really carries the label (and no pod is missed)
        label = next(iter(rule["from"][0]["podSelector"]["matchLabels"].items()))
        admitted = [
            t["metadata"]["labels"] for _, t in pod_specs(objs) if label in t["metadata"]["labels"].items()
        ]
        assert admitted, f"no pod may reach {component}"
    for _, template in pod_specs(objs):
        assert template["spec"].get("automountServiceAccountToken") is False


def test_app_pods_run_as_non_root_with_read_only_roots(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for owner, template in pod_specs(rendered["gpu"]):
        if not template["spec"]["containers"][0]["image"].startswith("registry.example.com/stylequeue"):
            continue
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in template["spec"]["containers"]:
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] and ctx["allowPrivilegeEscalation"] is False, owner[
                "metadata"
            ]
            assert ctx["capabilities"]["drop"] == ["ALL"]


def test_minio_policy_is_the_compose_one(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cm = find(rendered["gpu"], "ConfigMap", "stylequeue-minio-policy")
    assert json.loads(cm["data"]["stylequeue-app-policy.json"]) == json.loads(POLICY.read_text())


def test_overlays_name_images_and_the_same_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    names = {o: sorted((d["kind"], d["metadata"]["name"]) for d in objs) for o, objs in rendered.items()}
    assert names["cpu"] == names["gpu"]
    images = {c["image"] for _, t in pod_specs(rendered["gpu"]) for c in t["spec"]["containers"]}
    assert not {i for i in images if i.startswith("stylequeue-")}, "the gpu overlay leaves a local image name"
    assert all(":" in image for image in images), images  # pinned tags
