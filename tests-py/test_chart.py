"""The Helm chart, linted and rendered by Helm itself, every object checked against the
upstream Kubernetes schemas, plus what an operator of the cluster relies on: least-privilege
RBAC, a restricted pod, the flags the operator is started with, values that fail loudly."""

from __future__ import annotations

import json
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
GOLDEN = REPO / "operator" / "tests" / "golden"
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
        "sidecarPodMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "apiKeySecrets": [{"namespace": "team-a", "name": "api-keys"}],
        "gateway": {"enabled": True, "port": 80, "annotations": {"a": "b"}},
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
    assert all(k.startswith(("ServiceMonitor/", "PodMonitor/")) for k in skipped), skipped
    # Namespaced objects land in the release namespace, but for the Roles that let the operator
    # read API-key Secrets, which live beside those Secrets.
    key_namespaces = {e["namespace"] for e in (values or {}).get("apiKeySecrets", [])}
    for obj in rendered.objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            continue
        if obj["metadata"]["name"] == f"{OPERATOR}-api-keys":
            assert obj["metadata"]["namespace"] in key_namespaces, obj
            continue
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


def test_tracing_endpoint_reaches_the_operator_and_is_off_by_default(default_render):
    # The operator passes it on to every sidecar (operator/src/desired/tests.rs).
    env = operator_container(helm_render.render({"tracing": {"otlpEndpoint": "http://otel:4318"}}))["env"]
    assert {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel:4318"} in env
    assert not any(e["name"].startswith("OTEL_") for e in operator_container(default_render)["env"])


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
    ("apps", "deployments/scale"): ["get", "patch"],
    ("", "services"): CRUD,
    ("", "configmaps"): CRUD,
    ("", "serviceaccounts"): CRUD,
    ("autoscaling", "horizontalpodautoscalers"): CRUD,
    ("rbac.authorization.k8s.io", "roles"): CRUD,
    ("rbac.authorization.k8s.io", "rolebindings"): CRUD,
    # Create only: the forwarding Secret is created once, an existing one answers 409.
    ("", "secrets"): ["create"],
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


def test_no_secret_of_the_cluster_is_readable(default_render):
    # Reading Secrets: not through the ClusterRole (get, list or watch on secrets, or on every
    # resource), and no Role at all unless apiKeySecrets names some.
    for rule in default_render.one("ClusterRole", OPERATOR)["rules"]:
        if "secrets" in rule["resources"] or "*" in rule["resources"]:
            assert not {"get", "list", "watch", "*"} & set(rule["verbs"]), rule
    for role in default_render.of_kind("Role"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"], role["metadata"]["name"]


def pod_templates(component: str) -> list[dict]:
    """The pod templates of the golden Deployments of one component: `inference` (the model's
    pods) or `activator` (what holds requests for a model scaled to zero)."""
    return [o["spec"]["template"] for o in golden_renders() if o["kind"] == "Deployment"
            and o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            == component]


def golden_renders() -> list[dict]:
    """Every object `sluice-operator render` gives for the example models (the golden files
    operator/tests/render.rs keeps equal to it)."""
    return [doc for path in sorted(GOLDEN.glob("inferencemodel*.yaml"))
            for doc in helm_render.docs(path.read_text())]


def test_operator_holds_what_the_roles_it_creates_grant(default_render):
    # RBAC escalation check: the operator may only create a Role granting what it holds itself.
    # The per-model Roles it renders (the sidecars read their ConfigMap) need no Secret.
    grants = flatten(default_render.one("ClusterRole", OPERATOR)["rules"])
    roles = [o for o in golden_renders() if o["kind"] == "Role"]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert resource != "secrets", role["metadata"]["name"]
                    assert set(rule["verbs"]) <= set(grants[(group, resource)]), rule


def test_api_key_secrets_are_readable_by_name_only_where_listed():
    entries = [
        {"namespace": "team-a", "name": "api-keys"},
        {"namespace": "team-b", "name": "paid-keys"},
        {"namespace": "team-a", "name": "trial-keys"},
        {"namespace": "team-a", "name": "api-keys"},  # listed twice: granted once
    ]
    rendered = helm_render.render({"apiKeySecrets": entries}, namespace=NS)
    name = f"{OPERATOR}-api-keys"
    roles = {r["metadata"]["namespace"]: r for r in rendered.of_kind("Role")
             if r["metadata"]["name"] == name}
    assert sorted(roles) == ["team-a", "team-b"]
    assert roles["team-a"]["rules"] == [{
        "apiGroups": [""], "resources": ["secrets"],
        "resourceNames": ["api-keys", "trial-keys"], "verbs": ["get"]}]
    assert roles["team-b"]["rules"] == [{
        "apiGroups": [""], "resources": ["secrets"],
        "resourceNames": ["paid-keys"], "verbs": ["get"]}]
    bindings = {b["metadata"]["namespace"]: b for b in rendered.of_kind("RoleBinding")
                if b["metadata"]["name"] == name}
    assert sorted(bindings) == ["team-a", "team-b"]
    for ns, binding in bindings.items():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR,
                                        "namespace": NS}]
    for obj in [*roles.values(), *bindings.values()]:
        assert k8s_schema.validate(obj) == "validated"
    # Without rbac.create nothing is rendered for them either.
    rendered = helm_render.render({"apiKeySecrets": entries, "rbac": {"create": False}})
    assert not rendered.of_kind("Role") and not rendered.of_kind("RoleBinding")


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


