"""Render the chart with Helm itself (the helm-sdkpy shared library), offline.

helm-sdkpy exposes Helm's install action but no `helm template`. So each render runs a real
`helm install` against a tiny in-process fake API server on 127.0.0.1: it answers discovery for
the kinds the chart uses, says every object is absent, stores what Helm creates, and marks CRDs
Established. What Helm POSTs is exactly what it would send to a real cluster: CRDs from `crds/`
first, then the rendered templates. values.schema.json is enforced by Helm on the way, so a bad
value surfaces as `helm_sdkpy.InstallError` with Helm's own message.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_sdkpy
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "sluice"
KUBE_MINOR = "33"

_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
# groupVersion -> [(resource, kind, namespaced)]
_DISCOVERY: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("pods", "Pod", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("deployments", "Deployment", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    "coordination.k8s.io/v1": [("leases", "Lease", True)],
    "rbac.authorization.k8s.io/v1": [
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
    ],
    "apiextensions.k8s.io/v1": [("customresourcedefinitions", "CustomResourceDefinition", False)],
    # Present as if prometheus-operator were installed, so serviceMonitor.enabled,
    # sidecarPodMonitor.enabled and prometheusRule.enabled can render.
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True),
                                 ("podmonitors", "PodMonitor", True),
                                 ("prometheusrules", "PrometheusRule", True)],
    "sluice.dev/v1alpha1": [
        ("inferencemodels", "InferenceModel", True),
        ("ratelimitpolicies", "RateLimitPolicy", True),
    ],
}
_PROTOBUF = "application/vnd.kubernetes.protobuf"


@dataclass
class Rendered:
    """What one install produced."""

    objects: list[dict[str, Any]] = field(default_factory=list)  # in the order Helm created them
    manifest: str = ""  # the rendered templates, as Helm records them in the release
    notes: str = ""
    release: dict[str, Any] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]


class _FakeApiServer:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.store: dict[str, dict[str, Any]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _read(self) -> tuple[bytes, bool]:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                return raw, self.headers.get("Content-Type", "").startswith(_PROTOBUF)

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                path = url.path
                if path == "/version":
                    return self._send(200, {"major": "1", "minor": KUBE_MINOR,
                                            "gitVersion": f"v1.{KUBE_MINOR}.0"})
                if path == "/api":
                    return self._send(200, {"kind": "APIVersions", "versions": ["v1"]})
                if path == "/apis":
                    groups = []
                    for gv in _DISCOVERY:
                        if "/" in gv:
                            g, v = gv.split("/")
                            ver = {"groupVersion": gv, "version": v}
                            groups.append({"name": g, "versions": [ver], "preferredVersion": ver})
                    return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                            "groups": groups})
                gv = "v1" if path == "/api/v1" else path.removeprefix("/apis/")
                if gv in _DISCOVERY:
                    return self._send(200, {
                        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                        "resources": [{"name": r, "singularName": "", "namespaced": ns,
                                       "kind": k, "verbs": _VERBS}
                                      for r, k, ns in _DISCOVERY[gv]]})
                if path in server.store:
                    return self._send(200, server.store[path])
                if url.query:  # a list (Helm's release history lookup)
                    items = [o for p, o in server.store.items() if p.startswith(path + "/")]
                    return self._send(200, {"kind": "List", "apiVersion": "v1",
                                            "metadata": {"resourceVersion": "1"}, "items": items})
                return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404})

            def do_POST(self) -> None:  # noqa: N802
                raw, proto = self._read()
                path = urllib.parse.urlparse(self.path).path
                if proto:  # Helm's release record (a Secret, sent as protobuf): not ours to check
                    return self._send(201, {"kind": "Secret", "apiVersion": "v1", "metadata": {
                        "name": "release", "resourceVersion": "1"}})
                obj = json.loads(raw)
                server.created.append(copy.deepcopy(obj))
                meta = obj.setdefault("metadata", {})
                meta.update(uid="00000000-0000-0000-0000-000000000000", resourceVersion="1",
                            creationTimestamp="2025-01-01T00:00:00Z")
                if obj.get("kind") == "CustomResourceDefinition":
                    obj["status"] = {
                        "conditions": [{"type": "Established", "status": "True"},
                                       {"type": "NamesAccepted", "status": "True"}],
                        "acceptedNames": obj["spec"]["names"]}
                server.store[f"{path}/{meta['name']}"] = obj
                return self._send(201, obj)

            def do_PUT(self) -> None:  # noqa: N802
                raw, proto = self._read()
                if proto:
                    return self._send(200, {"kind": "Secret", "apiVersion": "v1", "metadata": {
                        "name": "release", "resourceVersion": "2"}})
                obj = json.loads(raw)
                server.store[urllib.parse.urlparse(self.path).path] = obj
                return self._send(200, obj)

            do_PATCH = do_PUT  # noqa: N815

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, namespace: str) -> str:
        server = f"http://127.0.0.1:{self.httpd.server_port}"
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": server}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": namespace}}],
        })


def render(values: dict[str, Any] | None = None, *, release: str = "sluice",
           namespace: str = "sluice-system", chart: Path = CHART) -> Rendered:
    """`helm install` the chart into a fake cluster; return what Helm created."""
    with _FakeApiServer() as api:
        config = helm_sdkpy.Configuration(namespace=namespace,
                                          kubeconfig=api.kubeconfig(namespace))
        result = asyncio.run(helm_sdkpy.Install(config).run(
            release, str(chart), values=values, wait=False, timeout=30))
        return Rendered(objects=api.created, manifest=result.get("manifest", ""),
                        notes=(result.get("info") or {}).get("notes", ""), release=result)


def lint(chart: Path = CHART) -> dict[str, Any]:
    """Helm's own `helm lint` on the chart; offline."""
    config = helm_sdkpy.Configuration(namespace="default", kubeconfig="/dev/null")
    return asyncio.run(helm_sdkpy.Lint(config).run(str(chart)))


def docs(text: str) -> list[dict[str, Any]]:
    """Non-empty YAML documents of a multi-document string."""
    return [d for d in yaml.safe_load_all(text) if d]

