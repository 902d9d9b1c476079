//! Desired state: pure functions from an InferenceModel to every object the operator applies.
//!
//! No I/O here. The controller applies exactly what these functions return, and
//! `sluice-operator render` prints it, so GitOps users preview what a change does and the golden
//! tests pin it down.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, ImageVolumeSource, KeyToPath,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sluice_crds::inference_model::{AutoscalingMetricType, ModelSource, Variant};
use sluice_crds::sidecar_config::SIDECAR_CONFIG_KEY;
use sluice_crds::{InferenceModel, SidecarConfig};

use crate::policy::{ModelLimits, key_secret_volumes};
use crate::routing::{ReadyCounts, desired_sidecar_config};
use crate::{Error, Result};

/// The one field manager every apply (objects and status) is made under.
pub const FIELD_MANAGER: &str = "sluice-operator";
/// Label naming the InferenceModel an object belongs to.
pub const LABEL_MODEL: &str = "sluice.dev/model";
/// Label naming the variant an object belongs to.
pub const LABEL_VARIANT: &str = "sluice.dev/variant";
/// `app.kubernetes.io/managed-by` value of everything the operator creates.
pub const MANAGED_BY: &str = "sluice-operator";
/// Annotation holding the hash of the object as last rendered: a changed hash means "apply",
/// even when the change only removes fields (which a comparison with the live object misses).
pub const ANNOTATION_APPLIED_HASH: &str = "sluice.dev/applied-hash";
/// Pod-template annotation hashing what needs a restart (model, resources, image, engine,
/// scheduling); routing weights and limits are not in it, so they never roll pods.
pub const ANNOTATION_VARIANT_HASH: &str = "sluice.dev/variant-hash";
/// The OpenAI API port of the sidecar.
pub const API_PORT: i32 = 8080;
/// The admin port of the sidecar (`/metrics`, `/healthz`, `/readyz`).
pub const ADMIN_PORT: i32 = 9090;
/// Where the model volume is mounted.
pub const MODELS_DIR: &str = "/models";
/// Where the sidecar config ConfigMap is mounted (for `--config`).
pub const CONFIG_DIR: &str = "/etc/sluice/config";
/// Where the model's forwarding Secret is mounted (only its `token` entry).
pub const FORWARDING_DIR: &str = "/etc/sluice/forwarding";
/// The forwarding Secret's entry holding the token.
pub const FORWARDING_KEY: &str = "token";
/// Pod volume of the forwarding Secret.
pub const FORWARDING_VOLUME: &str = "forwarding";
/// Where the sidecar caches converted weights: the root filesystem is read-only, `/tmp` is an
/// emptyDir.
pub const CACHE_DIR: &str = "/tmp/sluice-cache";
/// The node label the GPU product is matched against.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// The extended resource (and taint key) of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// UID/GID the sidecar images run as (`USER 65532:65532` in deploy/sidecar*.Dockerfile).
const SIDECAR_UID: i64 = 65532;
/// Downloaded weights land here inside the models emptyDir.
const DOWNLOADED_FILE: &str = "model.gguf";

/// How the operator renders pods: the images it was started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Sidecar image for CPU variants.
    pub sidecar_image: String,
    /// Sidecar image for variants with `gpu.count > 0`.
    pub sidecar_cuda_image: String,
}

/// Every object the operator applies for one InferenceModel, in apply order.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Identity of the sidecar pods.
    pub service_account: ServiceAccount,
    /// Lets the sidecars read (only) their ConfigMap.
    pub role: Role,
    /// Binds [`Desired::role`] to [`Desired::service_account`].
    pub role_binding: RoleBinding,
    /// The sidecar config document (routing, limits).
    pub config_map: ConfigMap,
    /// The parsed document inside [`Desired::config_map`].
    pub sidecar_config: SidecarConfig,
    /// The model Service (all variants) first, then one per variant.
    pub services: Vec<Service>,
    /// One per variant.
    pub deployments: Vec<Deployment>,
    /// One per variant when `spec.autoscaling` is set.
    pub autoscalers: Vec<HorizontalPodAutoscaler>,
}

// === impl Desired ===

