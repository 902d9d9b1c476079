//! A stand-in kubelet: the control plane has no scheduler and no kubelet, so this binds the
//! pods the controllers create in some namespaces to a node of its own and runs them as real
//! processes, each in a network namespace of its own on the cluster's pod bridge
//! (`scripts/cluster.sh`): the workspace binary the image names, with the container's args and
//! env, its ConfigMap, Secret and emptyDir volumes as directories, readiness from its HTTP
//! readiness probe, and graceful deletion (preStop sleep, SIGTERM, the grace period, SIGKILL).
//! Service names resolve through each pod's `/etc/hosts` (`ip netns exec` mounts
//! `/etc/netns/<ns>/hosts` there) to a ready pod the Service selects.
//!
//! Volumes are directories of the harness bind-mounted at their mount paths (read-only where
//! the pod says so) in the pod's own mount namespace, so args, env and config documents name
//! the paths they would in a cluster; the host only gains the empty mount-point directories.
//!
//! Where it differs from a kubelet, on purpose: there is no container root filesystem (the
//! host's, with the volumes mounted over it); init containers are not run (the model an init
//! container would download over the closed network is linked into its `--out` path from the
//! local file); the pod's service-account token is handed over as a `KUBECONFIG` (a bound token
//! from the TokenRequest API) instead of the projected files of in-cluster config; a container
//! that exits is not restarted, unless a test asks for it in its namespace
//! ([`Kubelet::restart_exited_containers`]); readiness is probed every 300 ms, not every
//! `periodSeconds`; one container a pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::control_plane::ControlPlane;

/// What the kubelet runs for an image: the first entry whose repository name the image
/// contains (`sluice-operator` -> the operator binary).
pub struct Images(pub Vec<(String, PathBuf)>);

impl Images {
    /// The workspace's own binaries for the project's images (the CUDA sidecar image too:
    /// there is no GPU here).
    pub fn workspace() -> anyhow::Result<Self> {
        Ok(Self(vec![
            ("sluice-operator".into(), crate::binary("sluice-operator")?),
            ("sluice-sidecar".into(), crate::binary("sluice-sidecar")?),
            (
                "sluice-sidecar-cuda".into(),
                crate::binary("sluice-sidecar")?,
            ),
        ]))
    }

    fn binary(&self, image: &str) -> anyhow::Result<&Path> {
        let repository = image.rsplit_once(':').map_or(image, |(r, _)| r);
        self.0
            .iter()
            .find(|(name, _)| repository.ends_with(name.as_str()))
            .map(|(_, path)| path.as_path())
            .with_context(|| format!("no binary stands in for image {image}"))
    }
}

/// How a pod's container ended after its deletion.
#[derive(Clone, Debug)]
pub struct Termination {
    /// The exit code, or `None` when a signal (SIGKILL after the grace period) ended it.
    pub exit_code: Option<i32>,
    /// Whether it exited within the grace period (else it was SIGKILLed).
    pub within_grace: bool,
}

/// One pod the kubelet runs.
struct Running {
    namespace: String,
    labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
    netns: String,
    child: Child,
    probe: Option<(u16, String)>,
    ready: bool,
    exited: Option<std::process::ExitStatus>,
    /// (ready, exited) as last written to the pod's status.
    written: Option<(bool, bool)>,
    started: String,
    terminating: bool,
    /// The kubelet has stopped noticing changes to this pod (see [`Kubelet::hold`]).
    held: bool,
    /// How many times its container was started again after it exited.
    restarts: u32,
}

struct Inner {
    client: Client,
    namespaces: Vec<String>,
    node: String,
    bridge: String,
    prefix: String,
    dir: PathBuf,
    model: PathBuf,
    images: Images,
    control_plane: &'static ControlPlane,
    pods: Mutex<BTreeMap<(String, String), Running>>,
    terminations: Mutex<BTreeMap<(String, String), Termination>>,
    hosts: Mutex<String>,
    /// Namespaces whose exited containers are started again.
    restarting: Mutex<BTreeSet<String>>,
}

