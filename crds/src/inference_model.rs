//! `InferenceModel`: one model id served to clients, backed by one or more weighted variants.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::lifecycle::{REQUEST_TIMEOUT_SECS, drain_grace_secs};
use crate::quantity::parse_bytes;

/// Sequences the engine batches at once when `engine.maxConcurrentSequences` is unset: the
/// sidecar's `--max-seqs` default, and what the operator counts on for such variants.
pub const DEFAULT_MAX_CONCURRENT_SEQUENCES: u32 = 16;

/// A model served over the OpenAI API, split into weighted variants (e.g. `stable` and a
/// `canary` with a new quantisation). The operator runs one Deployment per variant, a Service
/// for the model and one per variant, autoscalers, and the sidecar config that routes traffic.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "InferenceModel",
    plural = "inferencemodels",
    shortname = "im",
    namespaced,
    status = "InferenceModelStatus",
    derive = "PartialEq",
    doc = "A quantized LLM served over the OpenAI API, split into weighted variants.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.readyVariants", description = "Variants with ready pods / variants"),
    printcolumn(name = "Weights", type_ = "string", json_path = ".status.weights", description = "Per variant: desired/effective weight"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS label of at most 40 characters starting with a letter: it names the model's Services and Deployments"),
    validation = Rule::new("!has(self.spec.fallback) || self.spec.fallback.model != self.metadata.name").message("spec.fallback.model must name another InferenceModel, not this one"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("set either replicas or autoscaling, not both"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || (has(self.resources) && has(self.resources.cpu)) || (has(self.autoscaling.metrics) && size(self.autoscaling.metrics) > 0 && self.autoscaling.metrics.all(m, m.type != 'CPU'))").message("autoscaling on CPU (the default metric) needs resources.cpu: utilisation is a percentage of the CPU request"))]
pub struct InferenceModelSpec {
    /// The model id clients send in OpenAI requests (`"model": ...`) and see in `GET /v1/models`.
    /// Defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub served_name: Option<String>,

    /// The variants that serve this model. Weights are percentages of traffic and must sum to 100;
    /// edit them to shift traffic (no pod restarts). Names must be unique.
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(validation = Rule::new("self.all(v, self.exists_one(w, w.name == v.name))").message("variant names must be unique"))]
    #[x_kube(validation = Rule::new("self.map(v, v.weight).sum() == 100").message("variant weights must sum to 100"))]
    pub variants: Vec<Variant>,

    /// Compute for every pod of every variant. GPUs add the `nvidia.com/gpu` limit, a node
    /// selector for the product and the GPU toleration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,

    /// Where pods may run; merged with what the GPU settings imply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<Scheduling>,

    /// Fixed pod count per variant (default 1). Mutually exclusive with `autoscaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,

    /// A HorizontalPodAutoscaler per variant. When set, the operator never writes `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,

    /// How the sidecars pick a variant for each request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,

    /// Canary analysis and automatic rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,

    /// Another InferenceModel in the namespace that takes this model's requests when it cannot:
    /// its engine queue is full, its saturation mark sheds the request, or no variant can be
    /// reached (their breakers open). At most once per request; limits are charged here, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,

    /// A response cache for deterministic requests (temperature 0, or a fixed `seed`): an
    /// identical request is answered from it without the engine, and identical requests
    /// arriving together share one generation. Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ResponseCache>,
    /// Who may call the model: API keys and JWT bearer tokens (checked against the issuers'
    /// key sets), and which tenants and roles may use which variants. Unset: callers are
    /// identified as a `RateLimitPolicy`'s `identity` says, or not at all. When set, it
    /// identifies callers (a policy's `identity` is not used) and its tenants and roles are
    /// what rate-limit rules match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<crate::auth::Auth>,
}

/// See `InferenceModelSpec.fallback`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// The InferenceModel's `metadata.name` (same namespace). Its answers carry its own
    /// `model` id and the `x-sluice-fallback` header.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub model: String,
}

/// See `InferenceModelSpec.cache`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.ttl) || duration(self.ttl) >= duration('1s')").message("cache.ttl must be at least 1s"))]
pub struct ResponseCache {
    /// Memory the cached answers may take per pod, e.g. `64Mi` (the default); least recently
    /// used answers are dropped first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<Quantity>,
    /// How long an answer stays, e.g. `10m` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Share answers between tenants. By default each tenant (API key owner) has its own
    /// entries, so one caller never learns what another asked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// One deployable flavour of the model (weights file, quantisation, engine settings) and its
/// share of traffic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Variant {
    /// Unique within the model; a DNS label (it names the variant's Deployment and Service).
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Percentage of requests this variant serves, 0..=100. All weights sum to 100.
    #[schemars(range(min = 0, max = 100))]
    pub weight: i32,

    /// Where the variant's GGUF weights come from.
    pub model: ModelSource,

    /// Engine settings for this variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSettings>,

    /// Overrides the sidecar image the operator is configured with (CPU or CUDA by GPU count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

/// Exactly one source of weights. `url` and `huggingFace` are downloaded by an init container
/// into an emptyDir; `pvc`, `hostPath` and `image` are mounted read-only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.url), has(self.huggingFace), has(self.pvc), has(self.hostPath), has(self.image)].filter(x, x).size() == 1").message("set exactly one model source: url, huggingFace, pvc, hostPath or image"))]
#[x_kube(validation = Rule::new("!has(self.sha256) || has(self.url) || has(self.huggingFace)").message("sha256 applies only to downloaded sources (url, huggingFace)"))]
pub struct ModelSource {
    /// An http(s) URL of a GGUF file, downloaded at pod start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub url: Option<String>,

    /// Expected SHA-256 of the downloaded file (64 hex digits); the download fails on mismatch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-fA-F0-9]{64}$"))]
    pub sha256: Option<String>,

    /// A file in a Hugging Face repository, downloaded at pod start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSource>,

    /// A PersistentVolumeClaim that holds the file, mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,

    /// An absolute path on the node (for pre-provisioned nodes), mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096), regex(pattern = r"^/"))]
    pub host_path: Option<String>,

    /// An OCI image that carries the file, mounted as an image volume (Kubernetes >= 1.31 with
    /// the ImageVolume feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,

    /// Weights format. Only `gguf` is supported.
    #[serde(default)]
    pub format: ModelFormat,

    /// The weights file's size, e.g. `4700Mi`. Where `resources.memory` is not set, the pod's
    /// memory request is derived from it (the file, mapped into memory, plus the engine's
    /// working memory); GPU pods get a start-up allowance that grows with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
}

/// A file in a Hugging Face repository.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// `owner/name` of the repository.
    #[schemars(
        length(max = 256),
        regex(pattern = r"^[A-Za-z0-9][-_.A-Za-z0-9]*/[-_.A-Za-z0-9]+$")
    )]
    pub repo: String,
    /// Path of the GGUF file inside the repository.
    #[schemars(length(min = 1, max = 1024))]
    pub file: String,
    /// Branch, tag or commit (default `main`); pin a commit for reproducible rollouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub revision: Option<String>,
}

