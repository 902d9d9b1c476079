//! One real control plane per test binary: `scripts/cluster.sh` (etcd, kube-apiserver with
//! RBAC, kube-controller-manager) on loopback, started on first use and stopped when the test
//! binary exits (the script watches its parent). Each test works in a namespace of its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// A running control plane.
pub struct ControlPlane {
    dir: PathBuf,
    /// Held so the script lives as long as the test binary; signalled to restart the API server.
    script: Mutex<Child>,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The test binary's control plane, started on first use (building the servers on a cold
/// cache takes minutes; starting them, seconds).
pub fn shared() -> anyhow::Result<&'static ControlPlane> {
    // As in the binaries: `cargo test --workspace` links both rustls providers into the test
    // binaries too, and rustls will not choose between them.
    let _ = rustls::crypto::ring::default_provider().install_default();
    SHARED
        .get_or_init(|| ControlPlane::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the control plane did not start: {e}"))
}

impl ControlPlane {
    fn start() -> anyhow::Result<Self> {
        // Outside the clone, which may itself lie under /tmp: pods get their own /tmp (an
        // emptyDir), and their kubeconfig and volumes must stay visible beside it.
        let home = std::env::var_os("HOME").context("HOME is unset")?;
        let runs = PathBuf::from(home).join(".cache/sluice/cluster-runs");
        // Earlier runs' logs stay for a look until their process is gone and a new run starts.
        for entry in std::fs::read_dir(&runs).into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !Path::new("/proc").join(&pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = runs.join(std::process::id().to_string());
        let script = crate::workspace().join("scripts/cluster.sh");
        let mut child = Command::new(&script)
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        // Cold: the Go build (tens of minutes on 2 cores); warm: a few seconds.
        let deadline = Instant::now() + Duration::from_secs(3600);
        while !dir.join("ready").exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited with {status} before the cluster was ready (its logs: {})",
                    script.display(),
                    dir.display()
                );
            }
            if Instant::now() > deadline {
                bail!("the cluster was not ready within an hour");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Self {
            dir,
            script: Mutex::new(child),
        })
    }

    /// Where the script keeps certificates, kubeconfigs and the servers' logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills kube-apiserver (SIGKILL: every connection and watch cut, nothing drained) and
    /// starts it again with the same command line, etcd keeping the data; returns once it is
    /// ready again. Only this test binary's clients notice: each binary has a control plane
    /// of its own.
    pub async fn restart_apiserver(&self) -> anyhow::Result<()> {
        let restarts = || {
            std::fs::read_to_string(self.dir.join("apiserver-restarts"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .unwrap_or(0)
        };
        let before = restarts();
        let script = self
            .script
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .id();
        // scripts/cluster.sh does the restart on SIGUSR1: it supervises the servers, and would
        // take the API server exiting under it for a crash of the whole cluster.
        let status = Command::new("kill")
            .args(["-USR1", &script.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -USR1 {script} failed: {status}");
        // A cold start of kube-apiserver takes seconds; this only bounds a hang.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while restarts() <= before {
            let exited = self
                .script
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .try_wait()?;
            if let Some(status) = exited {
                bail!(
                    "scripts/cluster.sh exited with {status} restarting kube-apiserver (its logs: {})",
                    self.dir.display()
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "kube-apiserver was not ready again within 3 minutes (see {})",
                    self.dir.join("kube-apiserver.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The cluster-admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// A client with cluster-admin rights (the test's own, never the operator's).
    pub async fn admin(&self) -> anyhow::Result<Client> {
        client_from(&self.kubeconfig()).await
    }

    /// A fresh namespace for one test.
    pub async fn namespace(&self, admin: &Client, prefix: &str) -> anyhow::Result<String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{n}");
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(name)
    }

    /// A kubeconfig that authenticates as ServiceAccount `ns/name` with a bound token from the
    /// TokenRequest API (what the kubelet projects into a pod), written under the cluster dir.
    pub async fn service_account_kubeconfig(
        &self,
        admin: &Client,
        ns: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(24 * 3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("a token for ServiceAccount {ns}/{name}"))?
            .status
            .context("TokenRequest answered without a token")?
            .token;
        let admin_config = std::fs::read_to_string(self.kubeconfig())?;
        let server = admin_config
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .context("no server in the admin kubeconfig")?;
        let ca = self.dir.join("pki/ca.crt");
        let path = self
            .dir
            .join(format!("sa-{ns}-{name}-{}.kubeconfig", rand_suffix()));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u, namespace: {ns}}}\ncurrent-context: c\n",
                ca = ca.display()
            ),
        )?;
        Ok(path)
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}
