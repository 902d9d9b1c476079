"""Argo CD health checks for the sluice kinds, run the way Argo CD runs them: each
resource_customizations fixture (health_test.yaml + testdata/) through the Lua script, in Lua 5.1
(the language level of gopher-lua, Argo CD's interpreter), with numbers as floats (JSON)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import pytest
import yaml

import k8s_schema
from helm_render import REPO

ARGOCD = REPO / "gitops" / "argocd"
KINDS = sorted(p.parent for p in ARGOCD.glob("*/*/health.lua"))


def as_json_numbers(value: Any) -> Any:
    """Argo CD hands the object to Lua via JSON: every number is a float64."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {k: as_json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json_numbers(v) for v in value]
    return value


def run_health(script: str, obj: dict[str, Any]) -> dict[str, Any]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True, register_eval=False)
    lua.globals().obj = lua.table_from(as_json_numbers(obj), recursive=True)
    hs = lua.execute(script)
    return {k: hs[k] for k in ("status", "message") if hs[k] is not None}


def cases() -> list[Any]:
    out = []
    for kind_dir in KINDS:
        spec = yaml.safe_load((kind_dir / "health_test.yaml").read_text())
        for test in spec["tests"]:
            out.append(pytest.param(kind_dir, test, id=f"{kind_dir.name}-{Path(test['inputPath']).stem}"))
    return out


def test_both_kinds_have_health_checks():
    assert [str(p.relative_to(ARGOCD)) for p in KINDS] == [
        "sluice.dev/InferenceModel", "sluice.dev/RateLimitPolicy"]


@pytest.mark.parametrize("kind_dir,test", cases())
def test_health_check(kind_dir: Path, test: dict[str, Any]):
    obj = yaml.safe_load((kind_dir / test["inputPath"]).read_text())
    assert obj["kind"] == kind_dir.name and obj["apiVersion"] == "sluice.dev/v1alpha1"
    hs = run_health((kind_dir / "health.lua").read_text(), obj)
    assert hs == test["healthStatus"]


@pytest.mark.parametrize("kind_dir", KINDS, ids=[p.name for p in KINDS])
def test_every_fixture_is_listed_and_every_status_covered(kind_dir: Path):
    spec = yaml.safe_load((kind_dir / "health_test.yaml").read_text())
    listed = {t["inputPath"] for t in spec["tests"]}
    on_disk = {str(p.relative_to(kind_dir)) for p in (kind_dir / "testdata").glob("*.yaml")}
    assert listed == on_disk
    assert {t["healthStatus"]["status"] for t in spec["tests"]} == {
        "Healthy", "Progressing", "Degraded"}


@pytest.mark.parametrize("kind_dir", KINDS, ids=[p.name for p in KINDS])
def test_fixtures_match_the_crd_status_schema(kind_dir: Path):
    """The fixtures must look like what the operator really writes."""
    import jsonschema

    crd_file = REPO / "crds" / {"InferenceModel": "inferencemodels.yaml",
                                "RateLimitPolicy": "ratelimitpolicies.yaml"}[kind_dir.name]
    if not crd_file.exists():
        pytest.skip(f"{crd_file.relative_to(REPO)} not generated yet (make crds)")
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    status_schema = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    for fixture in sorted((kind_dir / "testdata").glob("*.yaml")):
        status = yaml.safe_load(fixture.read_text()).get("status")
        if status is not None:
            errors = list(jsonschema.Draft7Validator(status_schema).iter_errors(status))
            assert not errors, f"{fixture.name}: {[e.message for e in errors]}"


def _generator():
    spec = importlib.util.spec_from_file_location("gen", ARGOCD / "generate-cm-patch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_argocd_cm_patch_is_generated_from_the_lua_files():
    patch_file = ARGOCD / "argocd-cm-patch.yaml"
    assert patch_file.read_text() == _generator().render(), (
        "gitops/argocd/argocd-cm-patch.yaml is stale: run `make argocd-cm-patch`")
    patch = yaml.safe_load(patch_file.read_text())
    assert (patch["kind"], patch["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    assert k8s_schema.validate(patch) == "validated"
    assert patch["data"] == {
        f"resource.customizations.health.sluice.dev_{d.name}": (d / "health.lua").read_text()
        for d in KINDS}


def test_example_application_syncs_models_with_server_side_apply():
    app = yaml.safe_load((REPO / "examples" / "argocd-application.yaml").read_text())
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert k8s_schema.validate(app).startswith("skipped")  # a CRD kind: no upstream schema
    spec = app["spec"]
    assert "ServerSideApply=true" in spec["syncPolicy"]["syncOptions"]
    assert spec["source"]["repoURL"] and spec["source"]["path"]
    assert spec["destination"]["namespace"] and spec["destination"]["server"]
    assert spec["project"]
