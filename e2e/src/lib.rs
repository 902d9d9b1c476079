//! The harness of the cluster tests: a real control plane on loopback ([`control_plane`]),
//! a stand-in kubelet that runs the pods it creates as real processes ([`kubelet`]), a real
//! `helm install` of the chart into it ([`helm`]), and a stand-in prometheus-adapter serving the
//! custom metrics API from the chart's adapter rules ([`metrics_adapter`]).

pub mod control_plane;
pub mod helm;
pub mod http;
pub mod kubelet;
pub mod metrics_adapter;
pub mod objects;
pub mod wait;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::control_plane::ControlPlane;
use crate::kubelet::{Images, Kubelet};

/// What a scenario with the operator starts from: the control plane, a cluster-admin client
/// (the test's own), a namespace for the chart, one for the models, and the kubelet running
/// the pods of both.
pub struct Cluster {
    pub control_plane: &'static ControlPlane,
    pub admin: Client,
    pub system: String,
    pub models: String,
    pub kubelet: Kubelet,
}

impl Cluster {
    /// Starts (or joins) the test binary's control plane and a kubelet for two new namespaces.
    pub async fn start() -> anyhow::Result<Self> {
        let control_plane = control_plane::shared()?;
        let admin = control_plane.admin().await?;
        let system = control_plane.namespace(&admin, "sluice-system").await?;
        let models = control_plane.namespace(&admin, "models").await?;
        let kubelet = Kubelet::start(
            control_plane,
            admin.clone(),
            &[&system, &models],
            &demo_model()?,
            Images::workspace()?,
        )
        .await?;
        Ok(Self {
            control_plane,
            admin,
            system,
            models,
            kubelet,
        })
    }

    /// `helm install` of the chart's operator (one replica) into the system namespace.
    pub fn install_operator(&self) -> anyhow::Result<()> {
        self.install_operator_with(serde_json::json!({}))
    }

    /// [`Cluster::install_operator`] with more chart `values`.
    pub fn install_operator_with(&self, mut values: serde_json::Value) -> anyhow::Result<()> {
        values["replicaCount"] = 1.into();
        helm::install(
            &self.control_plane.kubeconfig(),
            "sluice",
            &self.system,
            &values,
        )
    }

    /// The IP of a Ready pod of the models' namespace matching the label `selector`, if one
    /// runs.
    pub async fn ready_pod_ip(&self, selector: &str) -> anyhow::Result<Option<Ipv4Addr>> {
        let pods = Api::<Pod>::namespaced(self.admin.clone(), &self.models)
            .list(&ListParams::default().labels(selector))
            .await?;
        for pod in pods {
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready && let Some(ip) = self.kubelet.pod_ip(&self.models, &pod.name_any()) {
                return Ok(Some(ip));
            }
        }
        Ok(None)
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the workspace")
        .to_owned()
}

/// The demo model every test pod serves (`SLUICE_TEST_MODEL`, which `make test` sets).
pub fn demo_model() -> anyhow::Result<PathBuf> {
    let path = std::env::var("SLUICE_TEST_MODEL").map_err(|_| {
        anyhow::anyhow!("SLUICE_TEST_MODEL (the demo model, set by `make test`) is unset")
    })?;
    Ok(path.into())
}

/// A workspace binary (`sluice-operator`, `sluice-sidecar`) beside the running test binary;
/// `cargo test --workspace` builds them.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("test binary {} has no target dir", exe.display()))?;
    let path = dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} not built: run `cargo build --bins` (or `cargo test --workspace`) first",
        path.display()
    );
    Ok(path)
}