/// A file on a PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the claim, in the model's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Path of the GGUF file relative to the volume root.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

/// A file inside an OCI image, mounted as an image volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    /// Image reference, e.g. `registry.example.com/models/smollm2:q4_1`.
    #[schemars(length(min = 1, max = 512))]
    pub reference: String,
    /// Path of the GGUF file inside the image.
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

/// The weights format.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// GGUF, quantized or not (tokenizer and chat template read from the file).
    #[default]
    Gguf,
}

/// Engine settings for a variant; unset fields use the sidecar's defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.requestTimeout) || duration(self.requestTimeout) > duration('0s')").message("requestTimeout must be positive"))]
#[x_kube(validation = Rule::new("!has(self.firstTokenTimeout) || duration(self.firstTokenTimeout) > duration('0s')").message("firstTokenTimeout must be positive"))]
#[x_kube(validation = Rule::new("!has(self.firstTokenTimeout) || duration(self.firstTokenTimeout) <= (has(self.requestTimeout) ? duration(self.requestTimeout) : duration('300s'))").message("firstTokenTimeout must not exceed requestTimeout (default 5m)"))]
pub struct EngineSettings {
    /// Maximum context length in tokens (prompt + completion). Default: the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16))]
    pub context_length: Option<u32>,
    /// Sequences the engine batches at once (continuous batching). Default 16. Also where
    /// the model's sidecars start shedding: `Sheddable` requests are refused (503) once a pod
    /// has this many requests in flight, `Standard` ones at twice as many; with variants that
    /// differ, the smallest value of any variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_concurrent_sequences: Option<u32>,
    /// Completion tokens when a request sets no `max_tokens`. Default 2048 (capped by the context length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub default_max_tokens: Option<u32>,
    /// Sampling temperature when a request sets none (0..=2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Nucleus sampling when a request sets none (0..=1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: Option<f64>,
    /// Memory the engine's prefix cache may hold (KV caches of recent prompts, reused when a
    /// prompt starts the same way, e.g. a shared system prompt), e.g. `256Mi`; `0` turns it
    /// off. It is part of the pod's memory, so it must be less than `resources.memory`.
    /// Default: an eighth of the pod's memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_memory: Option<Quantity>,
    /// Time a request may take, queueing and generation included, e.g. `10m`. Past it the
    /// request ends with a `timeout` error (an error event on a stream), its engine work
    /// cancelled. Pods drain this long on shutdown (after a 5 s preStop sleep), so that a
    /// rollout never cuts a generation that could still finish. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
    /// Time a request may wait for its first token (queueing and prompt processing), e.g.
    /// `30s`; at most `requestTimeout`. Past it: a `timeout` error before any output. Default:
    /// `requestTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_timeout: Option<Duration>,
}

