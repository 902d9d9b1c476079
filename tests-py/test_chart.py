"""The Helm chart, linted and rendered by Helm itself, every object checked against the
upstream Kubernetes schemas, plus what an operator of the cluster relies on: least-privilege
RBAC, a restricted pod, the flags the operator is started with, values that fail loudly."""

from __future__ import annotations

import re
from pathlib import Path

import helm_sdkpy
import pytest
import yaml

import helm_render
import k8s_schema
from helm_render import CHART, REPO

CRD_DIR = REPO / "crds"
CHART_CRD_DIR = CHART / "crds"
NS = "sluice-system"
OPERATOR = "sluice-operator"

# Helm lint severities (helm.sh/helm/v4/pkg/lint/support): 1 info, 2 warning, 3 error.
LINT_WARNING = 2


def workspace_version() -> str:
    text = (REPO / "Cargo.toml").read_text()
    section = text.split("[workspace.package]", 1)[1]
    return re.search(r'^version\s*=\s*"([^"]+)"', section, re.M).group(1)


def generated_crds() -> list[Path]:
    return sorted(CRD_DIR.glob("*.yaml"))


def operator_container(rendered: helm_render.Rendered) -> dict:
    deploy = rendered.one("Deployment", OPERATOR)
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


# === lint and schema validation ===


def test_helm_lint_reports_no_warnings_or_errors():
    result = helm_render.lint()
    assert result["TotalChartsLinted"] == 1
    bad = [m for m in result["Messages"] if m["Severity"] >= LINT_WARNING]
    # helm-sdkpy drops the message text (Go errors marshal as {}); the path says where to look.
    assert not bad, f"helm lint warnings/errors in: {[m['Path'] for m in bad]}"
    assert not result["Errors"]


VALUE_SETS = {
    "defaults": None,
    "everything-on": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "extraArgs": ["--canary-interval=30s"],
        "extraEnv": [{"name": "SLUICE_EXTRA", "value": "1"}],
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"a": "b"},
        "podLabels": {"team": "ml"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "x", "operator": "Exists", "effect": "NoSchedule"}],
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:x"}},
        "metrics": {"port": 9090, "service": {"annotations": {"x": "y"}}},
    },
    "minimal": {
        "replicaCount": 1,
        "leaderElection": {"enabled": False},
        "serviceAccount": {"create": False, "name": "existing"},
        "rbac": {"create": False},
    },
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_is_valid_kubernetes(values):
    rendered = helm_render.render(values, namespace=NS)
    assert rendered.objects
    outcomes = {}
    for obj in rendered.objects:
        outcomes[f"{obj['kind']}/{obj['metadata']['name']}"] = k8s_schema.validate(obj)
    # Only what k8s_schema names explicitly may go unchecked.
    skipped = {k for k, v in outcomes.items() if v.startswith("skipped")}
    assert all(k.startswith("ServiceMonitor/") for k in skipped), skipped
    # Namespaced objects land in the release namespace.
    for obj in rendered.objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert obj["metadata"].get("namespace") == NS, obj["kind"]


def test_defaults_render_the_expected_objects(default_render):
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in default_render.objects
                   if o["kind"] != "CustomResourceDefinition")
    assert kinds == sorted([
        "ClusterRole/sluice-operator",
        "ClusterRoleBinding/sluice-operator",
        "Deployment/sluice-operator",
        "PodDisruptionBudget/sluice-operator",
        "Role/sluice-operator-leader-election",
        "RoleBinding/sluice-operator-leader-election",
        "Service/sluice-operator-metrics",
        "ServiceAccount/sluice-operator",
    ])


# === CRDs ===


def test_chart_crds_match_generated_crds():
    generated = generated_crds()
    if not generated:
        pytest.skip("crds/*.yaml not generated yet (make crds)")
    in_chart = sorted(CHART_CRD_DIR.glob("*.yaml"))
    assert [p.name for p in in_chart] == [p.name for p in generated], (
        "charts/sluice/crds/ differs from crds/: run `make chart-crds`")
    for src, dst in zip(generated, in_chart):
        assert dst.read_text() == src.read_text(), (
            f"charts/sluice/crds/{dst.name} is stale: run `make chart-crds`")