impl Desired {
    /// Every object as JSON, in apply order (for `render` and the tests).
    pub fn to_values(&self) -> Result<Vec<serde_json::Value>> {
        let mut out = vec![
            serde_json::to_value(&self.service_account)?,
            serde_json::to_value(&self.role)?,
            serde_json::to_value(&self.role_binding)?,
            serde_json::to_value(&self.config_map)?,
        ];
        for s in &self.services {
            out.push(serde_json::to_value(s)?);
        }
        for d in &self.deployments {
            out.push(serde_json::to_value(d)?);
        }
        for h in &self.autoscalers {
            out.push(serde_json::to_value(h)?);
        }
        Ok(out)
    }

    /// Every object as a YAML stream (`---` before each document).
    pub fn to_yaml(&self) -> Result<String> {
        let mut out = String::new();
        for v in self.to_values()? {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&v)?);
        }
        Ok(out)
    }
}

/// Name of a variant's Deployment, Service and HorizontalPodAutoscaler.
pub fn variant_object_name(model: &str, variant: &str) -> String {
    format!("{model}-{variant}")
}

/// Name of the model's sidecar config ConfigMap.
pub fn config_map_name(model: &str) -> String {
    format!("{model}-sidecar-config")
}

/// Name of the model's forwarding Secret (created once by the operator with a random token,
/// never rendered: see [`crate::forwarding`]).
pub fn forwarding_secret_name(model: &str) -> String {
    format!("{model}-forwarding")
}

/// Name of the sidecars' ServiceAccount, Role and RoleBinding.
pub fn sidecar_account_name(model: &str) -> String {
    format!("{model}-sidecar")
}

/// The in-cluster OpenAI base URL of a model.
pub fn endpoint(model: &str, namespace: &str) -> String {
    format!("http://{model}.{namespace}.svc:{API_PORT}/v1")
}