/// The running stand-in kubelet; stops its pods when dropped.
pub struct Kubelet {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

static NEXT_POD: AtomicU32 = AtomicU32::new(0);

impl Kubelet {
    /// Starts running the pods of `namespaces` (with `admin`, the test's cluster-admin client),
    /// on the demo `model`.
    pub async fn start(
        control_plane: &'static ControlPlane,
        admin: Client,
        namespaces: &[&str],
        model: &Path,
        images: Images,
    ) -> anyhow::Result<Self> {
        let network = std::fs::read_to_string(control_plane.dir().join("network"))?;
        let (bridge, prefix) = network.split_once(' ').context("malformed network file")?;
        let node = format!("harness-{}", namespaces[0]);
        let nodes: Api<Node> = Api::all(admin.clone());
        let object = Node {
            metadata: ObjectMeta {
                name: Some(node.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        nodes.create(&PostParams::default(), &object).await?;
        let dir = control_plane.dir().join("kubelet").join(&node);
        std::fs::create_dir_all(&dir)?;
        // The model beside the pods' volumes, not wherever the clone is (under /tmp, say, which
        // each pod's own /tmp would hide): a hard link where it can be, else a copy.
        let staged = dir.join("model.gguf");
        if std::fs::hard_link(model, &staged).is_err() {
            std::fs::copy(model, &staged).context("staging the model")?;
        }
        let inner = Arc::new(Inner {
            client: admin,
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            node,
            bridge: bridge.trim().to_owned(),
            prefix: prefix.trim().to_owned(),
            dir,
            model: staged,
            images,
            control_plane,
            pods: Mutex::default(),
            terminations: Mutex::default(),
            hosts: Mutex::default(),
            restarting: Mutex::default(),
        });
        let task = tokio::spawn({
            let inner = inner.clone();
            async move {
                loop {
                    if let Err(e) = inner.sync().await {
                        eprintln!("kubelet: {e:#}");
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        });
        Ok(Self { inner, task })
    }

    /// This host's address on the pod bridge (every pod's gateway): a server listening there
    /// is reachable from the pods.
    pub fn host_ip(&self) -> anyhow::Result<Ipv4Addr> {
        Ok(format!("{}.0.1", self.inner.prefix).parse()?)
    }

    /// The IP of a running pod.
    pub fn pod_ip(&self, namespace: &str, pod: &str) -> Option<Ipv4Addr> {
        let pods = lock(&self.inner.pods);
        pods.get(&(namespace.to_owned(), pod.to_owned()))
            .map(|p| p.ip)
    }

    /// The pods running here, as (namespace, name).
    pub fn pods(&self) -> Vec<(String, String)> {
        lock(&self.inner.pods).keys().cloned().collect()
    }

    /// Sends `signal` (e.g. `KILL`, `STOP`) to a pod's process: the faults tests inject.
    pub fn signal(&self, namespace: &str, pod: &str, signal: &str) -> anyhow::Result<()> {
        let pods = lock(&self.inner.pods);
        let running = pods
            .get(&(namespace.to_owned(), pod.to_owned()))
            .with_context(|| format!("pod {namespace}/{pod} is not running here"))?;
        kill(running.child.id(), signal);
        Ok(())
    }

    /// Stops noticing what happens to a pod: its status (Ready included) and the Service names
    /// resolving to it stay as they are, the way a kubelet that is slow or cut off from the API
    /// server leaves them, while the pod itself may die. The fault tests inject with
    /// [`Kubelet::signal`].
    pub fn hold(&self, namespace: &str, pod: &str) -> anyhow::Result<()> {
        let mut pods = lock(&self.inner.pods);
        let running = pods
            .get_mut(&(namespace.to_owned(), pod.to_owned()))
            .with_context(|| format!("pod {namespace}/{pod} is not running here"))?;
        running.held = true;
        Ok(())
    }

    /// From now on, starts the container of a pod of `namespace` again when it exits, as a
    /// kubelet does under `restartPolicy: Always` (every Deployment's pods): for a process that
    /// exits on purpose and counts on the restart, such as the operator on losing its Lease.
    /// At once, without the kubelet's back-off; the restarted container gets a new address (a
    /// kubelet keeps the pod's) and its output is appended to the pod's log.
    pub fn restart_exited_containers(&self, namespace: &str) {
        lock(&self.inner.restarting).insert(namespace.to_owned());
    }

    /// How many times a running pod's container was started again (its `restartCount`).
    pub fn restarts(&self, namespace: &str, pod: &str) -> Option<u32> {
        let pods = lock(&self.inner.pods);
        pods.get(&(namespace.to_owned(), pod.to_owned()))
            .map(|p| p.restarts)
    }

    /// How a deleted pod's container ended, once it has.
    pub fn termination(&self, namespace: &str, pod: &str) -> Option<Termination> {
        let terminations = lock(&self.inner.terminations);
        terminations
            .get(&(namespace.to_owned(), pod.to_owned()))
            .cloned()
    }

    /// Prints the last `lines` lines of every pod's log: a failing test's evidence.
    pub fn print_logs(&self, lines: usize) {
        for (ns, pod) in self.pods() {
            let log = self.log(&ns, &pod);
            let tail: Vec<&str> = log.lines().rev().take(lines).collect();
            eprintln!("--- last lines of pod {ns}/{pod}:");
            tail.iter().rev().for_each(|l| eprintln!("{l}"));
        }
    }

    /// A pod's log (stdout and stderr).
    pub fn log(&self, namespace: &str, pod: &str) -> String {
        std::fs::read_to_string(self.inner.pod_dir(namespace, pod).join("log")).unwrap_or_default()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        let mut pods = lock(&self.inner.pods);
        for (_, mut running) in std::mem::take(&mut *pods) {
            let _ = running.child.kill();
            let _ = running.child.wait();
            remove_netns(&running.netns);
        }
    }
}

impl Inner {
    fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.dir.join(format!("{namespace}_{pod}"))
    }

    /// One pass: bind, start, probe, report, terminate; then the Service names.
    async fn sync(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut listed = BTreeSet::new();
        for ns in &self.namespaces {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            for pod in api.list(&ListParams::default()).await? {
                let key = (ns.clone(), pod.name_any());
                listed.insert(key.clone());
                if let Err(e) = self.sync_pod(&api, &pod, &key).await {
                    eprintln!("kubelet: pod {}/{}: {e:#}", key.0, key.1);
                }
            }
        }
        // Pods gone from the API (deleted without grace): stop them.
        let gone: Vec<_> = {
            let mut pods = lock(&self.pods);
            let keys: Vec<_> = pods
                .keys()
                .filter(|k| !listed.contains(*k))
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| pods.remove(&k)).collect()
        };
        for mut running in gone {
            let _ = running.child.kill();
            let _ = running.child.wait();
            remove_netns(&running.netns);
        }
        self.write_hosts().await
    }

    async fn sync_pod(
        self: &Arc<Self>,
        api: &Api<Pod>,
        pod: &Pod,
        key: &(String, String),
    ) -> anyhow::Result<()> {
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let known = lock(&self.pods).contains_key(key);
        if pod.metadata.deletion_timestamp.is_some() {
            if known {
                self.clone()
                    .terminate(api.clone(), pod.clone(), key.clone());
            }
            return Ok(());
        }
        if spec.node_name.is_none() {
            let binding = json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": key.1},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
            });
            api.create_subresource::<_, serde_json::Value>(
                "binding",
                &key.1,
                &PostParams::default(),
                &binding,
            )
            .await?;
            return Ok(());
        }
        if spec.node_name.as_deref() != Some(&self.node) {
            return Ok(());
        }
        if !known {
            let running = self.run(pod).await?;
            lock(&self.pods).insert(key.clone(), running);
        } else if let Some(restarts) = self.exited_to_restart(key) {
            let mut running = self.run(pod).await?;
            running.restarts = restarts + 1;
            eprintln!(
                "kubelet: restarted {}/{} (restart {})",
                key.0, key.1, running.restarts
            );
            if let Some(old) = lock(&self.pods).insert(key.clone(), running) {
                remove_netns(&old.netns);
            }
        }
        self.probe(key).await;
        self.report(api, pod, key).await
    }

    /// The restart count of a pod whose container exited and is to be started again, if so.
    fn exited_to_restart(&self, key: &(String, String)) -> Option<u32> {
        if !lock(&self.restarting).contains(&key.0) {
            return None;
        }
        let mut pods = lock(&self.pods);
        let running = pods.get_mut(key)?;
        if running.terminating || running.held {
            return None;
        }
        if running.exited.is_none() {
            running.exited = running.child.try_wait().ok().flatten();
        }
        running.exited.map(|_| running.restarts)
    }

    /// Starts a pod's container in a network namespace of its own.
    async fn run(&self, pod: &Pod) -> anyhow::Result<Running> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let [container] = spec.containers.as_slice() else {
            bail!("the stand-in kubelet runs pods of one container");
        };
        let n = NEXT_POD.fetch_add(1, Ordering::Relaxed);
        let ip: Ipv4Addr = format!("{}.{}.{}", self.prefix, 1 + n / 250, 2 + n % 250).parse()?;
        let netns = format!("{}-{n}", self.bridge);
        let root = self.pod_dir(&ns, &name);
        std::fs::create_dir_all(&root)?;

        // Volumes as directories, and where each mount path lands.
        let mut volumes = BTreeMap::new();
        for volume in spec.volumes.iter().flatten() {
            let dir = root.join("volumes").join(&volume.name);
            std::fs::create_dir_all(&dir)?;
            if let Some(source) = &volume.config_map {
                let cm = Api::<ConfigMap>::namespaced(self.client.clone(), &ns)
                    .get(&source.name)
                    .await?;
                let data = cm.data.unwrap_or_default();
                write_items(
                    &dir,
                    data.iter().map(|(k, v)| (k, v.as_bytes())),
                    &source.items,
                )?;
            } else if let Some(source) = &volume.secret {
                let name = source.secret_name.as_deref().unwrap_or_default();
                let api = Api::<Secret>::namespaced(self.client.clone(), &ns);
                // As the kubelet does: a missing optional Secret mounts as an empty directory.
                let secret = match api.get_opt(name).await? {
                    Some(secret) => secret,
                    None if source.optional == Some(true) => Secret::default(),
                    None => api.get(name).await?,
                };
                let data = secret.data.unwrap_or_default();
                write_items(
                    &dir,
                    data.iter().map(|(k, v)| (k, v.0.as_slice())),
                    &source.items,
                )?;
            }
            volumes.insert(volume.name.clone(), dir);
        }
        let mounts: Vec<(String, PathBuf, bool)> = container
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                let dir = volumes.get(&m.name)?;
                let dir = match &m.sub_path {
                    Some(sub) if !sub.is_empty() => dir.join(sub),
                    _ => dir.clone(),
                };
                Some((m.mount_path.clone(), dir, m.read_only == Some(true)))
            })
            .collect();
        // The init containers' downloads: the local model in their `--out` path.
        for init in spec.init_containers.iter().flatten() {
            let args = init.args.clone().unwrap_or_default();
            if let Some(out) = args
                .iter()
                .position(|a| a == "--out")
                .and_then(|i| args.get(i + 1))
            {
                let path = host_path(out, &mounts);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let _ = std::fs::remove_file(&path);
                std::os::unix::fs::symlink(&self.model, &path)?;
            }
        }

