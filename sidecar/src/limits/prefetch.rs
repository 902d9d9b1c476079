//! Cache-line prefetches for admission (see [`super::table::Table::prefetch`]): the one place
//! in the sidecar with `unsafe`, because a prefetch names an address it never dereferences.
#![allow(unsafe_code)]

/// Asks this core to fetch the cache line holding `p` in exclusive state, as a write would,
/// without waiting for it. A hint only: it never faults and changes no program state, so `p`
/// may be stale or dangling. Elsewhere than x86-64 it does nothing.
#[inline(always)]
pub fn write<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW reads no memory into the program and cannot fault, whatever the
    // address; CPUs that predate it execute it as a no-op.
    unsafe {
        std::arch::asm!(
            "prefetchw [{p}]",
            p = in(reg) p,
            options(nostack, preserves_flags, readonly)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