/// Checks what the CRD schema and CEL rules check, so a model applied without them (or read
/// from a file by `render`) fails with the same reason instead of producing broken objects.
pub fn validate(model: &InferenceModel) -> Result<(), String> {
    let name = model.metadata.name.as_deref().unwrap_or_default();
    if !is_dns_label(name) || name.len() > 40 {
        return Err(format!(
            "metadata.name {name:?} must be a DNS label of at most 40 characters starting with a letter"
        ));
    }
    let spec = &model.spec;
    if spec.variants.is_empty() || spec.variants.len() > 8 {
        return Err(format!(
            "spec.variants must list 1 to 8 variants, not {}",
            spec.variants.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for v in &spec.variants {
        if !is_dns_label(&v.name) || v.name.len() > 20 {
            return Err(format!(
                "variant name {:?} must be a DNS label of at most 20 characters",
                v.name
            ));
        }
        if !seen.insert(v.name.as_str()) {
            return Err(format!(
                "variant names must be unique: {:?} repeats",
                v.name
            ));
        }
        if !(0..=100).contains(&v.weight) {
            return Err(format!(
                "variant {:?}: weight {} is not in 0..=100",
                v.name, v.weight
            ));
        }
        total += v.weight;
        let m = &v.model;
        let sources = [
            m.url.is_some(),
            m.hugging_face.is_some(),
            m.pvc.is_some(),
            m.host_path.is_some(),
            m.image.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(format!(
                "variant {:?}: set exactly one model source: url, huggingFace, pvc, hostPath or image",
                v.name
            ));
        }
        if m.sha256.is_some() && m.url.is_none() && m.hugging_face.is_none() {
            return Err(format!(
                "variant {:?}: sha256 applies only to downloaded sources (url, huggingFace)",
                v.name
            ));
        }
    }
    if total != 100 {
        return Err(format!("variant weights sum to {total}, not 100"));
    }
    if spec.replicas.is_some() && spec.autoscaling.is_some() {
        return Err("set either replicas or autoscaling, not both".to_owned());
    }
    if let Some(a) = &spec.autoscaling
        && a.min_replicas > a.max_replicas
    {
        return Err(format!(
            "autoscaling.minReplicas {} exceeds maxReplicas {}",
            a.min_replicas, a.max_replicas
        ));
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Everything the operator applies for `model` in `namespace`, given the effective limits of
/// the RateLimitPolicies that target it (identity, rules, the key Secret to mount) and the
/// observed ready pods per variant. Owner references are set when the model
/// has a UID (it came from the cluster), so deleting the model deletes them.
pub fn desired(
    model: &InferenceModel,
    namespace: &str,
    settings: &Settings,
    limits: &ModelLimits,
    ready: &ReadyCounts,
) -> Result<Desired> {
    validate(model).map_err(Error::InvalidSpec)?;
    let name = model
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingField("metadata.name"))?;
    let sidecar_config = desired_sidecar_config(model, namespace, limits, ready)?;
    let r = Renderer {
        model,
        name,
        namespace,
        settings,
        limits,
    };

    let mut services = vec![r.service(None)];
    let mut deployments = Vec::with_capacity(model.spec.variants.len());
    let mut autoscalers = Vec::new();
    for v in &model.spec.variants {
        services.push(r.service(Some(v)));
        deployments.push(r.deployment(v)?);
        if let Some(hpa) = r.autoscaler(v) {
            autoscalers.push(hpa);
        }
    }
    let mut out = Desired {
        service_account: r.service_account(),
        role: r.role(),
        role_binding: r.role_binding(),
        config_map: r.config_map(&sidecar_config)?,
        sidecar_config,
        services,
        deployments,
        autoscalers,
    };
    stamp(&mut out.service_account)?;
    stamp(&mut out.role)?;
    stamp(&mut out.role_binding)?;
    stamp(&mut out.config_map)?;
    for s in &mut out.services {
        stamp(s)?;
    }
    for d in &mut out.deployments {
        stamp(d)?;
    }
    for h in &mut out.autoscalers {
        stamp(h)?;
    }
    Ok(out)
}

/// Hex SHA-256 (first 16 digits) of a value's JSON encoding.
pub fn content_hash(value: &impl Serialize) -> Result<String> {
    let bytes = serde_json::to_vec(value)?;
    let digest = Sha256::digest(&bytes);
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Sets [`ANNOTATION_APPLIED_HASH`] to the hash of the object without it.
fn stamp<K: Resource + Serialize>(obj: &mut K) -> Result<()> {
    obj.annotations_mut().remove(ANNOTATION_APPLIED_HASH);
    let hash = content_hash(obj)?;
    obj.annotations_mut()
        .insert(ANNOTATION_APPLIED_HASH.to_owned(), hash);
    Ok(())
}

/// Renders one model's objects; holds what every function needs.
struct Renderer<'a> {
    model: &'a InferenceModel,
    name: &'a str,
    namespace: &'a str,
    settings: &'a Settings,
    limits: &'a ModelLimits,
}

// === impl Renderer ===

impl Renderer<'_> {
    fn labels(&self, variant: Option<&Variant>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_owned(),
                "sluice-sidecar".to_owned(),
            ),
            (
                "app.kubernetes.io/instance".to_owned(),
                self.name.to_owned(),
            ),
            (
                "app.kubernetes.io/component".to_owned(),
                "inference".to_owned(),
            ),
            ("app.kubernetes.io/part-of".to_owned(), "sluice".to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                MANAGED_BY.to_owned(),
            ),
            (LABEL_MODEL.to_owned(), self.name.to_owned()),
        ]);
        if let Some(v) = variant {
            l.insert(LABEL_VARIANT.to_owned(), v.name.clone());
        }
        l
    }

    fn selector(&self, variant: Option<&Variant>) -> BTreeMap<String, String> {
        let mut s = BTreeMap::from([(LABEL_MODEL.to_owned(), self.name.to_owned())]);
        if let Some(v) = variant {
            s.insert(LABEL_VARIANT.to_owned(), v.name.clone());
        }
        s
    }

    fn meta(&self, name: String, variant: Option<&Variant>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_owned()),
            labels: Some(self.labels(variant)),
            owner_references: self.model.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        }
    }

    fn service_account(&self) -> ServiceAccount {
        ServiceAccount {
            metadata: self.meta(sidecar_account_name(self.name), None),
            ..Default::default()
        }
    }

    fn role(&self) -> Role {
        Role {
            metadata: self.meta(sidecar_account_name(self.name), None),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".to_owned()]),
                resource_names: Some(vec![config_map_name(self.name)]),
                verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
                ..Default::default()
            }]),
        }
    }

    fn role_binding(&self) -> RoleBinding {
        let account = sidecar_account_name(self.name);
        RoleBinding {
            metadata: self.meta(account.clone(), None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".to_owned(),
                kind: "Role".to_owned(),
                name: account.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".to_owned(),
                name: account,
                namespace: Some(self.namespace.to_owned()),
                ..Default::default()
            }]),
        }
    }

    fn config_map(&self, config: &SidecarConfig) -> Result<ConfigMap> {
        Ok(ConfigMap {
            metadata: self.meta(config_map_name(self.name), None),
            data: Some(BTreeMap::from([(
                SIDECAR_CONFIG_KEY.to_owned(),
                config.to_json()?,
            )])),
            ..Default::default()
        })
    }

    fn service(&self, variant: Option<&Variant>) -> Service {
        let name = match variant {
            Some(v) => variant_object_name(self.name, &v.name),
            None => self.name.to_owned(),
        };
        let port = |name: &str, port: i32, target: &str| ServicePort {
            name: Some(name.to_owned()),
            port,
            target_port: Some(IntOrString::String(target.to_owned())),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        };
        Service {
            metadata: self.meta(name, variant),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".to_owned()),
                selector: Some(self.selector(variant)),
                ports: Some(vec![
                    port("http", API_PORT, "http"),
                    port("metrics", ADMIN_PORT, "admin"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        }
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

    fn resources(&self, with_gpu: bool) -> Option<ResourceRequirements> {
        let r = self.model.spec.resources.as_ref()?;
        let mut requests = BTreeMap::new();
        let mut limits = BTreeMap::new();
        if let Some(cpu) = &r.cpu {
            requests.insert("cpu".to_owned(), cpu.clone());
            limits.insert("cpu".to_owned(), cpu.clone());
        }
        if let Some(mem) = &r.memory {
            requests.insert("memory".to_owned(), mem.clone());
            limits.insert("memory".to_owned(), mem.clone());
        }
        let gpus = self.gpu_count();
        if with_gpu && gpus > 0 {
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

    fn deployment(&self, v: &Variant) -> Result<Deployment> {
        let image = self.image(v);
        let gpus = self.gpu_count();
        let (model_volume, model_path, fetch) = self.model_volume(v);
        let config_map = config_map_name(self.name);
        // The API-key Secret of the model's identity, if any: only a change of that mount (not
        // of limits) changes the pod template.
        let (key_volumes, key_mounts): (Vec<Volume>, Vec<VolumeMount>) =
            key_secret_volumes(self.limits.keys.as_ref())
                .into_iter()
                .unzip();

        let mut args = vec![
            "serve".to_owned(),
            "--model".to_owned(),
            model_path,
            "--served-name".to_owned(),
            self.model.served_name(),
            "--variant".to_owned(),
            v.name.clone(),
            "--configmap".to_owned(),
            format!("{}/{config_map}", self.namespace),
            "--listen".to_owned(),
            format!("0.0.0.0:{API_PORT}"),
            "--admin-listen".to_owned(),
            format!("0.0.0.0:{ADMIN_PORT}"),
            "--forward-token-file".to_owned(),
            format!("{FORWARDING_DIR}/{FORWARDING_KEY}"),
            "--cache-dir".to_owned(),
            CACHE_DIR.to_owned(),
        ];
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
        let sidecar = Container {
            name: "sidecar".to_owned(),
            image: Some(image),
            args: Some(args),
            env: Some(
                downward_env()
                    .into_iter()
                    // The engine (mistral.rs) never contacts a model hub: weights are local.
                    .chain([EnvVar {
                        name: "HF_HUB_OFFLINE".to_owned(),
                        value: Some("1".to_owned()),
                        ..Default::default()
                    }])
                    .collect(),
            ),
            ports: Some(vec![
                container_port("http", API_PORT),
                container_port("admin", ADMIN_PORT),
            ]),
            resources: self.resources(true),
            // Loading weights takes a while: up to 60 × 5s before liveness applies.
            startup_probe: Some(probe("/readyz", 5, 60)),
            readiness_probe: Some(probe("/readyz", 5, 3)),
            liveness_probe: Some(probe("/healthz", 10, 3)),
            security_context: Some(restricted_security_context()),
            volume_mounts: Some(
                vec![
                    VolumeMount {
                        name: "models".to_owned(),
                        mount_path: model_volume.mount_path.clone(),
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
        };
        let init_containers = fetch.map(|args| {
            vec![Container {
                name: "fetch".to_owned(),
                image: sidecar.image.clone(),
                args: Some(args),
                resources: self.resources(false),
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
            }]
        });

        let scheduling = self.model.spec.scheduling.clone().unwrap_or_default();
        let mut node_selector = scheduling.node_selector.clone();
        let mut tolerations = scheduling.tolerations.clone();
        if gpus > 0 {
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

        let pod_spec = PodSpec {
            service_account_name: Some(sidecar_account_name(self.name)),
            init_containers,
            containers: vec![sidecar],
            volumes: Some(
                vec![
                    model_volume.volume,
                    Volume {
                        name: "config".to_owned(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: config_map.clone(),
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
            affinity: scheduling.affinity.clone(),
            priority_class_name: scheduling.priority_class_name.clone(),
            ..Default::default()
        };
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

    /// The model volume, the `--model` path, and the fetch init container's args (downloaded
    /// sources only).
    fn model_volume(&self, v: &Variant) -> (ModelVolume, String, Option<Vec<String>>) {
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
            return (
                ModelVolume {
                    volume: volume(&|vol| {
                        vol.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                            claim_name: pvc.claim_name.clone(),
                            read_only: Some(true),
                        })
                    }),
                    mount_path: MODELS_DIR.to_owned(),
                },
                under_models(&pvc.path),
                None,
            );
        }
        if let Some(host_path) = &m.host_path {
            // The file itself is mounted, so the node directory's other files stay private.
            let file = format!("{MODELS_DIR}/{DOWNLOADED_FILE}");
            return (
                ModelVolume {
                    volume: volume(&|vol| {
                        vol.host_path = Some(HostPathVolumeSource {
                            path: host_path.clone(),
                            type_: Some("File".to_owned()),
                        })
                    }),
                    mount_path: file.clone(),
                },
                file,
                None,
            );
        }
        if let Some(image) = &m.image {
            return (
                ModelVolume {
                    volume: volume(&|vol| {
                        vol.image = Some(ImageVolumeSource {
                            reference: Some(image.reference.clone()),
                            pull_policy: Some("IfNotPresent".to_owned()),
                        })
                    }),
                    mount_path: MODELS_DIR.to_owned(),
                },
                under_models(&image.path),
                None,
            );
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
        (
            ModelVolume {
                volume: volume(&|vol| vol.empty_dir = Some(EmptyDirVolumeSource::default())),
                mount_path: MODELS_DIR.to_owned(),
            },
            out,
            Some(fetch),
        )
    }

    fn autoscaler(&self, v: &Variant) -> Option<HorizontalPodAutoscaler> {
        let a = self.model.spec.autoscaling.as_ref()?;
        let name = variant_object_name(self.name, &v.name);
        let mut metrics: Vec<MetricSpec> = a
            .metrics
            .iter()
            .map(|m| match m.type_ {
                AutoscalingMetricType::Cpu => cpu_metric(m.target),
                AutoscalingMetricType::InFlightRequests => {
                    pods_metric("sluice_requests_in_flight", m.target)
                }
                AutoscalingMetricType::TokensPerSecond => {
                    pods_metric("sluice_completion_tokens_per_second", m.target)
                }
            })
            .collect();
        if metrics.is_empty() {
            metrics.push(cpu_metric(80));
        }
        Some(HorizontalPodAutoscaler {
            metadata: self.meta(name.clone(), Some(v)),
            spec: Some(HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some("apps/v1".to_owned()),
                    kind: "Deployment".to_owned(),
                    name,
                },
                min_replicas: Some(a.min_replicas),
                max_replicas: a.max_replicas,
                metrics: Some(metrics),
                behavior: a.behavior.clone(),
            }),
            ..Default::default()
        })
    }
}

/// A variant's model volume and where the sidecar container mounts it.
struct ModelVolume {
    volume: Volume,
    mount_path: String,
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
    args
}

fn cpu_metric(target: i32) -> MetricSpec {
    MetricSpec {
        type_: "Resource".to_owned(),
        resource: Some(ResourceMetricSource {
            name: "cpu".to_owned(),
            target: MetricTarget {
                type_: "Utilization".to_owned(),
                average_utilization: Some(target),
                ..Default::default()
            },
        }),
        ..Default::default()
    }
}

fn pods_metric(name: &str, target: i32) -> MetricSpec {
    MetricSpec {
        type_: "Pods".to_owned(),
        pods: Some(PodsMetricSource {
            metric: MetricIdentifier {
                name: name.to_owned(),
                selector: None,
            },
            target: MetricTarget {
                type_: "AverageValue".to_owned(),
                average_value: Some(Quantity(target.to_string())),
                ..Default::default()
            },
        }),
        ..Default::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
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

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..Default::default()
    }
}

/// The `restricted` Pod Security Standard, per container.
fn restricted_security_context() -> SecurityContext {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{model_from_yaml, settings};

    const TWO_VARIANTS: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns, uid: "1234"}
spec:
  replicas: 2
  resources: {cpu: "2", memory: 1Gi}
  variants:
    - name: stable
      weight: 90
      model: {url: "https://example.com/a.gguf"}
      engine: {contextLength: 2048}
    - name: canary
      weight: 10
      model: {pvc: {claimName: weights, path: b.gguf}}
"#;

    fn render(yaml: &str) -> Desired {
        desired(
            &model_from_yaml(yaml),
            "ns",
            &settings(),
            &Default::default(),
            &ReadyCounts::none(),
        )
        .expect("renders")
    }

    fn container(d: &Deployment) -> &Container {
        &d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
            .containers[0]
    }

    fn template_hash(d: &Deployment) -> String {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .expect("template meta")
            .annotations
            .as_ref()
            .expect("annotations")[ANNOTATION_VARIANT_HASH]
            .clone()
    }

    #[test]
    fn names_owner_refs_and_sidecar_args() {
        let d = render(TWO_VARIANTS);
        let names: Vec<_> = d.services.iter().map(|s| s.name_any()).collect();
        assert_eq!(names, ["chat", "chat-stable", "chat-canary"]);
        assert_eq!(d.deployments[0].name_any(), "chat-stable");
        assert_eq!(d.config_map.name_any(), "chat-sidecar-config");
        assert_eq!(d.service_account.name_any(), "chat-sidecar");
        assert_eq!(d.deployments[0].owner_references()[0].uid, "1234");
        let args = container(&d.deployments[0]).args.clone().expect("args");
        assert_eq!(
            args.join(" "),
            "serve --model /models/model.gguf --served-name chat --variant stable \
             --configmap ns/chat-sidecar-config --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090 \
             --forward-token-file /etc/sluice/forwarding/token --cache-dir /tmp/sluice-cache \
             --context-length 2048"
        );
        let canary = container(&d.deployments[1]).args.clone().expect("args");
        assert_eq!(canary[2], "/models/b.gguf");
        assert_eq!(
            d.deployments[0].spec.as_ref().and_then(|s| s.replicas),
            Some(2)
        );
        assert!(d.autoscalers.is_empty());
    }

    #[test]
    fn weight_change_changes_only_the_config_map() {
        let a = render(TWO_VARIANTS);
        let b = render(
            &TWO_VARIANTS
                .replace("weight: 90", "weight: 80")
                .replace("weight: 10", "weight: 20"),
        );
        assert_ne!(a.config_map, b.config_map);
        assert_eq!(a.deployments, b.deployments, "weights must never roll pods");
        assert_eq!(a.services, b.services);
    }

    #[test]
    fn model_change_rolls_only_that_variant() {
        let a = render(TWO_VARIANTS);
        let b = render(&TWO_VARIANTS.replace("a.gguf", "a2.gguf"));
        assert_ne!(
            template_hash(&a.deployments[0]),
            template_hash(&b.deployments[0])
        );
        assert_eq!(a.deployments[1], b.deployments[1]);
    }

    #[test]
    fn gpu_adds_limit_selector_toleration_and_cuda_image() {
        let yaml = TWO_VARIANTS.replace(
            "resources: {cpu: \"2\", memory: 1Gi}",
            "resources: {cpu: \"2\", memory: 1Gi, gpu: {count: 1, product: NVIDIA-H100}}\n  scheduling: {nodeSelector: {pool: a}}",
        );
        let d = render(&yaml);
        let pod = d.deployments[0]
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .expect("pod");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("sidecar-cuda:test"));
        let limits = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .expect("limits");
        assert_eq!(limits[GPU_RESOURCE], Quantity("1".into()));
        let ns = pod.node_selector.expect("selector");
        assert_eq!(ns[GPU_PRODUCT_LABEL], "NVIDIA-H100");
        assert_eq!(ns["pool"], "a");
        assert!(
            pod.tolerations
                .expect("tolerations")
                .iter()
                .any(|t| t.key.as_deref() == Some(GPU_RESOURCE))
        );
        // The fetch init container never asks for a GPU.
        let init = &pod.init_containers.expect("init")[0];
        assert!(
            init.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .is_some_and(|l| !l.contains_key(GPU_RESOURCE))
        );
    }

    #[test]
    fn autoscaling_omits_replicas_and_renders_hpas() {
        let yaml = TWO_VARIANTS.replace(
            "replicas: 2",
            "autoscaling: {minReplicas: 1, maxReplicas: 3, metrics: [{type: CPU, target: 70}, {type: TokensPerSecond, target: 50}], behavior: {scaleDown: {stabilizationWindowSeconds: 600}}}",
        );
        let d = render(&yaml);
        assert_eq!(
            d.deployments[0].spec.as_ref().and_then(|s| s.replicas),
            None
        );
        assert_eq!(d.autoscalers.len(), 2);
        let spec = d.autoscalers[1].spec.clone().expect("spec");
        assert_eq!(spec.scale_target_ref.name, "chat-canary");
        let metrics = spec.metrics.expect("metrics");
        assert_eq!(
            metrics[1].pods.as_ref().expect("pods").metric.name,
            "sluice_completion_tokens_per_second"
        );
        assert_eq!(
            spec.behavior
                .and_then(|b| b.scale_down)
                .and_then(|s| s.stabilization_window_seconds),
            Some(600)
        );
    }

    #[test]
    fn huggingface_source_becomes_a_resolve_url() {
        let yaml = TWO_VARIANTS.replace(
            "{url: \"https://example.com/a.gguf\"}",
            "{huggingFace: {repo: o/r, file: m.gguf, revision: abc}, sha256: \"AB00000000000000000000000000000000000000000000000000000000000000\"}",
        );
        let d = render(&yaml);
        let pod = d.deployments[0]
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .expect("pod");
        let args = pod.init_containers.expect("init")[0]
            .args
            .clone()
            .expect("args");
        assert_eq!(
            args.join(" "),
            "fetch --url https://huggingface.co/o/r/resolve/abc/m.gguf --sha256 ab00000000000000000000000000000000000000000000000000000000000000 --out /models/model.gguf"
        );
    }

    #[test]
    fn invalid_specs_are_rejected_with_the_reason() {
        let bad = TWO_VARIANTS.replace("weight: 10", "weight: 20");
        let err = desired(
            &model_from_yaml(&bad),
            "ns",
            &settings(),
            &Default::default(),
            &ReadyCounts::none(),
        )
        .expect_err("weights sum to 110");
        assert!(err.to_string().contains("sum to 110"), "{err}");
        let bad = TWO_VARIANTS.replace("name: canary", "name: stable");
        assert!(
            validate(&model_from_yaml(&bad))
                .expect_err("dup")
                .contains("unique")
        );
    }

    #[test]
    fn rendering_is_deterministic() {
        assert_eq!(
            render(TWO_VARIANTS).to_yaml().expect("yaml"),
            render(TWO_VARIANTS).to_yaml().expect("yaml")
        );
    }
}