/// Compute per pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// CPU request (and limit), e.g. `2` or `1500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit, e.g. `2Gi`. Must hold the weights plus the KV cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// GPUs per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Gpu>,
}

/// NVIDIA GPUs per pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    /// `nvidia.com/gpu` per pod; 0 runs on CPU.
    #[schemars(range(min = 0, max = 16))]
    pub count: i32,
    /// GPU product, matched against the node label `nvidia.com/gpu.product`
    /// (e.g. `NVIDIA-H100-80GB-HBM3`). A label value: at most 63 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub product: Option<String>,
}

/// Placement, merged with what the GPU settings imply.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Node labels every pod requires.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added to the pods (the GPU toleration is added for GPU variants).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// A HorizontalPodAutoscaler per variant, and scale to zero when `minReplicas` is 0.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
#[x_kube(validation = Rule::new("self.minReplicas == 0 || (!has(self.idleAfter) && !has(self.activationTimeout))").message("idleAfter and activationTimeout apply only with minReplicas 0 (scale to zero)"))]
pub struct Autoscaling {
    /// Lower bound of pods per variant. 0 scales the model to zero after `idleAfter` without
    /// a request: an activator holds the next requests while a pod starts.
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Upper bound of pods per variant.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// With `minReplicas: 0`: how long the model serves no request before its Deployments are
    /// scaled to 0, e.g. `15m` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_after: Option<Duration>,
    /// With `minReplicas: 0`: how long the activator holds a request for a pod to become ready
    /// before answering 503 with `Retry-After`, e.g. `5m` (the default; room for the weights
    /// to load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_timeout: Option<Duration>,
    /// What to scale on. Default: CPU utilisation 80% (which needs `resources.cpu`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(validation = Rule::new("self.all(m, self.exists_one(n, n.type == m.type))").message("each metric type may appear once"))]
    pub metrics: Vec<AutoscalingMetric>,
    /// Scaling behaviour, passed through to the HorizontalPodAutoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<HorizontalPodAutoscalerBehavior>,
}

