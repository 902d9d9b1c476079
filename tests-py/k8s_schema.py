"""Validate objects against the upstream Kubernetes OpenAPI schemas (kubernetes-validate).

kubernetes-validate knows the built-in kinds only. For any other kind it raises
SchemaNotFoundError, which its CLI prints as a mere WARN and exits 0: a CRD kind would "pass"
unchecked. Here an unknown kind fails, unless it is named in NOT_VALIDATED with the reason.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate

# The Kubernetes version the project targets (k8s-openapi feature v1_33).
KUBE_VERSION = "1.33"

# Kinds from other projects' CRDs: no upstream schema exists to check them against.
NOT_VALIDATED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator CRD kind",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-operator CRD kind",
    ("argoproj.io/v1alpha1", "Application"): "Argo CD CRD kind",
}


def validate(obj: dict[str, Any]) -> str:
    """Strictly validate one object; returns "validated" or "skipped: <why>", raises otherwise."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in NOT_VALIDATED:
        return f"skipped: {NOT_VALIDATED[key]}"
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        raise AssertionError(
            f"{key[1]} ({key[0]}) has no upstream schema: add it to NOT_VALIDATED with a reason"
            f" or fix the apiVersion ({e.message})") from e
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        name = obj.get("metadata", {}).get("name")
        raise AssertionError(f"{key[1]}/{name} is invalid at {path or '<root>'}: {e.message}") from e
    return "validated"