        // Environment: values, the downward API, the service-account credentials.
        let mut env = BTreeMap::new();
        env.insert("PATH".to_owned(), std::env::var("PATH").unwrap_or_default());
        env.insert("HOME".to_owned(), root.display().to_string());
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                        Some("metadata.name") => name.clone(),
                        Some("metadata.namespace") => ns.clone(),
                        Some("status.podIP") => ip.to_string(),
                        Some("spec.nodeName") => self.node.clone(),
                        Some("spec.serviceAccountName") => {
                            spec.service_account_name.clone().unwrap_or_default()
                        }
                        _ => continue,
                    }
                }
                (None, None) => String::new(),
            };
            env.insert(var.name.clone(), value);
        }
        let account = spec.service_account_name.as_deref().unwrap_or("default");
        let kubeconfig = self
            .control_plane
            .service_account_kubeconfig(&self.client, &ns, account)
            .await?;
        env.insert("KUBECONFIG".to_owned(), kubeconfig.display().to_string());
        let args: Vec<String> = container.args.iter().flatten().cloned().collect();
        let image = container.image.as_deref().unwrap_or_default();
        let binary = self.images.binary(image)?;

        setup_netns(&self.bridge, &netns, n, ip)?;
        let hosts = lock(&self.hosts).clone();
        std::fs::create_dir_all(format!("/etc/netns/{netns}"))?;
        std::fs::write(format!("/etc/netns/{netns}/hosts"), base_hosts() + &hosts)?;
        // A cluster's DNS answers at once, also for a Service with no ready pod (its ClusterIP,
        // which refuses connections). The host's nameserver is unreachable from the pod network:
        // a lookup of a name not (yet) in `hosts` would hang for the resolver's timeouts. A
        // nameserver on the pod's own loopback refuses the query at once instead.
        std::fs::write(
            format!("/etc/netns/{netns}/resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )?;
        // `ip netns exec` gives the process a mount namespace of its own (slave to the host's):
        // the volumes are bound there, then the binary replaces the shell.
        let mut start = String::from("set -e\n");
        for (mount_path, dir, read_only) in &mounts {
            std::fs::create_dir_all(mount_path)?;
            start.push_str(&format!(
                "mount --bind '{}' '{mount_path}'\n",
                dir.display()
            ));
            if *read_only {
                start.push_str(&format!("mount -o remount,bind,ro '{mount_path}'\n"));
            }
        }
        start.push_str("exec \"$@\"\n");
        std::fs::write(root.join("start.sh"), start)?;
        // Appended: a restarted container's output follows the one before it.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &netns, "sh"])
            .arg(root.join("start.sh"))
            .arg(binary)
            .args(&args)
            .env_clear()
            .envs(&env)
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        eprintln!(
            "kubelet: started {ns}/{name} at {ip} ({})",
            binary.display()
        );
        let probe = readiness_probe(container);
        Ok(Running {
            namespace: ns,
            labels: pod.labels().clone(),
            ip,
            netns,
            child,
            ready: probe.is_none(),
            probe,
            exited: None,
            written: None,
            started: k8s_openapi::jiff::Timestamp::now().to_string(),
            terminating: false,
            held: false,
            restarts: 0,
        })
    }

    async fn probe(&self, key: &(String, String)) {
        let (ip, probe) = {
            let mut pods = lock(&self.pods);
            let Some(running) = pods.get_mut(key) else {
                return;
            };
            if running.held {
                return;
            }
            if running.exited.is_none() {
                running.exited = running.child.try_wait().ok().flatten();
            }
            if running.exited.is_some() {
                running.ready = false;
                return;
            }
            match &running.probe {
                Some(probe) => (running.ip, probe.clone()),
                None => return,
            }
        };
        let ready = http_ok(ip, probe.0, &probe.1).await;
        if let Some(running) = lock(&self.pods).get_mut(key) {
            running.ready = ready && running.exited.is_none();
        }
    }

    /// Writes the pod's status when readiness or liveness changed.
    async fn report(
        &self,
        api: &Api<Pod>,
        pod: &Pod,
        key: &(String, String),
    ) -> anyhow::Result<()> {
        let container = pod.spec.as_ref().and_then(|s| s.containers.first());
        let status = {
            let pods = lock(&self.pods);
            let Some(running) = pods.get(key) else {
                return Ok(());
            };
            let now = (running.ready, running.exited.is_some());
            if running.written == Some(now) || running.terminating {
                return Ok(());
            }
            let ready = if running.ready { "True" } else { "False" };
            let state = match running.exited {
                Some(status) => json!({"terminated": {
                    "exitCode": status.code().unwrap_or(137),
                    "reason": if status.success() { "Completed" } else { "Error" },
                    "message": termination_message(
                        container,
                        status,
                        &std::fs::read_to_string(self.pod_dir(&key.0, &key.1).join("log"))
                            .unwrap_or_default(),
                    ),
                    "startedAt": running.started,
                    "finishedAt": k8s_openapi::jiff::Timestamp::now().to_string(),
                }}),
                None => json!({"running": {"startedAt": running.started}}),
            };
            let now_ts = k8s_openapi::jiff::Timestamp::now().to_string();
            let condition = |type_: &str, status: &str| json!({"type": type_, "status": status, "lastTransitionTime": now_ts});
            json!({"status": {
                "phase": "Running",
                "hostIP": format!("{}.0.1", self.prefix),
                "podIP": running.ip.to_string(),
                "podIPs": [{"ip": running.ip.to_string()}],
                "startTime": running.started,
                "conditions": [
                    condition("PodScheduled", "True"),
                    condition("Initialized", "True"),
                    condition("ContainersReady", ready),
                    condition("Ready", ready),
                ],
                "containerStatuses": [{
                    "name": container.map(|c| c.name.as_str()).unwrap_or_default(),
                    "image": container.and_then(|c| c.image.as_deref()).unwrap_or_default(),
                    "ready": running.ready, "restartCount": running.restarts,
                    "imageID": "", "started": running.exited.is_none(),
                    "state": state,
                }],
            }})
        };
        api.patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        let mut pods = lock(&self.pods);
        if let Some(running) = pods.get_mut(key) {
            running.written = Some((running.ready, running.exited.is_some()));
        }
        Ok(())
    }

    /// Graceful deletion as the kubelet does it: preStop, SIGTERM, the grace period, SIGKILL,
    /// then the final delete that removes the pod.
    fn terminate(self: Arc<Self>, api: Api<Pod>, pod: Pod, key: (String, String)) {
        {
            let mut pods = lock(&self.pods);
            match pods.get_mut(&key) {
                Some(running) if !running.terminating => running.terminating = true,
                _ => return,
            }
        }
        tokio::spawn(async move {
            let grace = Duration::from_secs(
                pod.metadata
                    .deletion_grace_period_seconds
                    .unwrap_or(30)
                    .max(0) as u64,
            );
            let start = Instant::now();
            let pre_stop = pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.lifecycle.as_ref()?.pre_stop.as_ref()?.sleep.as_ref())
                .map(|s| Duration::from_secs(s.seconds.max(0) as u64));
            if let Some(pre_stop) = pre_stop {
                tokio::time::sleep(pre_stop.min(grace)).await;
            }
            let pid = lock(&self.pods).get(&key).map(|r| r.child.id());
            if let Some(pid) = pid {
                kill(pid, "TERM");
            }
            let exit = loop {
                let status = {
                    let mut pods = lock(&self.pods);
                    match pods.get_mut(&key) {
                        Some(r) => r.exited.or_else(|| r.child.try_wait().ok().flatten()),
                        None => break None,
                    }
                };
                if let Some(status) = status {
                    break Some((status, true));
                }
                if start.elapsed() > grace {
                    let mut pods = lock(&self.pods);
                    let r = pods.get_mut(&key)?;
                    let _ = r.child.kill();
                    break r.child.wait().ok().map(|s| (s, false));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if let Some((status, within_grace)) = exit {
                lock(&self.terminations).insert(
                    key.clone(),
                    Termination {
                        exit_code: status.code(),
                        within_grace,
                    },
                );
            }
            if let Some(running) = lock(&self.pods).remove(&key) {
                remove_netns(&running.netns);
            }
            let mut params = DeleteParams::default().grace_period(0);
            params.preconditions = Some(kube::api::Preconditions {
                uid: pod.uid(),
                resource_version: None,
            });
            let _ = api.delete(&key.1, &params).await;
            Some(())
        });
    }

    /// Every Service of our namespaces that selects a ready pod, by its DNS names.
    async fn write_hosts(&self) -> anyhow::Result<()> {
        let mut lines = String::new();
        for ns in &self.namespaces {
            let services: Api<Service> = Api::namespaced(self.client.clone(), ns);
            for service in services.list(&ListParams::default()).await? {
                let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.clone()) else {
                    continue;
                };
                let pods = lock(&self.pods);
                let target = pods.values().find(|p| {
                    p.namespace == *ns
                        && p.ready
                        && !p.terminating
                        && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                });
                if let Some(pod) = target {
                    let name = service.name_any();
                    lines.push_str(&format!(
                        "{} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}.{ns}\n",
                        pod.ip
                    ));
                }
            }
        }
        let changed = {
            let mut hosts = lock(&self.hosts);
            let changed = *hosts != lines;
            *hosts = lines.clone();
            changed
        };
        if changed {
            let netns: Vec<String> = lock(&self.pods).values().map(|p| p.netns.clone()).collect();
            for netns in netns {
                // In place: `ip netns exec` bind-mounted this very file over the pod's /etc/hosts.
                let _ = std::fs::write(format!("/etc/netns/{netns}/hosts"), base_hosts() + &lines);
            }
        }
        Ok(())
    }
}

