//! `RateLimitPolicy`: limits on requests, tokens and bytes, enforced by the sidecars of the
//! InferenceModels it targets.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Limits that apply to the requests of one or more InferenceModels, per tenant, API key,
/// variant or pod. Every rule that matches a request applies: the request must pass all of them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
// Every `printcolumn(..)` repeats keys such as `type_ = "string"`: not a duplicate.
#[allow(clippy::duplicated_attributes)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    plural = "ratelimitpolicies",
    shortname = "rlp",
    namespaced,
    status = "RateLimitPolicyStatus",
    derive = "PartialEq",
    doc = "Request, token and byte limits enforced by the sidecars of the targeted InferenceModels.",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.target",
        description = "Targeted InferenceModels"
    ),
    printcolumn(name = "Rules", type_ = "integer", json_path = ".status.rules"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Converged",
        type_ = "string",
        json_path = ".status.converged",
        description = "Pods enforcing this generation / pods"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.targetRef) != has(self.selector)").message("set exactly one of targetRef or selector"))]
pub struct RateLimitPolicySpec {
    /// The InferenceModel this policy applies to, in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,

    /// Or: every InferenceModel in the policy's namespace whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// Who the caller is. Default: the bearer token of `Authorization`, every caller its own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,

    /// The limits, at most 100. Names are unique within the policy.
    // maxItems bounds the API server's cost estimate of the uniqueness rule (quadratic in the
    // list length): at 1000 it exceeded the per-rule budget and the CRD would be refused.
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(s, s.name == r.name))").message("rule names must be unique"))]
    pub rules: Vec<RateLimitRule>,
}

/// A reference to the targeted object.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Only `InferenceModel`.
    #[serde(default)]
    pub kind: TargetKind,
    /// Name of the InferenceModel.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Kinds a policy can target.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum TargetKind {
    /// An `InferenceModel` in the same namespace.
    #[default]
    InferenceModel,
}

/// Where the caller's key comes from, and which keys are accepted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.source != 'Header' || has(self.header)").message("identity.header is required when source is Header"))]
pub struct Identity {
    /// `Bearer` (the `Authorization: Bearer <key>` header, as the OpenAI clients send it) or
    /// `Header` (the header named in `header`).
    #[serde(default)]
    pub source: IdentitySource,
    /// Header carrying the key when source is `Header`, e.g. `x-api-key` or `x-tenant-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub header: Option<String>,
    /// A Secret listing the accepted API keys and their tenants. When set, unknown keys get 401.
    /// Without it every distinct key is its own tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<SecretKeysRef>,
}

/// Where a caller's key is read from.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum IdentitySource {
    /// `Authorization: Bearer <key>`.
    #[default]
    Bearer,
    /// A named request header.
    Header,
}

/// A Secret in the policy's namespace whose entry `key` holds a YAML list of
/// `{key: <api key>, tenant: <tenant>}`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeysRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// The Secret's data entry, default `keys.yaml`.
    #[serde(default = "default_keys_entry")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_keys_entry() -> String {
    "keys.yaml".to_owned()
}

/// One limit (or several on the same bucket key). A request must pass every rule that matches.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.requestsPerSecond) || has(self.requestsPerMinute) || has(self.tokensPerMinute) || has(self.tokensPerDay) || has(self.maxConcurrent) || has(self.bytesPerSecond) || has(self.priority)").message("a rule needs at least one limit or a priority"))]
#[x_kube(validation = Rule::new("!has(self.burst) || has(self.requestsPerSecond) || has(self.requestsPerMinute) || has(self.tokensPerMinute) || has(self.bytesPerSecond)").message("burst applies only to rate limits"))]
pub struct RateLimitRule {
    /// Unique within the policy; reported in the `x-sluice-rule` header of a refusal.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Which requests the rule applies to. Empty: all requests.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<RuleMatch>,

    /// What one bucket counts: each tenant (default), each key, each variant, or the whole pod.
    #[serde(default)]
    pub per: BucketKey,

    /// Requests per second (token bucket, refilled continuously).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_second: Option<u32>,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u32>,
    /// Tokens (prompt + completion) per minute. Prompt + `max_tokens` is reserved at admission
    /// and the unused part refunded when the response ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
    /// Tokens per day, a quota: exhausted callers get `insufficient_quota`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_day: Option<u64>,
    /// Requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<u32>,
    /// Request plus response body bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub bytes_per_second: Option<u64>,
    /// Bucket capacity for the rate limits above, in their units (default: one interval's worth,
    /// e.g. `requestsPerMinute` for a per-minute rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u64>,
    /// Priority of the matched requests when the engine is saturated: `Sheddable` ones are
    /// refused first, `Critical` ones still get through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Count what the rule would refuse (`sluice_ratelimit_shadow_total`) but refuse nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// `Pod`: each pod enforces the limit on its own. `Cluster`: the limit is for all pods of the
    /// model together; each pod enforces its share.
    #[serde(default)]
    pub scope: Scope,
}

/// Conditions on a request; all given ones must hold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleMatch {
    /// Tenants (from the API-key Secret, or the key itself without one). Empty: any tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    /// Variants of the model. Empty: any variant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<String>,
    /// Roles (from `InferenceModel.spec.auth`: a JWT's roles claim or the keys list); the
    /// caller needs one of them. Empty: any roles, or none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Request priorities (as assigned by rules with `priority`). Empty: any priority.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priorities: Vec<Priority>,
}

/// What one bucket counts.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash,
)]
pub enum BucketKey {
    /// One bucket per tenant.
    #[default]
    Tenant,
    /// One bucket per API key.
    Key,
    /// One bucket per model variant.
    Variant,
    /// One bucket for the whole pod (or cluster, with scope `Cluster`).
    Pod,
}

/// Request priority under saturation.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum Priority {
    /// Refused first when the engine is saturated.
    Sheddable,
    /// The default.
    #[default]
    Standard,
    /// Admitted even when the engine is saturated.
    Critical,
}

/// Where a limit is counted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Scope {
    /// Each pod enforces the whole limit.
    #[default]
    Pod,
    /// The limit is shared by all pods of the model; each enforces its share.
    Cluster,
}

/// Whether the policy was accepted and reached the pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicyStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (or False with reasons `TargetNotFound`, `Conflict`, `KeysSecretNotFound`,
    /// `PolicyInvalid`) and `Converged`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Per targeted model: how many pods enforce the config generation that carries this policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<PolicyTarget>,
    /// Targeted model names, for `kubectl get rlp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Number of rules, for `kubectl get rlp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<i32>,
    /// `applied/total` pods over all targets, for `kubectl get rlp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged: Option<String>,
}

/// Convergence of one targeted model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTarget {
    /// The InferenceModel.
    pub model: String,
    /// The sidecar config generation that carries this policy.
    pub desired_generation: i64,
    /// Pods whose `sluice_config_generation` equals it.
    pub pods_applied: i32,
    /// Pods of the model.
    pub pods_total: i32,
}
