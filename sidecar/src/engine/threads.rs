//! The threads the engine computes on: rayon's global pool, at a lower priority than the threads
//! that serve HTTP.

/// Builds the pool candle runs its CPU kernels on (rayon's global pool): `threads` of them
/// (None: one per core) at nice value `nice`. The pool can be built once per process, so this
/// must run before anything computes on it (weight conversion does); later calls keep the
/// first pool.
pub fn start_kernel_threads(threads: Option<usize>, nice: i32) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .start_handler(move |_| {
            if nice != 0
                && let Err(error) = super::priority::set_current_thread_nice(nice)
            {
                tracing::warn!(%error, nice, "could not lower a kernel thread's priority");
            }
        })
        .build_global();
    if let Err(error) = pool {
        tracing::debug!(%error, "kernel thread pool already built");
    }
}