/// One scaling signal and its per-pod target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingMetric {
    /// The signal: `CPU` (average utilisation, percent of the CPU request), `InFlightRequests`
    /// (average requests in the engine per pod), `QueueDepth` (average requests waiting for
    /// an engine slot per pod) or `TokensPerSecond` (average generated tokens per second per
    /// pod); all but `CPU` need a custom metrics adapter such as prometheus-adapter.
    #[serde(rename = "type")]
    pub type_: AutoscalingMetricType,
    /// Target per pod: percent of the CPU request for `CPU`, requests in the engine for
    /// `InFlightRequests` (at most the variants' `maxConcurrentSequences`, which bounds it),
    /// requests waiting for `QueueDepth`, generated tokens per second for `TokensPerSecond`.
    #[schemars(range(min = 1))]
    pub target: i32,
}

/// Signals an autoscaler can follow. The in-flight and token metrics come from the sidecars
/// through the custom metrics API (e.g. prometheus-adapter).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoscalingMetricType {
    /// Average CPU utilisation, percent of the request.
    #[serde(rename = "CPU")]
    Cpu,
    /// Average requests in the engine per pod (`sluice_requests_in_flight`): at most
    /// `maxConcurrentSequences`, so a target must stay below it.
    InFlightRequests,
    /// Average requests waiting for an engine slot per pod (`sluice_queue_depth`): grows
    /// without bound under load, so it scales out whatever the batch size.
    QueueDepth,
    /// Average generated tokens per second per pod (`sluice_completion_tokens_per_second`).
    TokensPerSecond,
}

/// Routing controls for A/B tests and testers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Routing {
    /// Request header whose value pins a caller to a variant (consistent hashing: a weight change
    /// moves only the callers it must), e.g. `x-user-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub sticky_header: Option<String>,
    /// Request header that names the variant to use, for testers, e.g. `x-sluice-variant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub override_header: Option<String>,
    /// Circuit breaker of forwards between variants: after `consecutiveFailures` failed
    /// forwards to a variant in a row (no connection, a timeout, a 5xx answer), sidecars stop
    /// forwarding to it for `openFor` and serve its share where a failed forward falls back
    /// (their own variant, else another by weight); then the next forward decides whether it
    /// opens again or closes. Defaults: 5 failures, `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<Breaker>,
}

/// See `Routing.breaker`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.openFor) || duration(self.openFor) >= duration('1s')").message("openFor must be at least 1s"))]
pub struct Breaker {
    /// Failed forwards in a row that open the breaker. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: Option<u32>,
    /// How long an open breaker holds forwards back, e.g. `30s` (the default); at least `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<Duration>,
}

/// Canary analysis, rollback and progressive steps.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// How each variant's health is judged from its sidecars' metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
    /// Set a breaching variant's effective weight to 0 (spec is left untouched). Default true.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Progressive weights for the variant being rolled out, advanced while the analysis passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t.weight == s.weight)) && self.map(s, s.weight).isSorted()").message("step weights must strictly increase"))]
    pub steps: Vec<RolloutStep>,
}

/// One progressive step.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// Weight of the new variant during this step, 1..=100.
    #[schemars(range(min = 1, max = 100))]
    pub weight: i32,
    /// How long the analysis must pass before the next step, e.g. `5m`.
    pub pause: Duration,
}

/// Thresholds a variant must stay within.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// How often metrics are read, e.g. `30s`.
    #[serde(default = "default_interval")]
    pub interval: Duration,
    /// The window the rates are computed over, e.g. `5m`.
    #[serde(default = "default_window")]
    pub window: Duration,
    /// Highest tolerated fraction of 5xx answers in the window (0..=1), e.g. 0.05.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: Option<f64>,
    /// Highest tolerated 95th percentile time to first token, e.g. `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttft_p95: Option<Duration>,
    /// Requests a variant must have served in the window before it is judged.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1))]
    pub min_requests: i32,
}

fn default_true() -> bool {
    true
}
fn default_interval() -> Duration {
    std::time::Duration::from_secs(30).into()
}
fn default_window() -> Duration {
    std::time::Duration::from_secs(300).into()
}
fn default_min_requests() -> i32 {
    20
}

