//! A variant's Deployment: the sidecar container (engine settings as flags, probes, the
//! `restricted` security context, the preStop sleep and drain its grace period outlasts), the
//! fetch init container for downloaded weights, the volumes (model, config, forwarding token,
//! API keys) and the placement GPUs imply.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, ImageVolumeSource, KeyToPath, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, SleepAction, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sluice_crds::device::{DEVICE_CPU, DEVICE_CUDA, DEVICE_ENV, ENGINE_OVERHEAD_BYTES};
use sluice_crds::inference_model::{ModelSource, Scheduling, Variant};
use sluice_crds::lifecycle::{
    DRAIN_GRACE_SECS_FLAG, FIRST_TOKEN_TIMEOUT_SECS_FLAG, PRE_STOP_SLEEP_SECS,
    REQUEST_TIMEOUT_SECS_FLAG, termination_grace_period_secs,
};
use sluice_crds::quantity::parse_bytes;
use sluice_crds::sidecar_config::FALLBACK_TOKEN_FILE_FLAG;

use super::auth::auth_volumes;
use super::meta::{Renderer, Settings, content_hash};
use crate::Result;
use crate::names::{
    ADMIN_PORT, ANNOTATION_VARIANT_HASH, API_PORT, CACHE_DIR, CONFIG_DIR, FALLBACK_FORWARDING_DIR,
    FALLBACK_FORWARDING_VOLUME, FORWARDING_DIR, FORWARDING_KEY, FORWARDING_VOLUME,
    GPU_PRODUCT_LABEL, GPU_RESOURCE, MODELS_DIR, config_map_name, forwarding_secret_name,
    sidecar_account_name, variant_object_name,
};
use crate::policy::merge::key_secret_volumes;

/// UID/GID the sidecar images run as (`USER 65532:65532` in deploy/sidecar*.Dockerfile).
pub(super) const SIDECAR_UID: i64 = 65532;
/// Downloaded weights land here inside the models emptyDir.
const DOWNLOADED_FILE: &str = "model.gguf";

/// A variant's model volume, where the sidecar container mounts it, the `--model` path, and
/// the fetch init container's args (downloaded sources only).
struct ModelVolume {
    volume: Volume,
    mount_path: String,
    model_path: String,
    fetch: Option<Vec<String>>,
}

// === impl Renderer ===

