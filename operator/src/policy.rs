//! RateLimitPolicy: which policies apply to which InferenceModel, the effective limits each
//! model's sidecars enforce, each pod's share of cluster-wide limits, and the convergence the
//! policy's status reports.
//!
//! # How policies combine
//!
//! Policies are taken oldest first (creation time, then name). For each InferenceModel:
//!
//! 1. A policy targets a model by `targetRef` (the model of that name in the policy's
//!    namespace) or `selector` (every model in the namespace whose labels match). A policy being
//!    deleted targets nothing, so deleting a policy removes its rules at the next reconcile.
//! 2. A policy that is invalid on its own (`PolicyInvalid`: a rule the sidecar cannot enforce,
//!    duplicate rule names, no target, a bad selector) or whose API-key Secret (or the Secret's
//!    entry) does not exist (`KeysSecretNotFound`) is not accepted, and **changes nothing that
//!    was working**: rules of that policy already in force on a model (found in the model's
//!    live sidecar config) stay in force, as does the identity section and key mount it
//!    provided, until the policy is fixed or deleted. A policy that targets no existing model is
//!    not accepted either (`TargetNotFound`).
//! 3. **Every rule of every accepted policy applies** (the sidecar's conjunction: a request must
//!    pass every rule that matches it). Rules are renamed `<policy>/<rule>`, so two policies'
//!    rules never clash by name: `x-sluice-rule` and the metrics name the policy too.
//! 4. **Identity** (where the caller's key comes from, and the Secret of accepted keys) is one
//!    per model: it comes from the oldest accepted policy that declares one. A newer policy that
//!    declares a *different* identity conflicts: it is not applied to that model and gets
//!    `Accepted=False`, reason `Conflict` (its rules still apply to its other targets, where
//!    it does not conflict). Policies that declare no identity, or the same one, never conflict.
//! 5. **Cluster scope**: every pod enforces `replicaShare` = 1 / ready pods of the model (all
//!    variants) of each `scope: Cluster` limit ([`replica_share`]); the operator rewrites the
//!    share when the ready count changes (HPA scaling, pods becoming ready), a ConfigMap change
//!    that never restarts pods.
//!
//! The key Secret of the identity's policy is mounted at `/etc/sluice/keys/<policy>/` (see
//! [`key_secret_volumes`]); the pod template only changes when that mount changes, never for a
//! limits edit.
//!
//! # Layout
//!
//! - [`merge`]: targeting, acceptance and the effective limits of each model; pure.
//! - [`convergence`]: the config generation each pod enforces, read from its `/metrics`.
//! - [`status`]: the policy's conditions; pure.
//! - [`controller`]: the I/O: reading policies, Secrets and live configs, patching status.

pub mod controller;
pub mod convergence;
pub mod merge;
pub mod status;

pub use self::convergence::{PodGeneration, config_generation, pod_generations};
pub use self::merge::{
    KeysMount, KeysSecrets, ModelLimits, Previous, REASON_CONFLICT, REASON_INVALID,
    REASON_KEYS_SECRET, REASON_TARGET, Rejection, Resolution, Verdict, apply_limits, check_policy,
    key_secret_volumes, keys_mount_in, replica_share, resolve, targets,
};
pub use self::status::{ACCEPTED, CONVERGED, TargetObservation, policy_status, transitions};