/// What the operator observed and decided.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InferenceModelStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, with reasons such as `Unschedulable`,
    /// `WeightsFetchFailed`, `InvalidSpec`, `CanaryRolledBack`, `BreakerOpen`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per variant: weights and pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantStatus>,
    /// The in-cluster base URL clients use, e.g. `http://chat.default.svc:8080/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Variants with ready pods / variants, for `kubectl get im`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_variants: Option<String>,
    /// `name=desired/effective` per variant, for `kubectl get im`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// What the canary analysis decided for the current spec generation: rolled-back variants
    /// and the progressive step. Reset when the spec changes (a new `metadata.generation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// With `autoscaling.minReplicas: 0`: when the operator last saw the model serve a request
    /// (or a request wake it); it scales to zero `idleAfter` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request_time: Option<Time>,
    /// With `autoscaling.minReplicas: 0`: the model's Deployments are at 0 replicas, and its
    /// activator holds the next request while a pod starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scaled_to_zero: bool,
}

/// Canary analysis and progressive rollout state for one spec generation. The operator keeps it
/// in status (never in spec), so Git stays the source of truth.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The `metadata.generation` this state belongs to; a newer generation starts a fresh
    /// analysis (rollbacks cleared, steps restarted).
    pub generation: i64,
    /// Variants rolled back (effective weight 0) by the analysis, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rolled_back: Vec<RolledBackVariant>,
    /// Index into `spec.rollout.steps` of the step in force; absent without steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
    /// When the step in force started; its pause counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<Time>,
    /// The variant the steps apply to (the one being rolled out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_variant: Option<String>,
    /// A breach the analysis found but did not roll back (`autoRollback` off, or the variant is
    /// the last one serving traffic), with the measured numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A variant the analysis took out of traffic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolledBackVariant {
    /// The variant's name.
    pub name: String,
    /// What was measured, e.g. `error rate 12.0% > 5.0% over 40 requests in 5m`.
    pub reason: String,
}

/// A variant's weights and pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VariantStatus {
    /// The variant's name.
    pub name: String,
    /// The weight in spec.
    pub desired_weight: i32,
    /// The weight the sidecars route with (0 after a rollback or without ready pods).
    pub effective_weight: i32,
    /// Pods ready to serve.
    pub ready_replicas: i32,
    /// Pods that exist.
    pub replicas: i32,
    /// Pods whose circuit breaker holds their forwards to this variant back (forwards there
    /// failed `routing.breaker.consecutiveFailures` times in a row), as the operator's last
    /// scrape of the sidecars found them; absent when none. Those pods serve that traffic where
    /// a failed forward falls back, and while the variant has an effective weight the
    /// `Degraded` condition says `BreakerOpen` (unless a more pressing reason holds it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub breaker_open_pods: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

// === impl InferenceModel ===

impl InferenceModel {
    /// The model id clients send: `spec.servedName`, else metadata.name.
    pub fn served_name(&self) -> String {
        self.spec
            .served_name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }

    /// Checks what the CRD schema and CEL rules above check (and what they cannot: the prefix
    /// cache budget against the pod's memory), so a model applied without them (or read from a
    /// file by `sluice-operator render`) fails with the same reason instead of producing broken
    /// objects. The error is the reason, as the status reports it.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.metadata.name.as_deref().unwrap_or_default();
        if !is_dns_label(name) || name.len() > 40 {
            return Err(format!(
                "metadata.name {name:?} must be a DNS label of at most 40 characters starting with a letter"
            ));
        }
        let spec = &self.spec;
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
            if let Some(size) = &m.size {
                parse_bytes(&size.0)
                    .map_err(|e| format!("variant {:?}: model.size {e}", v.name))?;
            }
            check_prefix_cache_memory(v, spec.resources.as_ref())?;
            check_timeouts(v)?;
        }
        if total != 100 {
            return Err(format!("variant weights sum to {total}, not 100"));
        }
        if let Some(open_for) = spec
            .routing
            .as_ref()
            .and_then(|r| r.breaker.as_ref())
            .and_then(|b| b.open_for)
            && (open_for.is_negative() || std::time::Duration::from(open_for).as_secs() < 1)
        {
            return Err("routing.breaker.openFor must be at least 1s".to_owned());
        }
        if let Some(f) = &spec.fallback
            && (f.model == name || !is_dns_label(&f.model) || f.model.len() > 40)
        {
            return Err(format!(
                "spec.fallback.model {:?} must name another InferenceModel (a DNS label of at \
                 most 40 characters), not this one",
                f.model
            ));
        }
        if let Some(c) = &spec.cache {
            c.limits()?;
        }
        if spec.replicas.is_some() && spec.autoscaling.is_some() {
            return Err("set either replicas or autoscaling, not both".to_owned());
        }
        if let Some(a) = &spec.autoscaling {
            a.check(spec)?;
        }
        if let Some(auth) = &spec.auth {
            auth.validate(&seen.iter().copied().collect::<Vec<_>>())?;
        }
        Ok(())
    }
}