/// What a kubelet puts in a terminated container's status: with `FallbackToLogsOnError`, a
/// failed container's last log lines (at most 80 lines and 2048 bytes, as the kubelet takes).
fn termination_message(
    container: Option<&k8s_openapi::api::core::v1::Container>,
    status: std::process::ExitStatus,
    log: &str,
) -> String {
    let policy = container.and_then(|c| c.termination_message_policy.as_deref());
    if status.success() || policy != Some("FallbackToLogsOnError") {
        return String::new();
    }
    let lines: Vec<&str> = log.lines().rev().take(80).collect();
    let tail = lines.into_iter().rev().collect::<Vec<_>>().join("\n");
    let cut = tail.len().saturating_sub(2048);
    let start = (cut..=tail.len())
        .find(|&i| tail.is_char_boundary(i))
        .unwrap_or(tail.len());
    tail[start..].to_owned()
}

/// The state behind a mutex, even if a thread panicked holding it (the test fails anyway).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn base_hosts() -> String {
    "127.0.0.1 localhost\n::1 localhost\n".to_owned()
}

/// Where a path inside the pod lies on the host: under the volume mounted deepest above it.
fn host_path(path: &str, mounts: &[(String, PathBuf, bool)]) -> PathBuf {
    let best = mounts
        .iter()
        .filter(|(mount, _, _)| {
            path == mount.as_str() || path.starts_with(&format!("{}/", mount.trim_end_matches('/')))
        })
        .max_by_key(|(mount, _, _)| mount.len());
    match best {
        Some((mount, dir, _)) => {
            PathBuf::from(format!("{}{}", dir.display(), &path[mount.len()..]))
        }
        None => PathBuf::from(path),
    }
}

