"""`helm install` of charts/sluice into the cluster KUBECONFIG points at (Helm's own install
action, through the helm-sdkpy library the chart tests use): CRDs from the chart's crds/ first,
then the templates, exactly as a user's `helm install` sends them.

    helm-install.py RELEASE NAMESPACE VALUES_JSON
"""

import asyncio
import json
import os
import sys
from pathlib import Path

import helm_sdkpy

CHART = Path(__file__).resolve().parents[2] / "charts" / "sluice"


def main() -> None:
    release, namespace, values = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=os.environ["KUBECONFIG"])
    asyncio.run(helm_sdkpy.Install(config).run(
        release, str(CHART), values=values, create_namespace=True, wait=False, timeout=120))


if __name__ == "__main__":
    main()
