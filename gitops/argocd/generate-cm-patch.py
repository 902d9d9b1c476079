#!/usr/bin/env python3
"""Writes argocd-cm-patch.yaml from the health.lua files beside it (`make argocd-cm-patch`).

Each <group>/<Kind>/health.lua becomes the argocd-cm key
`resource.customizations.health.<group>_<Kind>`. tests-py/test_argocd.py fails when the
committed patch differs from what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "argocd-cm-patch.yaml"

HEADER = """\
# Generated from gitops/argocd/sluice.dev/*/health.lua by `make argocd-cm-patch`. Do not edit.
# Teaches Argo CD when an InferenceModel or RateLimitPolicy is Healthy, Progressing or Degraded.
# Install (merges into the existing argocd-cm):
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file gitops/argocd/argocd-cm-patch.yaml
"""


def health_scripts() -> dict[str, str]:
    """argocd-cm key -> Lua source, sorted by key."""
    scripts = {}
    for lua in sorted(HERE.glob("*/*/health.lua")):
        kind = lua.parent.name
        group = lua.parent.parent.name
        scripts[f"resource.customizations.health.{group}_{kind}"] = lua.read_text()
    return scripts


def render() -> str:
    lines = [HEADER.rstrip("\n"),
             "apiVersion: v1",
             "kind: ConfigMap",
             "metadata:",
             "  name: argocd-cm",
             "  namespace: argocd",
             "  labels:",
             "    app.kubernetes.io/name: argocd-cm",
             "    app.kubernetes.io/part-of: argocd",
             "data:"]
    for key, source in health_scripts().items():
        lines.append(f"  {key}: |")
        for line in source.rstrip("\n").split("\n"):
            lines.append(f"    {line}" if line else "")
    return "\n".join(lines) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run `make argocd-cm-patch`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
