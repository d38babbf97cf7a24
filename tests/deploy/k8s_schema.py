"""Validate rendered Kubernetes objects without a cluster.

Built-in kinds against the API schema as the official ``kubernetes`` client's models carry it (each
model's ``openapi_types`` and ``attribute_map``): every field must exist on its type (a misspelt or
misplaced key is an error, where ``kubectl apply`` would drop or refuse it), every value must have
its type, and the fields the API requires must be there (the models' constructors check those).
KEDA's two kinds against the fields of KEDA's CRDs (v2) that matter here, no unknown field allowed.
"""

from __future__ import annotations

import datetime
from typing import Any

import kubernetes.client as k8s

PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "date": (str, datetime.date),
    "datetime": (str, datetime.datetime),
}

#: KEDA ScaledObject / TriggerAuthentication (keda.sh/v1alpha1): the fields they define.
KEDA_FIELDS: dict[str, dict[str, set[str]]] = {
    "ScaledObject": {
        "spec": {
            "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
            "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers",
        },
        "scaleTargetRef": {"name", "kind", "apiVersion", "envSourceContainerName"},
        "trigger": {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"},
        "authenticationRef": {"name", "kind"},
    },
    "TriggerAuthentication": {
        "spec": {
            "secretTargetRef", "env", "configMapTargetRef", "podIdentity", "hashiCorpVault",
            "azureKeyVault", "awsSecretManager", "gcpSecretManager", "boundServiceAccountToken",
        },
        "secretTargetRef": {"parameter", "name", "key"},
    },
}  # fmt: skip
KEDA_INTS = ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount")


def model_for(obj: dict[str, Any]) -> Any:
    """The client's model class of an object: apps/v1 Deployment -> V1Deployment."""
    version = str(obj["apiVersion"]).rsplit("/", 1)[-1]
    name = version[0].upper() + version[1:] + obj["kind"]
    model = getattr(k8s, name, None)
    if model is None:
        raise AssertionError(f"{obj['apiVersion']} {obj['kind']}: no such kind in the Kubernetes API")
    return model


def check_type(value: Any, typ: str, path: str, errors: list[str]) -> None:
    if typ.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: a list expected, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            check_type(item, typ[5:-1], f"{path}[{i}]", errors)
    elif typ.startswith(("dict(", "dict[")):
        if not isinstance(value, dict):
            errors.append(f"{path}: a map expected, got {type(value).__name__}")
            return
        inner = typ[typ.index(",") + 1 : -1].strip()
        for key, item in value.items():
            check_type(item, inner, f"{path}.{key}", errors)
    elif typ == "object":
        return  # IntOrString, RawExtension: anything
    elif typ in PRIMITIVES:
        wanted = PRIMITIVES[typ]
        if not isinstance(value, wanted) or (typ == "int" and isinstance(value, bool)):
            errors.append(f"{path}: {typ} expected, got {value!r}")
    else:
        check_model(value, getattr(k8s, typ), path, errors)


def check_model(value: Any, model: Any, path: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{path}: an object ({model.__name__}) expected, got {value!r}")
        return
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    for key, item in value.items():
        if key not in by_key:
            errors.append(f"{path}.{key}: no such field in {model.__name__}")
        else:
            check_type(item, model.openapi_types[by_key[key]], f"{path}.{key}", errors)
    try:  # the setters refuse None for required fields
        model(**{by_key[k]: v for k, v in value.items() if k in by_key})
    except ValueError as exc:
        errors.append(f"{path}: {model.__name__}: {exc}")


def _only(value: Any, allowed: set[str], path: str, errors: list[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        errors.append(f"{path}: an object expected")
        return {}
    errors.extend(f"{path}.{key}: no such field" for key in value if key not in allowed)
    return value


def check_keda(obj: dict[str, Any], errors: list[str]) -> None:
    fields = KEDA_FIELDS.get(obj["kind"])
    if obj["apiVersion"] != "keda.sh/v1alpha1" or fields is None:
        errors.append(f"{obj['apiVersion']} {obj['kind']}: not a KEDA kind")
        return
    check_model(obj.get("metadata"), k8s.V1ObjectMeta, "metadata", errors)
    spec = _only(obj.get("spec"), fields["spec"], "spec", errors)
    if obj["kind"] == "ScaledObject":
        ref = _only(spec.get("scaleTargetRef"), fields["scaleTargetRef"], "spec.scaleTargetRef", errors)
        if "name" not in ref:
            errors.append("spec.scaleTargetRef.name is required")
        errors.extend(f"spec.{k}: int expected" for k in KEDA_INTS if not isinstance(spec.get(k, 0), int))
        triggers = spec.get("triggers")
        if not isinstance(triggers, list) or not triggers:
            errors.append("spec.triggers: at least one trigger is required")
            return
        for i, trigger in enumerate(triggers):
            trig = _only(trigger, fields["trigger"], f"spec.triggers[{i}]", errors)
            meta = trig.get("metadata") or {}
            if "type" not in trig or not all(isinstance(v, str) for v in meta.values()):
                errors.append(f"spec.triggers[{i}]: needs a type, and metadata values must be strings")
            if "authenticationRef" in trig:
                auth = trig["authenticationRef"]
                _only(auth, fields["authenticationRef"], f"spec.triggers[{i}].authenticationRef", errors)
    else:
        for i, ref in enumerate(spec.get("secretTargetRef") or []):
            got = _only(ref, fields["secretTargetRef"], f"spec.secretTargetRef[{i}]", errors)
            errors.extend(
                f"spec.secretTargetRef[{i}].{k} is required"
                for k in ("parameter", "name", "key")
                if k not in got
            )


def validate(obj: dict[str, Any]) -> list[str]:
    """What is wrong with one rendered object (empty: valid)."""
    errors: list[str] = []
    if str(obj.get("apiVersion", "")).startswith("keda.sh/"):
        check_keda(obj, errors)
    else:
        check_model(obj, model_for(obj), "", errors)
    return [f"{obj['kind']}/{obj.get('metadata', {}).get('name')}: {e}" for e in errors]
