//! Choosing among variants: a weighted choice driven by a low-discrepancy sequence, and weighted
//! rendezvous hashing for sticky keys. Pure functions of their inputs (and stable across pods,
//! builds and Rust versions where pods must agree).

use std::time::{SystemTime, UNIX_EPOCH};

use sluice_crds::sidecar_config::VariantRoute;

/// 2^64 / golden ratio: the Weyl sequence step with the lowest discrepancy.
pub(super) const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser: a fast, well-mixing, stable bijection on u64.
pub(super) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bit: stable across processes, builds and Rust versions (all pods must agree).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Maps 64 random bits to a float in the open interval (0, 1).
pub(super) fn unit_open(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Weighted choice: `u` in [0, 1) is mapped onto the cumulative weights of `candidates` in their
/// order. `None` when no candidate has weight.
pub fn weighted_pick<'a>(candidates: &[&'a VariantRoute], u: f64) -> Option<&'a VariantRoute> {
    let total: u64 = candidates.iter().map(|v| u64::from(v.weight)).sum();
    if total == 0 {
        return None;
    }
    let point = u * total as f64;
    let mut cumulative = 0u64;
    let mut last = None;
    for v in candidates.iter().copied().filter(|v| v.weight > 0) {
        cumulative += u64::from(v.weight);
        last = Some(v);
        if point < cumulative as f64 {
            return Some(v);
        }
    }
    last
}

/// Weighted rendezvous hashing (an exponential race): each candidate draws
/// `-ln(u(key, name)) / weight` from a hash of the key and its name, and the smallest wins. A
/// candidate wins with probability `weight / total`; the draw of a key for a variant never
/// changes, so keys only move when a weight changes, and only as far as they must: lowering one
/// weight only moves keys away from that variant, raising one only moves keys to it, and
/// removing a variant (weight 0) moves only its own keys. Independent of the candidates' order.
pub fn sticky_pick<'a>(candidates: &[&'a VariantRoute], key: &[u8]) -> Option<&'a VariantRoute> {
    let key_hash = fnv1a(key);
    candidates
        .iter()
        .copied()
        .filter(|v| v.weight > 0)
        .map(|v| {
            let bits = splitmix64(key_hash ^ splitmix64(fnv1a(v.name.as_bytes())));
            (-unit_open(bits).ln() / f64::from(v.weight), v)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, v)| v)
}

/// A per-process starting point (pods need not agree on it; they only must not all start at 0
/// in lockstep, which would not matter either, but costs nothing to avoid).
pub(super) fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    splitmix64(nanos ^ (u64::from(std::process::id()) << 32))
}
