//! Giving the heap's free memory back to the operating system after a burst of connections.
//!
//! glibc's allocator keeps what it has freed for reuse: after 4,096 connections come and go
//! (a flood, a client's pool recycled), their buffers stay resident, about 100 MB measured
//! (`sidecar/tests/abuse.rs`), which counts against the pod's memory limit until the process
//! ends. `malloc_trim` returns it; it walks the heap under the allocator's locks, so it runs on
//! a blocking thread, once per burst.
#![allow(unsafe_code)]

/// Returns the heap's free memory to the operating system, in the background (on glibc; a
/// no-op elsewhere or outside a tokio runtime).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(|| {
            // SAFETY: malloc_trim takes no pointer; it only walks glibc's own heap, under its
            // locks, and releases pages no allocation holds.
            let released = unsafe { libc::malloc_trim(0) };
            tracing::debug!(
                released = released == 1,
                "heap trimmed after a burst of connections"
            );
        });
    }
}
