//! The OpenAI API as sluice speaks it: the routes, the wire types ([`types`]), and how errors
//! and rate limits look to a client ([`ApiError`], [`rate_headers`]). No hyper here: the HTTP
//! layer ([`crate::http`]) puts these on the wire.

pub mod error;
pub mod fields;
pub mod ratelimit;
pub mod tools;
pub mod types;

pub use self::{
    error::{ApiError, ErrorBody},
    ratelimit::rate_headers,
    types::{CHAT_PATH, COMPLETIONS_PATH, Kind, MODELS_PATH},
};
