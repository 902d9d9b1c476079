//! Scale to zero, agreed between the operator and the sidecar binary's `activate` subcommand.
//!
//! A model whose `autoscaling.minReplicas` is 0 gets an activator: a small Deployment of the
//! sidecar binary run as `sluice-sidecar activate`, which loads no model. While no pod of the
//! model is ready (scaled to zero, or still starting), the operator points the model's Service
//! at the activator; it holds each request, scales the variants' Deployments from 0 to 1
//! through their `scale` subresource, and sends the request on to the first variant Service
//! that answers, whose sidecars route and admit it as any client's request (so it is charged
//! once, there). The operator scales the Deployments back to 0 after `idleAfter` without a
//! request, and points the Service at the pods again as soon as one is ready.

/// The sidecar's subcommand the activator runs.
pub const SUBCOMMAND: &str = "activate";
/// Its flag (clap's long name): a Deployment to scale from 0 to 1 on a request; repeated.
pub const WAKE_FLAG: &str = "wake";
/// Its flag: a variant Service's base URL to send held requests to; repeated, tried in order.
pub const UPSTREAM_FLAG: &str = "upstream";
/// Its flag: seconds a request is held for a ready pod before it gets 503 with `Retry-After`.
pub const HOLD_TIMEOUT_SECS_FLAG: &str = "hold-timeout-secs";
/// `autoscaling.activationTimeout` left unset: room for a large model's weights to load.
pub const DEFAULT_HOLD_TIMEOUT_SECS: u32 = 300;
/// `autoscaling.idleAfter` left unset.
pub const DEFAULT_IDLE_AFTER_SECS: u32 = 900;
/// The `app.kubernetes.io/component` label of the activator's pods (the inference pods carry
/// `inference`), which the model's Service selects while it routes to the activator.
pub const COMPONENT: &str = "activator";