# === autoscaling on the sidecars' metrics ===

ADAPTER_RULES = CHART / "prometheus-adapter-rules.yaml"


def metric_types() -> set[str]:
    """The autoscaling metric types an InferenceModel may name (the generated CRD's enum)."""
    crd = yaml.safe_load((CRD_DIR / "inferencemodels.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    metric = spec["properties"]["autoscaling"]["properties"]["metrics"]["items"]
    return set(metric["properties"]["type"]["enum"])


def rendered_models() -> list[dict]:
    """The InferenceModels whose render the golden files hold."""
    files = [*(REPO / "examples").glob("inferencemodel*.yaml"),
             *(REPO / "operator" / "tests" / "fixtures").glob("inferencemodel*.yaml")]
    return [d for f in files for d in helm_render.docs(f.read_text())]


def test_the_adapter_serves_every_per_pod_metric_an_autoscaler_can_name():
    # The goldens cover every metric type the CRD allows, so their HPAs name every per-pod
    # metric the operator renders (the names come from its output, not from here).
    used = {m["type"] for model in rendered_models()
            for m in model["spec"].get("autoscaling", {}).get("metrics", [])}
    assert used == metric_types(), "render a model with every autoscaling metric type"
    names = {m["pods"]["metric"]["name"] for hpa in golden_renders()
             if hpa["kind"] == "HorizontalPodAutoscaler"
             for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert len(names) == len(metric_types() - {"CPU"}), names

    values = yaml.safe_load(ADAPTER_RULES.read_text())
    assert values["rules"]["default"] is False, "the defaults would serve the same names twice"
    served = {}
    for rule in values["rules"]["custom"]:
        assert rule["name"]["as"] not in served, f"two rules serve {rule['name']['as']}"
        served[rule["name"]["as"]] = rule
    for name in names:
        rule = served.get(name)
        assert rule, f"{name} (an HPA's Pods metric) is not in {ADAPTER_RULES.name}"
        # The series as the sidecar exports it, per pod, mapped to the pods the HPA scales.
        assert rule["seriesQuery"] == f'{name}{{namespace!="",pod!=""}}', rule
        assert re.fullmatch(rule["name"]["matches"], name), rule
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        query = rule["metricsQuery"]
        for part in ("<<.Series>>", "<<.LabelMatchers>>", "by (<<.GroupBy>>)"):
            assert part in query, query
        assert "rate(" not in query, "the sidecar exports gauges, already per second"
    # The contract's names, as the operator renders them, appear in the sidecar's metrics doc.
    readme = (REPO / "README.md").read_text()
    for name in names:
        assert name in readme, f"{name} is not documented in README.md"


def test_sidecar_pod_monitor_is_optional_and_scrapes_the_admin_port(default_render):
    assert not default_render.of_kind("PodMonitor")
    rendered = helm_render.render({"sidecarPodMonitor": {"enabled": True, "interval": "10s",
                                                         "labels": {"release": "kps"}}})
    pm = rendered.one("PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kps"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["podMetricsEndpoints"] == [
        {"port": "admin", "path": "/metrics", "interval": "10s", "scrapeTimeout": "10s"}]
    # It selects the inference pods and the activators the operator renders, by their labels
    # and port name.
    selector = pm["spec"]["selector"]
    pods = pod_templates("inference") + pod_templates("activator")
    assert pod_templates("activator")
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert selector["matchLabels"].items() <= labels.items()
        for e in selector["matchExpressions"]:
            assert e["operator"] == "In" and labels.get(e["key"]) in e["values"], (e, labels)
        ports = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
        assert "admin" in ports


# === one endpoint for all models ===


def test_gateway_service_is_optional_and_selects_every_model_pod(default_render):
    assert not [s for s in default_render.of_kind("Service") if s["metadata"]["name"].endswith("-gateway")]
    assert "gateway" not in default_render.notes
    rendered = helm_render.render({"gateway": {"enabled": True}}, namespace=NS)
    svc = rendered.one("Service", "sluice-gateway")
    assert svc["metadata"]["namespace"] == NS
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    selector = svc["spec"]["selector"]
    # Every inference pod the operator renders, whatever its model, by labels and port name.
    pods = pod_templates("inference")
    models = {p["metadata"]["labels"]["sluice.dev/model"] for p in pods}
    assert len(models) > 1, models
    for pod in pods:
        assert selector.items() <= pod["metadata"]["labels"].items(), pod["metadata"]["labels"]
        ports = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
        assert "http" in ports
    # Not an activator: it holds requests for its own model only.
    activators = pod_templates("activator")
    assert activators
    for pod in activators:
        assert not selector.items() <= pod["metadata"]["labels"].items()
    # Not the operator's own pods.
    operator_pod = rendered.one("Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= operator_pod.items()
    assert f"http://sluice-gateway.{NS}.svc:8080/v1" in rendered.notes

    port = helm_render.render({"gateway": {"enabled": True, "port": 80}}, namespace=NS)
    assert port.one("Service", "sluice-gateway")["spec"]["ports"][0]["port"] == 80


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
    ({"apiKeySecrets": [{"namespace": "team-a"}]}, "at '/apiKeySecrets/0': missing property 'name'"),
    ({"apiKeySecrets": [{"namespace": "Team A", "name": "k"}]}, "at '/apiKeySecrets/0/namespace'"),
    ({"sidecarPodMonitor": {"enabled": True, "interval": "often"}},
     "at '/sidecarPodMonitor/interval'"),
    ({"gateway": {"enabled": "yes"}}, "at '/gateway/enabled': got string, want boolean"),
    ({"gateway": {"port": 0}}, "at '/gateway/port': minimum: got 0, want 1"),
    ({"tracing": {"otlpEndpoint": "otel:4318"}}, "at '/tracing/otlpEndpoint'"),
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


# === dashboards and alerts ===


def _promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables as Prometheus would get them."""
    return (expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
            .replace("$namespace", ".*").replace("$model", ".*"))


def test_dashboards_and_alerts_are_optional_and_their_promql_parses():
    import promql_parser

    default = helm_render.render({})
    assert not default.of_kind("PrometheusRule")
    assert not [c for c in default.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]

    rendered = helm_render.render({"sidecarPodMonitor": {"enabled": True},
                                   "grafanaDashboards": {"enabled": True},
                                   "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}})
    # The dashboard, where Grafana's sidecar finds it.
    cm = rendered.one("ConfigMap", "sluice-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["sluice-models.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Requests by status", "Error ratio (5xx)", "429s by rule", "Time to first token",
                   "Time per output token", "Tokens per second", "Queue and engine",
                   "Traffic by variant (canary state)", "Config convergence"):
        assert wanted in titles, wanted
    # The alerts, with the values' thresholds.
    rule = rendered.one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "> 0.05" in alerts["SluiceHighErrorRate"]["expr"]
    assert "> 10" in alerts["SluiceSlowFirstToken"]["expr"]
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("info", "warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    # Every query parses as PromQL (which metrics they name is checked against what the
    # binaries export: sidecar/tests/dashboards.rs, operator/src/metrics.rs).
    for expr in exprs + [a["expr"] for a in alerts.values()]:
        promql_parser.parse(_promql(expr))
    # The model label they group by is one the PodMonitor adds.
    pm = rendered.one("PodMonitor")
    assert "sluice.dev/model" in pm["spec"]["podTargetLabels"]
    assert all("sluice_dev_model" in e for e in exprs if "sluice_operator_" not in e
               and "activator" not in e)
