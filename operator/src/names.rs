//! The names the operator and the cluster agree on: the field manager, labels and annotations
//! of what it creates, the sidecar's ports and directories, and the names of each model's
//! objects. Constants and string formatting only, so every layer may use them.

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
/// Where the fallback model's forwarding Secret is mounted (`spec.fallback`).
pub const FALLBACK_FORWARDING_DIR: &str = "/etc/sluice/fallback";
/// The pod volume of the fallback model's forwarding Secret.
pub const FALLBACK_FORWARDING_VOLUME: &str = "fallback-forwarding";
/// Where `spec.auth`'s API-key Secret and key sets are mounted (see `desired::auth`).
pub const AUTH_DIR: &str = "/etc/sluice/auth";
/// Where API-key Secrets are mounted in the model's pods: `<KEYS_DIR>/<policy>/<entry>`.
pub const KEYS_DIR: &str = "/etc/sluice/keys";
/// The pod volume carrying the API-key Secret (a model has at most one: its identity's).
pub const KEYS_VOLUME: &str = "api-keys";
/// Where the sidecar caches converted weights: the root filesystem is read-only, `/tmp` is an
/// emptyDir.
pub const CACHE_DIR: &str = "/tmp/sluice-cache";
/// The node label the GPU product is matched against.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";
/// The extended resource (and taint key) of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

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

/// Label of the activator's pods: the model they hold requests for (not [`LABEL_MODEL`], which
/// the model's Service selects).
pub const LABEL_ACTIVATOR: &str = "sluice.dev/activator-for";

/// Name of a model's activator Deployment (scale to zero).
pub fn activator_name(model: &str) -> String {
    format!("{model}-activator")
}

/// The in-cluster OpenAI base URL of a model.
pub fn endpoint(model: &str, namespace: &str) -> String {
    format!("{}/v1", model_address(model, namespace))
}

/// The in-cluster address of a model's Service (every variant's pods).
pub fn model_address(model: &str, namespace: &str) -> String {
    format!("http://{model}.{namespace}.svc:{API_PORT}")
}

/// The in-cluster address of a variant's Service (where other variants' sidecars forward to).
pub fn variant_address(model: &str, variant: &str, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc:{API_PORT}",
        variant_object_name(model, variant)
    )
}