fn write_items<'a>(
    dir: &Path,
    data: impl Iterator<Item = (&'a String, &'a [u8])>,
    items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
) -> anyhow::Result<()> {
    let data: BTreeMap<&String, &[u8]> = data.collect();
    match items {
        Some(items) => {
            for item in items {
                let value = data
                    .get(&item.key)
                    .with_context(|| format!("no key {:?} to mount", item.key))?;
                std::fs::write(dir.join(&item.path), value)?;
            }
        }
        None => {
            for (key, value) in data {
                std::fs::write(dir.join(key), value)?;
            }
        }
    }
    Ok(())
}

fn readiness_probe(container: &Container) -> Option<(u16, String)> {
    let get = container.readiness_probe.as_ref()?.http_get.as_ref()?;
    let port = match &get.port {
        IntOrString::Int(p) => *p as u16,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))?
                .container_port as u16
        }
    };
    Some((port, get.path.clone().unwrap_or_else(|| "/".into())))
}

/// A readiness probe: a 2xx answer within 2 s.
async fn http_ok(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    let get = crate::http::request(ip, port, "GET", path, &[], None);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), get).await,
        Ok(Ok(response)) if (200..300).contains(&response.status)
    )
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn setup_netns(bridge: &str, netns: &str, n: u32, ip_addr: Ipv4Addr) -> anyhow::Result<()> {
    let host_end = format!("{bridge}v{n}");
    let addr = format!("{ip_addr}/16");
    let gateway = {
        let o = ip_addr.octets();
        format!("{}.{}.0.1", o[0], o[1])
    };
    ip(&["netns", "add", netns])?;
    ip(&[
        "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ])?;
    ip(&["link", "set", &host_end, "master", bridge, "up"])?;
    ip(&["-n", netns, "addr", "add", &addr, "dev", "eth0"])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&["-n", netns, "route", "add", "default", "via", &gateway])?;
    Ok(())
}

fn remove_netns(netns: &str) {
    let _ = Command::new("ip").args(["netns", "del", netns]).status();
    let _ = std::fs::remove_dir_all(format!("/etc/netns/{netns}"));
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status();
}
