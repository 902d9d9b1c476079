//! The two subcommands that prepare a model before `serve`: `fetch` downloads its weights (the
//! init container), `convert` re-quantizes them to a format with fast CPU kernels.

pub mod convert;
pub mod fetch;
