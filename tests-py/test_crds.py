"""The generated CRDs in crds/ (what `kubectl apply -f crds/` installs): valid manifests for the
upstream CustomResourceDefinition schema (kubernetes-validate --strict, the CLI a user would run),
structural as the API server requires, and documented for `kubectl explain`. The examples'
plain Kubernetes objects (the API-key Secret) are checked the same way.

The Rust side (crds/tests/) checks that the YAML is fresh and that the example custom resources
pass the schemas and CEL rules.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import k8s_schema
from helm_render import REPO

CRD_DIR = REPO / "crds"
EXAMPLES = REPO / "examples"
CRD_FILES = sorted(CRD_DIR.glob("*.yaml"))
CLI = Path(sys.executable).parent / "kubernetes-validate"
# The version the project targets, and the newest the pinned kubernetes-validate knows (its
# default): the CRDs must install on both.
VERSIONS = [k8s_schema.KUBE_VERSION, None]


def load(path: Path) -> dict:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return doc


def schema_of(path: Path) -> dict:
    (version,) = load(path)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def walk(node: dict, at: str = ""):
    """Yields (path, schema node) for every node of an openAPIV3Schema."""
    yield at, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{at}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{at}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{at}{{}}")


def test_crds_are_generated():
    assert [p.name for p in CRD_FILES] == ["inferencemodels.yaml", "ratelimitpolicies.yaml"], (
        "run `make crds`")


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v or "newest")
@pytest.mark.parametrize("crd", CRD_FILES, ids=lambda p: p.name)
def test_kubernetes_validate_strict_accepts_the_crd(crd: Path, version: str | None):
    args = [str(CLI), "--strict"] + (["-k", version] if version else []) + [str(crd)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # The CLI exits 0 on warnings (e.g. an unknown kind); only a pass counts.
    lines = output.splitlines()
    assert lines and all(line.startswith("INFO") and " passed " in line for line in lines), output


@pytest.mark.parametrize("crd", CRD_FILES, ids=lambda p: p.name)
def test_crd_validates_with_the_library_too(crd: Path):
    assert k8s_schema.validate(load(crd)) == "validated"


@pytest.mark.parametrize("crd", CRD_FILES, ids=lambda p: p.name)
def test_schema_is_structural(crd: Path):
    """The API server refuses a CRD whose schema is not structural: every node has a type
    (unless int-or-string or preserve-unknown-fields), and no node has both properties and
    additionalProperties."""
    problems = []
    for at, node in walk(schema_of(crd)):
        untyped_ok = node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields")
        if "type" not in node and not untyped_ok:
            problems.append(f"{at or '<root>'}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{at}: both properties and additionalProperties")
        for key in ("$ref", "definitions", "oneOf", "allOf"):
            if key in node and not node.get("x-kubernetes-int-or-string"):
                problems.append(f"{at}: {key} is not allowed in a structural schema")
    assert not problems, problems


@pytest.mark.parametrize("crd", CRD_FILES, ids=lambda p: p.name)
def test_every_field_is_documented_for_kubectl_explain(crd: Path):
    # Named fields only: list items and map values are explained by their field.
    undocumented = [at for at, node in walk(schema_of(crd))
                    if not at.endswith(("[]", "{}")) and not node.get("description")]
    assert not undocumented, f"add /// docs to the Rust fields: {undocumented}"


@pytest.mark.parametrize("crd", CRD_FILES, ids=lambda p: p.name)
def test_cel_rules_are_well_formed(crd: Path):
    """Every rule carries a one-line message a user can act on (the API server returns it as
    is), and every list a rule iterates is bounded (cost estimation)."""
    count = 0
    for at, node in walk(schema_of(crd)):
        for rule in node.get("x-kubernetes-validations", []):
            count += 1
            message = rule.get("message", "")
            assert message and "\n" not in message, f"{at}: {rule}"
            iterates = any(f in rule["rule"] for f in ("all(", "exists_one(", "map(", "sum()"))
            if iterates and node.get("type") == "array":
                assert "maxItems" in node, f"{at}: {rule['rule']} iterates an unbounded list"
    assert count > 0


def test_printer_columns_point_at_status_fields():
    for crd in CRD_FILES:
        (version,) = load(crd)["spec"]["versions"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        for column in version["additionalPrinterColumns"]:
            path = column["jsonPath"]
            if path.startswith(".status."):
                field = path.removeprefix(".status.").split(".")[0].split("[")[0]
                assert field in status, f"{crd.name}: column {column['name']} reads {path}"


def test_example_api_key_secret_is_a_valid_secret():
    secret = load(EXAMPLES / "api-keys-secret.yaml")
    assert k8s_schema.validate(secret) == "validated"
    keys = yaml.safe_load(secret["stringData"]["keys.yaml"])
    assert keys and all(set(entry) == {"key", "tenant"} for entry in keys)
    assert len({entry["key"] for entry in keys}) == len(keys), "API keys are unique"
