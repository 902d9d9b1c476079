//! End-to-end tests live in `tests/`; run them with `make e2e` (they need a cluster).