impl InferenceModelSpec {
    /// The autoscaling of a model that scales to zero when idle (`minReplicas: 0`).
    pub fn scale_to_zero(&self) -> Option<&Autoscaling> {
        self.autoscaling.as_ref().filter(|a| a.min_replicas == 0)
    }
}

impl Autoscaling {
    /// What would make the autoscalers never act: bounds out of order, a CPU target on pods
    /// with no CPU request (utilisation is a percentage of it), an in-flight target no pod can
    /// reach (the engine runs at most `maxConcurrentSequences`; more requests queue).
    fn check(&self, spec: &InferenceModelSpec) -> Result<(), String> {
        if self.min_replicas > self.max_replicas {
            return Err(format!(
                "autoscaling.minReplicas {} exceeds maxReplicas {}",
                self.min_replicas, self.max_replicas
            ));
        }
        if self.min_replicas > 0 && (self.idle_after.is_some() || self.activation_timeout.is_some())
        {
            return Err(
                "autoscaling.idleAfter and activationTimeout apply only with minReplicas 0 (scale to zero)"
                    .to_owned(),
            );
        }
        for (field, value) in [
            ("idleAfter", self.idle_after),
            ("activationTimeout", self.activation_timeout),
        ] {
            if let Some(d) = value
                && (d.is_negative() || std::time::Duration::from(d).as_secs() < 1)
            {
                return Err(format!("autoscaling.{field} must be at least 1s"));
            }
        }
        let has_cpu_request = spec.resources.as_ref().is_some_and(|r| r.cpu.is_some());
        let cpu = self.metrics.is_empty()
            || self
                .metrics
                .iter()
                .any(|m| m.type_ == AutoscalingMetricType::Cpu);
        if cpu && !has_cpu_request {
            return Err(
                "autoscaling on CPU (the default metric) needs resources.cpu: utilisation is a \
                 percentage of the CPU request; set resources.cpu or choose InFlightRequests, \
                 QueueDepth or TokensPerSecond"
                    .to_owned(),
            );
        }
        for m in &self.metrics {
            if m.type_ != AutoscalingMetricType::InFlightRequests {
                continue;
            }
            for v in &spec.variants {
                let max = v.max_concurrent_sequences();
                // The HPA acts on a ratio above 1.1 (its default tolerance): a pod must be able
                // to run more than 10% over the target.
                if i64::from(m.target) * 11 >= i64::from(max) * 10 {
                    return Err(format!(
                        "autoscaling InFlightRequests target {} leaves no room under variant \
                         {:?}'s maxConcurrentSequences {max}: a pod never runs more, and the \
                         autoscaler acts only 10% above the target, so it would never scale out; \
                         lower the target or scale on QueueDepth",
                        m.target, v.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// `idleAfter`, default filled in.
    pub fn idle_after(&self) -> std::time::Duration {
        self.idle_after.map_or(
            std::time::Duration::from_secs(u64::from(crate::activation::DEFAULT_IDLE_AFTER_SECS)),
            std::time::Duration::from,
        )
    }

    /// `activationTimeout` in whole seconds, default filled in.
    pub fn activation_timeout_secs(&self) -> u64 {
        self.activation_timeout.map_or(
            u64::from(crate::activation::DEFAULT_HOLD_TIMEOUT_SECS),
            |d| std::time::Duration::from(d).as_secs(),
        )
    }
}

/// Default `cache.maxSize`: room for thousands of typical chat answers.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// Default `cache.ttl`, seconds.
pub const DEFAULT_CACHE_TTL_SECS: u32 = 600;

impl ResponseCache {
    /// Bytes and seconds, defaults filled in; an error names a size that does not parse or a
    /// TTL under a second.
    pub fn limits(&self) -> Result<(u64, u32), String> {
        let bytes = match &self.max_size {
            Some(q) => parse_bytes(&q.0).map_err(|e| format!("cache.maxSize {e}"))?,
            None => DEFAULT_CACHE_BYTES,
        };
        let ttl = match self.ttl {
            Some(d) if d.is_negative() || std::time::Duration::from(d).as_secs() < 1 => {
                return Err("cache.ttl must be at least 1s".to_owned());
            }
            Some(d) => u32::try_from(std::time::Duration::from(d).as_secs()).unwrap_or(u32::MAX),
            None => DEFAULT_CACHE_TTL_SECS,
        };
        Ok((bytes, ttl))
    }
}

/// `engine.requestTimeout` and `firstTokenTimeout`: positive, and the first token no later
/// than the whole request (the CEL rules on `EngineSettings`).
fn check_timeouts(v: &Variant) -> Result<(), String> {
    let Some(e) = &v.engine else {
        return Ok(());
    };
    for (field, value) in [
        ("requestTimeout", &e.request_timeout),
        ("firstTokenTimeout", &e.first_token_timeout),
    ] {
        if let Some(d) = value
            && (d.is_negative() || std::time::Duration::from(*d).is_zero())
        {
            return Err(format!(
                "variant {:?}: engine.{field} must be positive",
                v.name
            ));
        }
    }
    if let Some(first) = e.first_token_timeout
        && std::time::Duration::from(first) > v.request_timeout()
    {
        return Err(format!(
            "variant {:?}: engine.firstTokenTimeout must not exceed requestTimeout ({}s)",
            v.name,
            v.request_timeout().as_secs_f64()
        ));
    }
    Ok(())
}

// === impl Variant ===

impl Variant {
    /// The weights file's size in bytes (`model.size`), when given (and valid).
    pub fn model_size_bytes(&self) -> Option<u64> {
        self.model
            .size
            .as_ref()
            .and_then(|q| parse_bytes(&q.0).ok())
    }

    /// The sequences this variant's engine runs at once: `engine.maxConcurrentSequences`, else
    /// the sidecar's default.
    pub fn max_concurrent_sequences(&self) -> u32 {
        self.engine
            .as_ref()
            .and_then(|e| e.max_concurrent_sequences)
            .unwrap_or(DEFAULT_MAX_CONCURRENT_SEQUENCES)
    }

    /// How long this variant's requests may take: `engine.requestTimeout`, else the sidecar's
    /// default ([`REQUEST_TIMEOUT_SECS`]).
    pub fn request_timeout(&self) -> std::time::Duration {
        self.engine.as_ref().and_then(|e| e.request_timeout).map_or(
            std::time::Duration::from_secs(REQUEST_TIMEOUT_SECS.into()),
            std::time::Duration::from,
        )
    }

    /// How long this variant's requests may wait for their first token, when set.
    pub fn first_token_timeout(&self) -> Option<std::time::Duration> {
        self.engine
            .as_ref()
            .and_then(|e| e.first_token_timeout)
            .map(std::time::Duration::from)
    }

    /// The drain this variant's pods need on shutdown, in whole seconds: their request timeout
    /// (rounded up), so a rollout never cuts a generation that could still finish.
    pub fn drain_grace_secs(&self) -> u32 {
        let secs = self.request_timeout().as_secs_f64().ceil();
        drain_grace_secs(u32::try_from(secs as u64).unwrap_or(u32::MAX))
    }
}

/// The prefix cache lives in the pod's memory: its budget must parse and leave room for the
/// weights and the running sequences' KV caches.
fn check_prefix_cache_memory(v: &Variant, resources: Option<&Resources>) -> Result<(), String> {
    let Some(cache) = v
        .engine
        .as_ref()
        .and_then(|e| e.prefix_cache_memory.as_ref())
    else {
        return Ok(());
    };
    let cache_bytes = parse_bytes(&cache.0)
        .map_err(|e| format!("variant {:?}: engine.prefixCacheMemory {e}", v.name))?;
    if let Some(memory) = resources.and_then(|r| r.memory.as_ref())
        && let Ok(memory_bytes) = parse_bytes(&memory.0)
        && cache_bytes >= memory_bytes
    {
        return Err(format!(
            "variant {:?}: engine.prefixCacheMemory {} must be less than resources.memory {}: \
             the pod's memory also holds the weights and the running sequences",
            v.name, cache.0, memory.0
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

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    fn with_autoscaling(autoscaling: &str, engine: &str) -> InferenceModel {
        serde_yaml::from_str(&format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: InferenceModel\nmetadata: {{name: chat}}\n\
             spec:\n  autoscaling: {autoscaling}\n  variants:\n    - {{name: a, weight: 100, \
             model: {{pvc: {{claimName: m, path: m.gguf}}}}{engine}}}\n"
        ))
        .expect("model")
    }

    #[test]
    fn autoscalers_that_could_never_act_are_refused() {
        let in_flight = |target: u32, engine: &str| {
            with_autoscaling(
                &format!(
                    "{{minReplicas: 1, maxReplicas: 2, metrics: [{{type: InFlightRequests, target: {target}}}]}}"
                ),
                engine,
            )
            .validate()
        };
        // The default engine runs 16 sequences: the HPA acts 10% above the target.
        assert_eq!(in_flight(14, ""), Ok(()));
        let refused = in_flight(15, "").expect_err("no room above the target");
        assert!(refused.contains("maxConcurrentSequences 16"), "{refused}");
        assert!(in_flight(8, ", engine: {maxConcurrentSequences: 8}").is_err());
        assert_eq!(
            in_flight(7, ", engine: {maxConcurrentSequences: 32}"),
            Ok(())
        );
        // CPU, also as the default metric, needs a CPU request.
        let cpu = with_autoscaling("{minReplicas: 1, maxReplicas: 2}", "").validate();
        assert!(cpu.is_err_and(|e| e.contains("resources.cpu")));
        // Scale-to-zero settings only with minReplicas 0.
        let idle = |min: u32| {
            with_autoscaling(
                &format!(
                    "{{minReplicas: {min}, maxReplicas: 2, idleAfter: 5m, metrics: [{{type: QueueDepth, target: 4}}]}}"
                ),
                "",
            )
            .validate()
        };
        assert_eq!(idle(0), Ok(()));
        assert!(idle(1).is_err_and(|e| e.contains("minReplicas 0")));
    }

    #[test]
    fn the_documented_engine_default_is_the_constant() {
        let crd = serde_json::to_value(InferenceModel::crd()).expect("CRD serializes");
        let field = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["variants"]["items"]["properties"]["engine"]["properties"]["maxConcurrentSequences"];
        let doc = field["description"].as_str().expect("documented");
        assert!(
            doc.contains(&format!("Default {DEFAULT_MAX_CONCURRENT_SEQUENCES}.")),
            "{doc}"
        );
        let variant = |engine: Option<EngineSettings>| Variant {
            name: "v".into(),
            weight: 100,
            model: ModelSource::default(),
            engine,
            image: None,
        };
        assert_eq!(
            variant(None).max_concurrent_sequences(),
            DEFAULT_MAX_CONCURRENT_SEQUENCES
        );
        let eight = EngineSettings {
            max_concurrent_sequences: Some(8),
            ..Default::default()
        };
        assert_eq!(variant(Some(eight)).max_concurrent_sequences(), 8);
    }
}