def test_crds_are_installed_first_and_valid(default_render):
    expected = {p.name for p in CHART_CRD_DIR.glob("*.yaml")}
    if not expected:
        pytest.skip("no CRDs in charts/sluice/crds yet (make crds)")
    crds = default_render.of_kind("CustomResourceDefinition")
    n = len(crds)
    assert [o["kind"] for o in default_render.objects[:n]] == ["CustomResourceDefinition"] * n
    by_name = {c["metadata"]["name"]: c for c in crds}
    assert set(by_name) == {"inferencemodels.sluice.dev", "ratelimitpolicies.sluice.dev"}
    im = by_name["inferencemodels.sluice.dev"]["spec"]
    rlp = by_name["ratelimitpolicies.sluice.dev"]["spec"]
    assert (im["names"]["kind"], im["names"].get("shortNames")) == ("InferenceModel", ["im"])
    assert (rlp["names"]["kind"], rlp["names"].get("shortNames")) == ("RateLimitPolicy", ["rlp"])
    for spec in (im, rlp):
        assert spec["group"] == "sluice.dev" and spec["scope"] == "Namespaced"
        assert [v["name"] for v in spec["versions"]] == ["v1alpha1"]
        assert spec["versions"][0].get("subresources", {}).get("status") == {}
    for crd in crds:
        assert k8s_schema.validate(crd) == "validated"


# === operator Deployment ===


def test_operator_runs_two_replicas_with_leader_election(default_render):
    deploy = default_render.one("Deployment", OPERATOR)
    assert deploy["spec"]["replicas"] == 2
    args = operator_container(default_render)["args"]
    assert args[0] == "run"
    assert "--leader-election" in args
    # Replicas spread over nodes unless the user says otherwise.
    affinity = deploy["spec"]["template"]["spec"]["affinity"]
    assert "podAntiAffinity" in affinity
    assert default_render.one("PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_operator_args_carry_the_sidecar_images():
    rendered = helm_render.render({
        "image": {"repository": "registry.example/sluice/operator", "tag": "1.2.3"},
        "sidecar": {
            "image": {"repository": "registry.example/sluice/sidecar", "tag": "1.2.3"},
            "cudaImage": {"repository": "registry.example:5000/sluice/sidecar-cuda",
                          "tag": "1.2.3-cuda12"},
        },
        "extraArgs": ["--canary-interval=30s"],
    })
    container = operator_container(rendered)
    assert container["image"] == "registry.example/sluice/operator:1.2.3"
    assert container["args"] == [
        "run",
        "--sidecar-image=registry.example/sluice/sidecar:1.2.3",
        "--sidecar-cuda-image=registry.example:5000/sluice/sidecar-cuda:1.2.3-cuda12",
        "--reconcile-concurrency=16",
        "--leader-election",
        "--canary-interval=30s",
    ]


def test_reconcile_concurrency_is_passed_on():
    rendered = helm_render.render({"reconcileConcurrency": 4})
    assert "--reconcile-concurrency=4" in operator_container(rendered)["args"]


def test_default_images_follow_the_chart_version(default_render):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == workspace_version()
    args = operator_container(default_render)["args"]
    v = chart["appVersion"]
    assert operator_container(default_render)["image"] == f"ghcr.io/sluice-dev/sluice-operator:{v}"
    assert f"--sidecar-image=ghcr.io/sluice-dev/sluice-sidecar:{v}" in args
    assert f"--sidecar-cuda-image=ghcr.io/sluice-dev/sluice-sidecar-cuda:{v}" in args


def test_operator_pod_meets_the_restricted_pod_security_standard(default_render):
    pod = default_render.one("Deployment", OPERATOR)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = operator_container(default_render)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_operator_probes_and_resources(default_render):
    c = operator_container(default_render)
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["RUST_LOG"]["value"] == "info"


def test_leader_election_can_be_turned_off():
    rendered = helm_render.render({"replicaCount": 1, "leaderElection": {"enabled": False}})
    assert "--leader-election" not in operator_container(rendered)["args"]
    assert not rendered.of_kind("Role") and not rendered.of_kind("RoleBinding")
    assert not rendered.of_kind("PodDisruptionBudget")  # one replica: nothing to keep


# === RBAC ===

CRUD = ["get", "list", "watch", "create", "patch", "update", "delete"]
EXPECTED_CLUSTER_RULES = {
    ("sluice.dev", "inferencemodels"): ["get", "list", "watch", "patch"],
    ("sluice.dev", "ratelimitpolicies"): ["get", "list", "watch", "patch"],
    ("sluice.dev", "inferencemodels/status"): ["get", "patch", "update"],
    ("sluice.dev", "ratelimitpolicies/status"): ["get", "patch", "update"],
    ("apps", "deployments"): CRUD,
    ("", "services"): CRUD,
    ("", "configmaps"): CRUD,
    ("", "serviceaccounts"): CRUD,
    ("autoscaling", "horizontalpodautoscalers"): CRUD,
    ("rbac.authorization.k8s.io", "roles"): CRUD,
    ("rbac.authorization.k8s.io", "rolebindings"): CRUD,
    ("", "secrets"): ["get", "list", "watch", "create", "patch"],
    ("", "pods"): ["get", "list", "watch"],
    ("events.k8s.io", "events"): ["create", "patch"],
}


def flatten(rules: list[dict]) -> dict[tuple[str, str], list[str]]:
    grants: dict[tuple[str, str], list[str]] = {}
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), []).extend(rule["verbs"])
    return grants


