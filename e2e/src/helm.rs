//! The chart, installed for real: Helm's install action (helm-sdkpy, the library the chart
//! tests use, from the test virtualenv `SLUICE_TEST_PYTHON`) against the control plane.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, ensure};

/// `helm install RELEASE charts/sluice -n NAMESPACE --create-namespace` with `values`.
pub fn install(
    kubeconfig: &Path,
    release: &str,
    namespace: &str,
    values: &serde_json::Value,
) -> anyhow::Result<()> {
    let python = std::env::var("SLUICE_TEST_PYTHON").context(
        "SLUICE_TEST_PYTHON (the test virtualenv's python, set by `make test`) is unset",
    )?;
    let script = crate::workspace().join("e2e/scripts/helm-install.py");
    let out = Command::new(python)
        .arg(&script)
        .args([release, namespace, &values.to_string()])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .context("running helm-install.py")?;
    ensure!(
        out.status.success(),
        "helm install {release} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
