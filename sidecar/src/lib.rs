//! sluice-sidecar: the data plane. Serves a quantized GGUF model in-process with mistral.rs
//! over the OpenAI HTTP API, with admin endpoints for probes and metrics.
//!
//! Modules in layers; each imports only from the layers below it (`tests/layering.rs` checks):
//!
//! - at the bottom, pure decisions and the engine: [`limits`] (rate limits, no HTTP),
//!   [`engine`] (mistral.rs in-process), [`route`] (which variant serves a request), with
//!   [`usage`], [`readiness`], the response [`cache`] and the start-up [`error`] beneath them;
//! - [`admit`] (the admission contract and its limiter) and [`metrics`];
//! - [`openai`]: the wire types, and the one place errors become statuses and headers;
//! - [`stream`] (JSON and SSE answers) and [`forward`] (to other variants);
//! - [`http`] (the request path, top-down in [`http::generate`]) and [`reload`] (config
//!   documents);
//! - [`app`] wires them for `serve`, and [`activate`] for `activate` (what answers for a model
//!   scaled to zero); [`cli`], [`preflight`], [`telemetry`] and [`model`] serve `main`.

pub mod activate;
pub mod admit;
pub mod app;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod engine;
pub mod error;
pub mod forward;
pub mod heap;
pub mod http;
pub mod limits;
pub mod memory_limit;
pub mod metrics;
pub mod model;
pub mod open_files;
pub mod openai;
pub mod preflight;
pub mod readiness;
pub mod reload;
pub mod route;
pub mod stream;
pub mod usage;

pub use app::{serve, serve_until, shutdown_signal};