def test_cluster_role_is_exactly_least_privilege(default_render):
    rules = default_render.one("ClusterRole", OPERATOR)["rules"]
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
    grants = flatten(rules)
    assert {k: sorted(v) for k, v in grants.items()} == {
        k: sorted(v) for k, v in EXPECTED_CLUSTER_RULES.items()}
    # Never: deleting secrets, writing pods, escalate/bind/impersonate, cluster-scoped writes.
    assert "delete" not in grants[("", "secrets")]
    assert not {"escalate", "bind", "impersonate"} & {v for vs in grants.values() for v in vs}
    assert ("rbac.authorization.k8s.io", "clusterroles") not in grants


def test_operator_holds_what_the_roles_it_creates_grant(default_render):
    # RBAC escalation check: the operator may only create a Role granting what it holds itself.
    # The per-model Role lets the sidecar read its ConfigMap (and the forwarding Secret).
    grants = flatten(default_render.one("ClusterRole", OPERATOR)["rules"])
    for resource in ("configmaps", "secrets"):
        assert {"get", "list", "watch"} <= set(grants[("", resource)])


def test_leases_only_in_the_release_namespace(default_render):
    role = default_render.one("Role")
    assert role["metadata"]["namespace"] == NS
    assert flatten(role["rules"]) == {
        ("coordination.k8s.io", "leases"): ["get", "create", "update", "patch"]}
    binding = default_render.one("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    cluster_binding = default_render.one("ClusterRoleBinding")
    for b in (binding, cluster_binding):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NS}]
    deploy = default_render.one("Deployment", OPERATOR)
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == OPERATOR


# === metrics ===


def test_metrics_service_selects_the_operator_pods(default_render):
    svc = default_render.one("Service", f"{OPERATOR}-metrics")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = default_render.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert not default_render.of_kind("ServiceMonitor")


def test_service_monitor_is_optional():
    rendered = helm_render.render({"serviceMonitor": {"enabled": True, "interval": "15s",
                                                      "labels": {"release": "kps"}}})
    sm = rendered.one("ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]
    svc = rendered.one("Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


# === values.schema.json ===

BAD_VALUES = [
    ({"replicaCount": 0}, "at '/replicaCount': minimum: got 0, want 1"),
    ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
    ({"image": {"tag": ""}}, "at '/image/tag': minLength: got 0, want 1"),
    ({"image": {"repository": None}}, "at '/image': missing property 'repository'"),
    ({"sidecar": {"image": {"tag": None}}}, "at '/sidecar/image': missing property 'tag'"),
    ({"sidecar": {"cudaImage": {"repository": "ghcr.io/x/y:1.0"}}}, "at '/sidecar/cudaImage/repository'"),
    ({"image": {"pullPolicy": "Sometimes"}},
     "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
    ({"serviceMonitor": {"enabled": "yes"}}, "at '/serviceMonitor/enabled': got string, want boolean"),
    ({"serviceMonitor": {"interval": "often"}}, "at '/serviceMonitor/interval'"),
    ({"leaderElection": {"enabled": 1}}, "at '/leaderElection/enabled': got number, want boolean"),
    ({"metrics": {"port": 70000}}, "at '/metrics/port': maximum"),
    ({"reconcileConcurrency": -1}, "at '/reconcileConcurrency': minimum: got -1, want 0"),
    ({"reconcileConcurrency": 70000}, "at '/reconcileConcurrency': maximum"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
    ({"sidecar": {"imag": {}}}, "additional properties 'imag' not allowed"),
]


@pytest.mark.parametrize("values,message", BAD_VALUES, ids=[m for _, m in BAD_VALUES])
def test_schema_rejects_wrong_values_with_a_clear_message(values, message):
    with pytest.raises(helm_sdkpy.InstallError) as err:
        helm_render.render(values)
    assert "values don't meet the specifications of the schema" in str(err.value)
    assert message in str(err.value)


def test_schema_is_draft_07():
    import json
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


# === NOTES.txt ===


def test_notes_tell_the_next_step(default_render):
    notes = default_render.notes
    assert "kubectl apply" in notes
    assert "http://<model>.<namespace>.svc:8080/v1" in notes
    assert f"kubectl -n {NS} rollout status deployment/{OPERATOR}" in notes