impl Renderer<'_> {
    pub(super) fn deployment(&self, v: &Variant) -> Result<Deployment> {
        let gpus = self.gpu_count();
        let model = self.model_volume(v);
        // The API-key Secret of the model's identity, if any: only a change of that mount (not
        // of limits) changes the pod template.
        let (key_volumes, key_mounts): (Vec<Volume>, Vec<VolumeMount>) =
            key_secret_volumes(self.limits.keys.as_ref())
                .into_iter()
                .chain(self.fallback_token_volume())
                .chain(self.model.spec.auth.iter().flat_map(auth_volumes))
                .unzip();
        let sidecar = self.sidecar_container(v, &model, key_mounts);
        let init_containers = model
            .fetch
            .map(|args| vec![self.fetch_container(v, sidecar.image.clone(), args)]);
        let pod_spec = self.pod_spec(v, sidecar, init_containers, model.volume, key_volumes);
        let variant_hash = content_hash(&(
            &v.model,
            &v.engine,
            &pod_spec.containers,
            &pod_spec.init_containers,
            &self.model.spec.resources,
            &self.model.spec.scheduling,
        ))?;
        let mut template_labels = self.labels(Some(v));
        template_labels.remove("app.kubernetes.io/managed-by");

        // GPU pods cannot surge (the spare GPU rarely exists): replace one at a time instead.
        // CPU pods surge so a variant never drops below its ready count during a rollout.
        let (max_surge, max_unavailable) = if gpus > 0 { (0, 1) } else { (1, 0) };
        Ok(Deployment {
            metadata: self.meta(variant_object_name(self.name, &v.name), Some(v)),
            spec: Some(DeploymentSpec {
                // Left out when an HPA owns the replica count: nothing fights it, no drift.
                replicas: match self.model.spec.autoscaling {
                    Some(_) => None,
                    None => Some(self.model.spec.replicas.unwrap_or(1)),
                },
                selector: LabelSelector {
                    match_labels: Some(self.selector(Some(v))),
                    ..Default::default()
                },
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".to_owned()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(max_surge)),
                        max_unavailable: Some(IntOrString::Int(max_unavailable)),
                    }),
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(template_labels),
                        annotations: Some(BTreeMap::from([(
                            ANNOTATION_VARIANT_HASH.to_owned(),
                            variant_hash,
                        )])),
                        ..Default::default()
                    }),
                    spec: Some(pod_spec),
                },
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn gpu_count(&self) -> i32 {
        self.model
            .spec
            .resources
            .as_ref()
            .and_then(|r| r.gpu.as_ref())
            .map_or(0, |g| g.count.max(0))
    }

    fn image(&self, v: &Variant) -> String {
        match &v.image {
            Some(image) => image.clone(),
            None if self.gpu_count() > 0 => self.settings.sidecar_cuda_image.clone(),
            None => self.settings.sidecar_image.clone(),
        }
    }

    /// A container's resources: the sidecar's when `serving` (the GPUs; the fetch init
    /// container never asks for them). `resources.memory` is the request and the limit; without
    /// it, the sidecar of a variant whose `model.size` is known requests what its weights need
    /// ([`derived_memory_request`]) and sets no limit (the weights' pages are the file's, mapped:
    /// the kernel can reclaim and re-read them).
    fn resources(&self, v: &Variant, serving: bool) -> Option<ResourceRequirements> {
        let r = self.model.spec.resources.as_ref();
        let mut requests = BTreeMap::new();
        let mut limits = BTreeMap::new();
        if let Some(cpu) = r.and_then(|r| r.cpu.as_ref()) {
            requests.insert("cpu".to_owned(), cpu.clone());
            limits.insert("cpu".to_owned(), cpu.clone());
        }
        match (r.and_then(|r| r.memory.as_ref()), v.model_size_bytes()) {
            (Some(mem), _) => {
                requests.insert("memory".to_owned(), mem.clone());
                limits.insert("memory".to_owned(), mem.clone());
            }
            (None, Some(size)) if serving => {
                requests.insert(
                    "memory".to_owned(),
                    Quantity(derived_memory_request(size).to_string()),
                );
            }
            (None, _) => {}
        }
        let gpus = self.gpu_count();
        if serving && gpus > 0 {
            limits.insert(GPU_RESOURCE.to_owned(), Quantity(gpus.to_string()));
        }
        if requests.is_empty() && limits.is_empty() {
            return None;
        }
        Some(ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        })
    }

    /// The fallback model's forwarding Secret (`spec.fallback`), mounted for the flag
    /// [`FALLBACK_TOKEN_FILE_FLAG`]: forwards to the fallback model are signed with its token,
    /// which its sidecars verify. Optional: a fallback model that does not exist yet (so has no
    /// Secret) must not keep this model's pods from starting; the sidecar reads the file when
    /// it first needs it.
    fn fallback_token_volume(&self) -> Option<(Volume, VolumeMount)> {
        let fallback = self.model.spec.fallback.as_ref()?;
        Some((
            Volume {
                name: FALLBACK_FORWARDING_VOLUME.to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(forwarding_secret_name(&fallback.model)),
                    items: Some(vec![KeyToPath {
                        key: FORWARDING_KEY.to_owned(),
                        path: FORWARDING_KEY.to_owned(),
                        ..Default::default()
                    }]),
                    default_mode: Some(0o440),
                    optional: Some(true),
                }),
                ..Default::default()
            },
            VolumeMount {
                name: FALLBACK_FORWARDING_VOLUME.to_owned(),
                mount_path: FALLBACK_FORWARDING_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
        ))
    }

    /// `sluice-sidecar serve` for variant `v`: the model, its config, the engine settings.
    fn sidecar_container(
        &self,
        v: &Variant,
        model: &ModelVolume,
        key_mounts: Vec<VolumeMount>,
    ) -> Container {
        let gpus = self.gpu_count();
        let mut args = vec![
            "serve".to_owned(),
            "--model".to_owned(),
            model.model_path.clone(),
            "--served-name".to_owned(),
            self.model.served_name(),
            "--variant".to_owned(),
            v.name.clone(),
            "--configmap".to_owned(),
            format!("{}/{}", self.namespace, config_map_name(self.name)),
            "--listen".to_owned(),
            format!("0.0.0.0:{API_PORT}"),
            "--admin-listen".to_owned(),
            format!("0.0.0.0:{ADMIN_PORT}"),
            "--forward-token-file".to_owned(),
            format!("{FORWARDING_DIR}/{FORWARDING_KEY}"),
            "--cache-dir".to_owned(),
            CACHE_DIR.to_owned(),
            // As long as a request may take (explicit, not the image's default): the pod's
            // grace period is sized to outlast it.
            format!("--{DRAIN_GRACE_SECS_FLAG}"),
            v.drain_grace_secs().to_string(),
        ];
        if self.model.spec.fallback.is_some() {
            args.push(format!("--{FALLBACK_TOKEN_FILE_FLAG}"));
            args.push(format!("{FALLBACK_FORWARDING_DIR}/{FORWARDING_KEY}"));
        }
        args.extend(engine_args(v));

        let probe = |path: &str, period: i32, failures: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::String("admin".to_owned()),
                ..Default::default()
            }),
            period_seconds: Some(period),
            failure_threshold: Some(failures),
            timeout_seconds: Some(2),
            ..Default::default()
        };
        Container {
            name: "sidecar".to_owned(),
            image: Some(self.image(v)),
            args: Some(args),
            // No NVIDIA_VISIBLE_DEVICES or CUDA_VISIBLE_DEVICES: the device plugin sets them to
            // the GPUs it allocated.
            env: Some(
                pod_env(self.settings)
                    .into_iter()
                    .chain([
                        // The engine (mistral.rs) never contacts a model hub: weights are local.
                        plain_env("HF_HUB_OFFLINE", "1"),
                        // On the GPU it was given, or the sidecar stops with the reason.
                        plain_env(DEVICE_ENV, if gpus > 0 { DEVICE_CUDA } else { DEVICE_CPU }),
                    ])
                    .collect(),
            ),
            ports: Some(vec![
                container_port("http", API_PORT),
                container_port("admin", ADMIN_PORT),
            ]),
            resources: self.resources(v, true),
            // Loading weights takes a while: liveness applies only once it is done.
            startup_probe: Some(probe(
                "/readyz",
                STARTUP_PROBE_PERIOD_SECS,
                startup_probe_failures(gpus > 0, v.model_size_bytes()),
            )),
            readiness_probe: Some(probe("/readyz", 5, 3)),
            liveness_probe: Some(probe("/healthz", 10, 3)),
            // The sidecar stops accepting at SIGTERM: until the pod's removal from the Services'
            // endpoints has reached every proxy, keep serving what still arrives. The image has
            // no shell, hence the kubelet's own sleep rather than `exec sleep`.
            lifecycle: Some(Lifecycle {
                pre_stop: Some(LifecycleHandler {
                    sleep: Some(SleepAction {
                        seconds: PRE_STOP_SLEEP_SECS.into(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            security_context: Some(restricted_security_context()),
            volume_mounts: Some(
                vec![
                    VolumeMount {
                        name: "models".to_owned(),
                        mount_path: model.mount_path.clone(),
                        read_only: Some(true),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "config".to_owned(),
                        mount_path: CONFIG_DIR.to_owned(),
                        read_only: Some(true),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "tmp".to_owned(),
                        mount_path: "/tmp".to_owned(),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: FORWARDING_VOLUME.to_owned(),
                        mount_path: FORWARDING_DIR.to_owned(),
                        read_only: Some(true),
                        ..Default::default()
                    },
                ]
                .into_iter()
                .chain(key_mounts)
                .collect(),
            ),
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            ..Default::default()
        }
    }

    /// `sluice-sidecar fetch` (same image as the sidecar): downloads the weights into the
    /// models emptyDir before the sidecar starts. Never asks for a GPU.
    fn fetch_container(&self, v: &Variant, image: Option<String>, args: Vec<String>) -> Container {
        Container {
            name: "fetch".to_owned(),
            image,
            args: Some(args),
            resources: self.resources(v, false),
            security_context: Some(restricted_security_context()),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "models".to_owned(),
                    mount_path: MODELS_DIR.to_owned(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "tmp".to_owned(),
                    mount_path: "/tmp".to_owned(),
                    ..Default::default()
                },
            ]),
            // The last log lines become the termination message: status shows why a
            // download failed (WeightsFetchFailed) without `kubectl logs`.
            termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
            ..Default::default()
        }
    }

    /// The pod: its containers, volumes, security context and placement.
    fn pod_spec(
        &self,
        v: &Variant,
        sidecar: Container,
        init_containers: Option<Vec<Container>>,
        model_volume: Volume,
        key_volumes: Vec<Volume>,
    ) -> PodSpec {
        let scheduling = self.model.spec.scheduling.clone().unwrap_or_default();
        let (node_selector, tolerations) = self.placement(&scheduling);
        PodSpec {
            service_account_name: Some(sidecar_account_name(self.name)),
            init_containers,
            containers: vec![sidecar],
            volumes: Some(
                vec![
                    model_volume,
                    Volume {
                        name: "config".to_owned(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: config_map_name(self.name),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    Volume {
                        name: "tmp".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    },
                    // Only the token: the sidecars of every variant read the same one.
                    Volume {
                        name: FORWARDING_VOLUME.to_owned(),
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(forwarding_secret_name(self.name)),
                            items: Some(vec![KeyToPath {
                                key: FORWARDING_KEY.to_owned(),
                                path: FORWARDING_KEY.to_owned(),
                                ..Default::default()
                            }]),
                            default_mode: Some(0o440),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ]
                .into_iter()
                .chain(key_volumes)
                .collect(),
            ),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(SIDECAR_UID),
                run_as_group: Some(SIDECAR_UID),
                fs_group: Some(SIDECAR_UID),
                seccomp_profile: Some(runtime_default_seccomp()),
                ..Default::default()
            }),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            affinity: scheduling.affinity,
            priority_class_name: scheduling.priority_class_name,
            // The preStop sleep, the drain and a margin (`sluice_crds::lifecycle`): Kubernetes'
            // default of 30 s would SIGKILL a drain that starts after the sleep.
            termination_grace_period_seconds: Some(
                termination_grace_period_secs(v.drain_grace_secs()).into(),
            ),
            ..Default::default()
        }
    }

    /// `spec.scheduling`'s node selector and tolerations, plus what GPUs imply: the product's
    /// node label and the GPU taint's toleration.
    fn placement(&self, scheduling: &Scheduling) -> (BTreeMap<String, String>, Vec<Toleration>) {
        let mut node_selector = scheduling.node_selector.clone();
        let mut tolerations = scheduling.tolerations.clone();
        if self.gpu_count() > 0 {
            if let Some(product) = self
                .model
                .spec
                .resources
                .as_ref()
                .and_then(|r| r.gpu.as_ref())
                .and_then(|g| g.product.clone())
            {
                node_selector
                    .entry(GPU_PRODUCT_LABEL.to_owned())
                    .or_insert(product);
            }
            let gpu_toleration = Toleration {
                key: Some(GPU_RESOURCE.to_owned()),
                operator: Some("Exists".to_owned()),
                effect: Some("NoSchedule".to_owned()),
                ..Default::default()
            };
            if !tolerations.contains(&gpu_toleration) {
                tolerations.push(gpu_toleration);
            }
        }
        (node_selector, tolerations)
    }

    /// Where variant `v`'s weights come from: a volume to mount and, for downloaded sources,
    /// the fetch init container's args.
    fn model_volume(&self, v: &Variant) -> ModelVolume {
        let m: &ModelSource = &v.model;
        let volume = |f: &dyn Fn(&mut Volume)| {
            let mut vol = Volume {
                name: "models".to_owned(),
                ..Default::default()
            };
            f(&mut vol);
            vol
        };
        let under_models = |path: &str| format!("{MODELS_DIR}/{}", path.trim_start_matches('/'));
        if let Some(pvc) = &m.pvc {
            return ModelVolume {
                volume: volume(&|vol| {
                    vol.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                        claim_name: pvc.claim_name.clone(),
                        read_only: Some(true),
                    })
                }),
                mount_path: MODELS_DIR.to_owned(),
                model_path: under_models(&pvc.path),
                fetch: None,
            };
        }
        if let Some(host_path) = &m.host_path {
            // The file itself is mounted, so the node directory's other files stay private.
            let file = format!("{MODELS_DIR}/{DOWNLOADED_FILE}");
            return ModelVolume {
                volume: volume(&|vol| {
                    vol.host_path = Some(HostPathVolumeSource {
                        path: host_path.clone(),
                        type_: Some("File".to_owned()),
                    })
                }),
                mount_path: file.clone(),
                model_path: file,
                fetch: None,
            };
        }
        if let Some(image) = &m.image {
            return ModelVolume {
                volume: volume(&|vol| {
                    vol.image = Some(ImageVolumeSource {
                        reference: Some(image.reference.clone()),
                        pull_policy: Some("IfNotPresent".to_owned()),
                    })
                }),
                mount_path: MODELS_DIR.to_owned(),
                model_path: under_models(&image.path),
                fetch: None,
            };
        }
        // url or huggingFace: downloaded by the init container into an emptyDir.
        let url = m.url.clone().or_else(|| {
            m.hugging_face.as_ref().map(|hf| {
                format!(
                    "https://huggingface.co/{}/resolve/{}/{}",
                    hf.repo,
                    hf.revision.as_deref().unwrap_or("main"),
                    hf.file.trim_start_matches('/')
                )
            })
        });
        let out = format!("{MODELS_DIR}/{DOWNLOADED_FILE}");
        let mut fetch = vec![
            "fetch".to_owned(),
            "--url".to_owned(),
            url.unwrap_or_default(),
        ];
        if let Some(sha) = &m.sha256 {
            fetch.push("--sha256".to_owned());
            fetch.push(sha.to_ascii_lowercase());
        }
        fetch.push("--out".to_owned());
        fetch.push(out.clone());
        ModelVolume {
            volume: volume(&|vol| vol.empty_dir = Some(EmptyDirVolumeSource::default())),
            mount_path: MODELS_DIR.to_owned(),
            model_path: out,
            fetch: Some(fetch),
        }
    }
}

/// Engine settings as sidecar flags; the one place that knows the mapping.
pub fn engine_args(v: &Variant) -> Vec<String> {
    let Some(e) = &v.engine else {
        return Vec::new();
    };
    let mut args = Vec::new();
    let mut push = |flag: &str, value: Option<String>| {
        if let Some(value) = value {
            args.push(flag.to_owned());
            args.push(value);
        }
    };
    push("--context-length", e.context_length.map(|n| n.to_string()));
    push(
        "--max-seqs",
        e.max_concurrent_sequences.map(|n| n.to_string()),
    );
    push(
        "--default-max-tokens",
        e.default_max_tokens.map(|n| n.to_string()),
    );
    push(
        "--default-temperature",
        e.temperature.map(|n| n.to_string()),
    );
    push("--default-top-p", e.top_p.map(|n| n.to_string()));
    push(
        &format!("--{REQUEST_TIMEOUT_SECS_FLAG}"),
        e.request_timeout
            .map(|d| std::time::Duration::from(d).as_secs_f64().to_string()),
    );
    push(
        &format!("--{FIRST_TOKEN_TIMEOUT_SECS_FLAG}"),
        e.first_token_timeout
            .map(|d| std::time::Duration::from(d).as_secs_f64().to_string()),
    );
    // In bytes, so the sidecar never has to agree on a spelling; `InferenceModel::validate`
    // checked that it parses.
    push(
        "--prefix-cache-bytes",
        e.prefix_cache_memory
            .as_ref()
            .and_then(|q| parse_bytes(&q.0).ok())
            .map(|n| n.to_string()),
    );
    args
}

/// The memory request of a variant whose weights file is `size` bytes and whose pod sets no
/// memory: the file (mapped; on a GPU, read through the page cache once to upload it), a fifth
/// more for the dequantized tensors and buffers that grow with the model, and the engine's
/// fixed working memory.
pub fn derived_memory_request(size: u64) -> u64 {
    size + size / 5 + ENGINE_OVERHEAD_BYTES
}

const STARTUP_PROBE_PERIOD_SECS: i32 = 5;
/// How long a pod may take to load before its startup probe gives up: 5 minutes on the CPU; 10
/// on a GPU, whose load also compiles and uploads; plus a minute per 2 GiB of weights known
/// from `model.size` (reading them at a slow disk's 35 MB/s).
fn startup_probe_failures(gpu: bool, size: Option<u64>) -> i32 {
    let base_secs: u64 = if gpu { 600 } else { 300 };
    let per_size_secs = size.map_or(0, |bytes| bytes.div_ceil(2 << 30) * 60);
    let secs = base_secs + per_size_secs;
    i32::try_from(secs.div_ceil(STARTUP_PROBE_PERIOD_SECS as u64)).unwrap_or(i32::MAX)
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..Default::default()
    }
}

pub(super) fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

/// What every pod of the sidecar image gets: its name and namespace, and the tracing variables
/// the operator passes on.
pub(super) fn pod_env(settings: &Settings) -> Vec<EnvVar> {
    let mut env = downward_env();
    env.extend(
        settings
            .tracing_env
            .iter()
            .map(|(name, value)| plain_env(name, value)),
    );
    env
}

fn downward_env() -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        field("SLUICE_POD_NAME", "metadata.name"),
        field("SLUICE_POD_NAMESPACE", "metadata.namespace"),
    ]
}

pub(super) fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..Default::default()
    }
}

/// The `restricted` Pod Security Standard, per container.
pub(super) fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Default::default()
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}
