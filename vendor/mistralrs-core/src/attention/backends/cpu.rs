#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use candle_core::{Context, Device, Result, Storage, Tensor, WithDType};

use half::bf16;
use half::f16;
use rayon::prelude::*;
#[cfg(target_os = "macos")]
use rayon::ThreadPool;

#[cfg(target_os = "macos")]
use std::sync::LazyLock;
use std::{f32, iter::Sum, ops::Range};

// sluice: upstream's prefetch of the next K and V rows went with its one-position-at-a-time
// loops; a block of scores reads the K rows in order, which the hardware prefetches.

use crate::attention::SdpaParams;

#[cfg(target_os = "macos")]
/// Elevate the thread QoS so macOS prefers running it on Performance (P) cores.
unsafe fn set_thread_affinity() {
    // USER_INTERACTIVE has the highest scheduling priority that user code
    // can request and is most likely to be scheduled on P‑cores.
    use libc::{pthread_set_qos_class_self_np, qos_class_t::QOS_CLASS_USER_INTERACTIVE};
    // The second argument is a relative priority within the QoS class (0 = default).
    pthread_set_qos_class_self_np(QOS_CLASS_USER_INTERACTIVE, 0);
}

/// sluice: elsewhere the attention kernels run on the pool they are called from: the engine
/// loop runs on a worker of rayon's global pool with the rest of the forward pass, and handing
/// each layer's attention to a second pool of as many threads meant a cross-pool handoff per
/// layer and twice as many threads as cores competing for them.
#[cfg(not(target_os = "macos"))]
fn attention_pool<R>(op: impl FnOnce() -> R) -> R {
    op()
}

/// On macOS the attention runs on its own pool, whose threads ask for performance cores.
#[cfg(target_os = "macos")]
fn attention_pool<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    FLASH_ATTN_POOL.install(op)
}

/// Rayon pool used by the flash‑attention CPU kernels, with a per‑thread
/// start handler that applies our affinity hint exactly once.
#[cfg(target_os = "macos")]
static FLASH_ATTN_POOL: LazyLock<ThreadPool> = LazyLock::new(|| {
    rayon::ThreadPoolBuilder::new()
        .start_handler(|_| unsafe {
            set_thread_affinity();
        })
        .build()
        .expect("Failed to build custom Rayon thread‑pool for flash‑attention")
});

/// sluice: lanes of the dot product's independent sums (one AVX2 register of f32).
const DOT_LANES: usize = 8;

/// Size (in KV positions) processed by each inner‑tile job.
const TILE_KV: usize = 16;

/// sluice: queries of a prompt that go through the keys together (see `flash_attn_cpu`).
const Q_TILE: usize = 8;

/// Dot product in `f32` of a query row and a key row. sluice: in `DOT_LANES` independent sums,
/// added up in a fixed order at the end, which the compiler turns into SIMD. Upstream's single
/// running sum was a chain of dependent scalar adds: in a 1,000-token prompt's prefill on the
/// demo model, 23% of the time. The order depends only on the length, so a row's result never
/// depends on its batch. Each product is added with a fused multiply-add (one rounding, one
/// instruction on x86-64-v3 and aarch64), here and in [`add_scaled`]: a separate multiply and
/// add was twice the arithmetic the prompt attention is bound by.
#[inline]
fn vec_dot_f32<K: UpcastF32 + Copy>(q: &[f32], k: &[K]) -> f32 {
    K::dot_f32(q, k)
}

#[inline]
fn dot_in_lanes<K: UpcastF32 + Copy>(a: &[f32], b: &[K]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; DOT_LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(DOT_LANES), b.chunks_exact(DOT_LANES));
    let (a_rest, b_rest) = (a_blocks.remainder(), b_blocks.remainder());
    for (x, y) in a_blocks.zip(b_blocks) {
        for j in 0..DOT_LANES {
            lanes[j] = x[j].mul_add(y[j].to_f32(), lanes[j]);
        }
    }
    let sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    dot_tail(sum, a_rest, b_rest)
}

/// The tail of a dot product past its last `DOT_LANES` elements, added to `sum` in order.
#[inline(always)]
fn dot_tail<K: UpcastF32>(mut sum: f32, q: &[f32], k: &[K]) -> f32 {
    for (x, y) in q.iter().zip(k) {
        sum = x.mul_add(y.to_f32(), sum);
    }
    sum
}

/// sluice: consecutive rows of one head of a K or V tensor: row `j` is the `len` elements
/// `j * stride` into `data`. The kernels check once that the rows they read lie inside `data`
/// (a closure that sliced each row cost a multiply and a bounds check per row and read: a fifth
/// of the prompt attention's time).
#[derive(Clone, Copy)]
pub(crate) struct HeadRows<'a, E> {
    data: &'a [E],
    stride: usize,
    len: usize,
}

impl<'a, E> HeadRows<'a, E> {
    /// The rows of head `head` of sequence `seq` in a (batch, position, head, element) tensor.
    fn of_head(data: &'a [E], strides: &[usize], len: usize, seq: usize, head: usize) -> Self {
        Self {
            data: &data[seq * strides[0] + head * strides[2]..],
            stride: strides[1],
            len,
        }
    }

    #[inline]
    fn row(&self, j: usize) -> &'a [E] {
        &self.data[j * self.stride..][..self.len]
    }

    /// The rows from row `j` on.
    #[inline]
    fn from_row(&self, j: usize) -> Self {
        Self {
            data: &self.data[j * self.stride..],
            ..*self
        }
    }

    /// Each row's elements from `first` on.
    #[inline]
    fn from_column(&self, first: usize) -> Self {
        Self {
            data: &self.data[first..],
            len: self.len - first,
            ..*self
        }
    }

    /// Whether rows `0..count` lie inside `data`.
    #[inline]
    fn holds(&self, count: usize) -> bool {
        count == 0 || (count - 1) * self.stride + self.len <= self.data.len()
    }
}

/// sluice: `dots[j] = q · keys.row(j)` ([`vec_dot_f32`], bit for bit), 8 keys at a time: their
/// sums are added up together (see `UpcastF32::dot_f32_x8`).
#[inline]
fn dot_rows<K: UpcastF32>(q: &[f32], keys: HeadRows<K>, dots: &mut [f32]) {
    let done = dots.len() / 8 * 8;
    let mut groups = dots.chunks_exact_mut(8);
    for (g, group) in (&mut groups).enumerate() {
        group.copy_from_slice(&K::dot_f32_x8(q, keys.from_row(g * 8)));
    }
    for (j, dot) in groups.into_remainder().iter_mut().enumerate() {
        *dot = vec_dot_f32(q, keys.row(done + j));
    }
}

/// sluice: [`add_scaled`] of each row `rows.row(j)` whose weight is not 0, in order.
#[inline]
fn add_scaled_each<V: UpcastF32 + Copy>(acc: &mut [f32], rows: HeadRows<V>, weights: &[f32]) {
    for (j, &weight) in weights.iter().enumerate() {
        if weight != 0.0 {
            add_scaled(acc, rows.row(j), weight);
        }
    }
}

/// sluice: `acc += row * weight`, over slices, so that the compiler vectorizes it (indexing
/// `v_data[base + i]` kept a bounds check in the loop).
#[inline]
fn add_scaled<V: UpcastF32 + Copy>(acc: &mut [f32], row: &[V], weight: f32) {
    for (a, v) in acc.iter_mut().zip(row) {
        *a = v.to_f32().mul_add(weight, *a);
    }
}

/// sluice: key positions whose scores are computed before their softmax weights (a block of
/// exponentials vectorizes; upstream took them one by one through libm's `expf`: 13% of a
/// 1,000-token prompt's prefill on the demo model).
const SCORE_BLOCK: usize = 32;

/// sluice: folds one block of scores (a masked position's is -inf) into the running softmax of
/// a query: `m` the largest score so far, `s` the sum of `e^(score - m)`, `vkq` the V rows
/// weighted so. The running sums are rescaled once per block, not once per new maximum.
/// `values.row(j)` is the V row of the block's `j`-th position. A masked position weighs exactly 0
/// and is skipped: the sums are what they are without it, bit for bit.
#[inline]
fn fold_scores<T: UpcastF32 + Copy>(
    (vkq, s, m): (&mut [f32], &mut f32, &mut f32),
    scores: &mut [f32],
    values: HeadRows<T>,
) {
    let block_max = max_of(scores);
    if block_max == f32::NEG_INFINITY {
        return;
    }
    if block_max > *m {
        // The first block: m = -inf, the sums are 0 and stay 0.
        let rescale = exp_non_positive(*m - block_max);
        for v in vkq.iter_mut() {
            *v *= rescale;
        }
        *s *= rescale;
        *m = block_max;
    }
    for score in scores.iter_mut() {
        *score = exp_non_positive(*score - *m);
    }
    T::add_scaled_rows(vkq, values, scores);
    // A weight of 0 adds nothing: `s` is positive (or +0), and `s + 0.0` is `s`.
    for &weight in scores.iter() {
        *s += weight;
    }
}

/// sluice: the largest of `xs` (-inf if empty), in 8 lanes that vectorize: one running maximum
/// was a chain of dependent compares and blends. A maximum is the same whatever the order.
#[inline]
fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// sluice: the scale `scale_and_mask` takes: `scale`, divided by `softcap` where there is one.
fn scale_before_softcap(scale: f32, softcap: f32) -> f32 {
    if softcap != 0.0 {
        scale / softcap
    } else {
        scale
    }
}

/// sluice: a block of one query's scores scaled (and soft-capped: `scale` is then divided by
/// `softcap`, see `scale_before_softcap`) and masked: `-inf` where `slope * mask` is, else `score * scale + slope * mask`.
/// Without branches, so that it vectorizes: a block's scores one by one, each with its mask
/// lookup and branch, took a tenth of the prompt attention's time. Decode and prompts share it,
/// so a soft-capped model's scores are computed one way in both.
#[inline]
fn scale_and_mask(scores: &mut [f32], mask: &[f32], slope: f32, scale: f32, softcap: f32) {
    let mask = &mask[..scores.len()];
    if softcap != 0.0 {
        for (score, &m) in scores.iter_mut().zip(mask) {
            let mv = slope * m;
            let capped = softcap * (*score * scale).tanh() + mv;
            *score = if mv == f32::NEG_INFINITY { mv } else { capped };
        }
    } else {
        for (score, &m) in scores.iter_mut().zip(mask) {
            let mv = slope * m;
            let scaled = *score * scale + mv;
            *score = if mv == f32::NEG_INFINITY { mv } else { scaled };
        }
    }
}

/// sluice: `e^x` for `x <= 0` (a score less the largest), within 2 ulp of `f32::exp`, in
/// arithmetic the compiler vectorizes over a block of scores (Cephes' `expf`: `x = n ln 2 + r`,
/// `e^r` by a polynomial, `2^n` from the exponent bits). Below -87, where `e^x` is subnormal or
/// 0, and for -inf, it is 0: no subnormal ever reaches the sums.
#[inline(always)]
fn exp_non_positive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.max(-87.0);
    let n = (clamped * LOG2_E + 0.5).floor();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n is in [-126, 0]: a normal power of two.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e_r * two_n
    }
}

#[inline]
fn clamp_index(idx: usize, dim: usize) -> usize {
    if dim == 0 {
        0
    } else if idx >= dim {
        dim - 1
    } else {
        idx
    }
}

#[inline]
fn mask_offset(
    dims: &[usize],
    b: usize,
    h: usize,
    b_i: usize,
    h_i: usize,
    q_pos: usize,
    kv_pos: usize,
) -> Option<usize> {
    if dims.is_empty() {
        return Some(0);
    }

    match dims.len() {
        1 => {
            let kv_dim = dims[0];
            if kv_dim == 0 {
                None
            } else {
                Some(clamp_index(kv_pos, kv_dim))
            }
        }
        2 => {
            let q_dim = dims[0];
            let kv_dim = dims[1];
            if q_dim == 0 || kv_dim == 0 {
                None
            } else {
                let q_idx = clamp_index(q_pos, q_dim);
                let kv_idx = clamp_index(kv_pos, kv_dim);
                Some(q_idx * kv_dim + kv_idx)
            }
        }
        3 => {
            let d0 = dims[0];
            let d1 = dims[1];
            let d2 = dims[2];
            if d0 == 0 || d1 == 0 || d2 == 0 {
                return None;
            }
            let q_idx = clamp_index(q_pos, d1);
            let kv_idx = clamp_index(kv_pos, d2);
            if d0 == b || d0 == 1 {
                let b_idx = if d0 == 1 { 0 } else { clamp_index(b_i, d0) };
                Some((b_idx * d1 + q_idx) * d2 + kv_idx)
            } else if d0 == h || d0 == 1 {
                let h_idx = if d0 == 1 { 0 } else { clamp_index(h_i, d0) };
                Some((h_idx * d1 + q_idx) * d2 + kv_idx)
            } else if d0 == b.saturating_mul(h) {
                let combined_idx = clamp_index(b_i * h + h_i, d0);
                Some((combined_idx * d1 + q_idx) * d2 + kv_idx)
            } else {
                Some(q_idx * d2 + kv_idx)
            }
        }
        4 => {
            let d0 = dims[0];
            let d1 = dims[1];
            let d2 = dims[2];
            let d3 = dims[3];
            if d0 == 0 || d1 == 0 || d2 == 0 || d3 == 0 {
                return None;
            }
            let b_idx = if d0 == 1 {
                0
            } else if d0 == b {
                clamp_index(b_i, d0)
            } else if d0 == b.saturating_mul(h) {
                clamp_index(b_i * h + h_i, d0)
            } else {
                clamp_index(b_i, d0)
            };
            let h_idx = if d1 == 1 {
                0
            } else if d1 == h {
                clamp_index(h_i, d1)
            } else if d1 == b {
                clamp_index(b_i, d1)
            } else {
                clamp_index(h_i, d1)
            };
            let q_idx = clamp_index(q_pos, d2);
            let kv_idx = clamp_index(kv_pos, d3);
            Some(((b_idx * d1 + h_idx) * d2 + q_idx) * d3 + kv_idx)
        }
        _ => {
            let q_dim = *dims.get(dims.len().saturating_sub(2))?;
            let kv_dim = *dims.last()?;
            if q_dim == 0 || kv_dim == 0 {
                return None;
            }
            let q_idx = clamp_index(q_pos, q_dim);
            let kv_idx = clamp_index(kv_pos, kv_dim);
            let mut prefix_dim = 1usize;
            for &dim in &dims[..dims.len() - 2] {
                if dim == 0 {
                    return None;
                }
                prefix_dim = prefix_dim.saturating_mul(dim);
            }
            let combined_idx = if prefix_dim == 0 {
                0
            } else {
                let idx_val = b_i * h + h_i;
                idx_val.min(prefix_dim - 1)
            };
            Some((combined_idx * q_dim + q_idx) * kv_dim + kv_idx)
        }
    }
}

struct MaskInfo<'a> {
    data: &'a [f32],
    dims: &'a [usize],
    b: usize,
    h: usize,
}

impl<'a> MaskInfo<'a> {
    #[inline]
    fn value(&self, b_i: usize, h_i: usize, q_pos: usize, kv_pos: usize) -> f32 {
        if let Some(idx) = mask_offset(self.dims, self.b, self.h, b_i, h_i, q_pos, kv_pos) {
            *self.data.get(idx).unwrap_or(&0.0)
        } else {
            0.0
        }
    }

    /// sluice: `out[j]` = the mask value of query `q_pos` at key position `kv.start + j`.
    fn fill(&self, b_i: usize, h_i: usize, q_pos: usize, kv: Range<usize>, out: &mut [f32]) {
        for (m, kv_pos) in out.iter_mut().zip(kv) {
            *m = self.value(b_i, h_i, q_pos, kv_pos);
        }
    }
}

pub(crate) trait DowncastF32 {
    fn cast(x: f32) -> Self;
}

impl DowncastF32 for f32 {
    fn cast(x: f32) -> Self {
        x
    }
}

impl DowncastF32 for f16 {
    fn cast(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl DowncastF32 for bf16 {
    fn cast(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Up‑cast helper: convert any supported element type to `f32` once so that the
/// hot kernels can run entirely in `f32` and only down‑cast when writing out.
pub trait UpcastF32: Sized + Copy {
    fn to_f32(self) -> f32;

    /// sluice: [`vec_dot_f32`] of an f32 query and a key row of this type (the KV cache's),
    /// which a type may compute with SIMD of its own, in the same order.
    #[inline]
    fn dot_f32(q: &[f32], k: &[Self]) -> f32 {
        dot_in_lanes(q, k)
    }

    /// sluice: [`Self::dot_f32`] of `q` and each of the first 8 rows of `k`, bit for bit.
    #[inline]
    fn dot_f32_x8(q: &[f32], k: HeadRows<Self>) -> [f32; 8] {
        std::array::from_fn(|j| Self::dot_f32(q, k.row(j)))
    }

    /// sluice: `acc += rows.row(j) * weights[j]` for each `j` in order whose weight is not 0:
    /// each element gets the products and sums of [`add_scaled`] one row at a time, which a type
    /// may compute with SIMD of its own.
    #[inline]
    fn add_scaled_rows(acc: &mut [f32], rows: HeadRows<Self>, weights: &[f32]) {
        add_scaled_each(acc, rows, weights)
    }
}

/// sluice: a row type's `UpcastF32` kernels from `simd` where AVX2, F16C and FMA are compiled in.
macro_rules! simd_kernels {
    ($t:ty) => {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "f16c",
            target_feature = "fma"
        ))]
        #[inline]
        fn dot_f32(q: &[f32], k: &[$t]) -> f32 {
            simd::dot(q, k)
        }

        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "f16c",
            target_feature = "fma"
        ))]
        #[inline]
        fn dot_f32_x8(q: &[f32], k: HeadRows<$t>) -> [f32; 8] {
            simd::dot_x8(q, k)
        }

        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "f16c",
            target_feature = "fma"
        ))]
        #[inline]
        fn add_scaled_rows(acc: &mut [f32], rows: HeadRows<$t>, weights: &[f32]) {
            simd::add_scaled_rows(acc, rows, weights)
        }
    };
}

impl UpcastF32 for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    simd_kernels!(f32);
}

impl UpcastF32 for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }

    simd_kernels!(f16);
}

/// sluice: AVX2 versions of the generic loops above, for f32 and for the f16 KV cache (whose
/// rows F16C converts 8 at a time). Each computes the same products and sums in the same order
/// as its generic loop, so results are bit for bit the same (the tests check it).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "f16c",
    target_feature = "fma"
))]
mod simd {
    use super::{add_scaled_each, dot_tail, HeadRows, UpcastF32, DOT_LANES};
    use core::arch::x86_64::*;
    use half::f16;

    const _: () = assert!(DOT_LANES == 8);

    /// Rows the kernels read 8 elements at a time, as f32.
    pub(super) trait Load8: UpcastF32 {
        /// # Safety
        /// `p` points at 8 readable elements.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Load8 for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    /// `dot_in_lanes`: the 8 lanes summed as `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))`.
    #[inline]
    pub(super) fn dot<K: Load8>(q: &[f32], k: &[K]) -> f32 {
        let n = q.len().min(k.len());
        let blocks = n / DOT_LANES;
        // SAFETY: every load reads 8 elements below `blocks * 8 <= n`, inside both slices.
        let sum = unsafe {
            let mut lanes = _mm256_setzero_ps();
            for i in 0..blocks {
                let x = _mm256_loadu_ps(q.as_ptr().add(i * DOT_LANES));
                let y = K::load8(k.as_ptr().add(i * DOT_LANES));
                lanes = _mm256_fmadd_ps(x, y, lanes);
            }
            // [l0 + l4, l1 + l5, l2 + l6, l3 + l7], then (t0 + t1) + (t2 + t3).
            let t = _mm_add_ps(
                _mm256_castps256_ps128(lanes),
                _mm256_extractf128_ps::<1>(lanes),
            );
            let pairs = _mm_hadd_ps(t, t);
            _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
        };
        dot_tail(sum, &q[blocks * DOT_LANES..n], &k[blocks * DOT_LANES..n])
    }

    /// [`dot`] of `q` and 8 key rows at once. The 8 keys' lanes are added up together, in
    /// each key's order: about 2 shuffles and adds per key, where one key alone takes 5.
    #[inline]
    pub(super) fn dot_x8<K: Load8>(q: &[f32], k: HeadRows<K>) -> [f32; 8] {
        assert!(k.holds(8));
        let n = q.len().min(k.len);
        let blocks = n / DOT_LANES;
        let mut sums = [0f32; 8];
        // SAFETY: every load reads 8 elements below `blocks * 8 <= n` of `q` or of one of the
        // first 8 rows of `k`, which lie inside `k.data`.
        unsafe {
            let mut lanes = [_mm256_setzero_ps(); 8];
            for i in 0..blocks {
                let x = _mm256_loadu_ps(q.as_ptr().add(i * DOT_LANES));
                for (r, lane) in lanes.iter_mut().enumerate() {
                    let y = K::load8(k.data.as_ptr().add(r * k.stride + i * DOT_LANES));
                    *lane = _mm256_fmadd_ps(x, y, *lane);
                }
            }
            // Key j's halves added: [t_j | t_j+1] with t = [l0 + l4, l1 + l5, l2 + l6, l3 + l7].
            let halves = |a: __m256, b: __m256| {
                _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(a, b),
                    _mm256_permute2f128_ps::<0x31>(a, b),
                )
            };
            let t01 = halves(lanes[0], lanes[1]);
            let t23 = halves(lanes[2], lanes[3]);
            let t45 = halves(lanes[4], lanes[5]);
            let t67 = halves(lanes[6], lanes[7]);
            // Per 128-bit half: (t0 + t1, t2 + t3) of two keys, then of four: key order
            // [0, 2, 4, 6 | 1, 3, 5, 7].
            let pairs = _mm256_hadd_ps(_mm256_hadd_ps(t01, t23), _mm256_hadd_ps(t45, t67));
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), pairs);
            for (j, sum) in sums.iter_mut().enumerate() {
                *sum = out[(j % 2) * 4 + j / 2];
            }
        }
        for (j, sum) in sums.iter_mut().enumerate() {
            *sum = dot_tail(
                *sum,
                &q[blocks * DOT_LANES..n],
                &k.row(j)[blocks * DOT_LANES..n],
            );
        }
        sums
    }

    /// Accumulators held in registers: 8 vectors, 64 floats (a head of 64; a larger head goes
    /// 64 at a time).
    const ACC_VECTORS: usize = 8;
    const ACC_LEN: usize = ACC_VECTORS * DOT_LANES;

    /// `add_scaled_rows` with the accumulators in registers across the rows: the generic
    /// loop's `acc` went through memory, a load and a store per 8 elements per row.
    #[inline]
    pub(super) fn add_scaled_rows<V: Load8>(acc: &mut [f32], rows: HeadRows<V>, weights: &[f32]) {
        assert!(rows.holds(weights.len()));
        let n = acc.len().min(rows.len);
        let chunks = n / ACC_LEN;
        for c in 0..chunks {
            let at = c * ACC_LEN;
            // SAFETY: every load and store touches elements `at..at + ACC_LEN`, below `n`,
            // inside `acc` and rows `0..weights.len()`, which lie inside `rows.data`.
            unsafe {
                let mut regs = [_mm256_setzero_ps(); ACC_VECTORS];
                for (r, reg) in regs.iter_mut().enumerate() {
                    *reg = _mm256_loadu_ps(acc.as_ptr().add(at + r * DOT_LANES));
                }
                for (j, &weight) in weights.iter().enumerate() {
                    if weight == 0.0 {
                        continue;
                    }
                    let row = rows.data.as_ptr().add(j * rows.stride + at);
                    let w = _mm256_set1_ps(weight);
                    for (r, reg) in regs.iter_mut().enumerate() {
                        let v = V::load8(row.add(r * DOT_LANES));
                        *reg = _mm256_fmadd_ps(v, w, *reg);
                    }
                }
                for (r, reg) in regs.iter().enumerate() {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(at + r * DOT_LANES), *reg);
                }
            }
        }
        let rest = chunks * ACC_LEN;
        if rest < n {
            add_scaled_each(&mut acc[rest..n], rows.from_column(rest), weights);
        }
    }
}

impl UpcastF32 for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

/// sluice: `T` is the query's, the mask's and the output's type, `KV` the keys' and values'
/// (the KV cache's: f16 under an f32 GGUF llama on the CPU, see `quantized_llama`). The scores are
/// computed in f32, from an f32 copy of the query where it is not f32 already.
pub fn run_flash_attn_cpu<T, KV>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    sdpa_params: &SdpaParams,
) -> Result<Tensor>
where
    T: WithDType + Sum + num_traits::real::Real + DowncastF32 + UpcastF32 + Copy,
    KV: WithDType + UpcastF32 + Copy,
{
    // sluice: each of a prompt's queries reads every key and value: they are converted from
    // the f16 cache once here, not once per query (F16C's conversion costs as much as the
    // products). Converting is exact, so the results are the same bit for bit.
    if q.dim(1)? > 1 && KV::DTYPE != candle_core::DType::F32 {
        let (k, v) = (
            k.to_dtype(candle_core::DType::F32)?,
            v.to_dtype(candle_core::DType::F32)?,
        );
        return run_flash_attn_cpu::<T, f32>(q, &k, &v, mask, sdpa_params);
    }
    let q = &q.to_dtype(candle_core::DType::F32)?;
    // Inline CPU slice extraction for q, k, v, and optional mask
    let (q_guard, q_layout) = q.storage_and_layout();
    let q_data: &[f32] = if let Storage::Cpu(cpu) = &*q_guard {
        let data = cpu
            .as_slice::<f32>()
            .context("Expected CPU storage for q")?;
        &data[q_layout.start_offset()..]
    } else {
        return Err(candle_core::Error::Msg("Expected CPU storage for q".into()));
    };
    let (k_guard, k_layout) = k.storage_and_layout();
    let k_data: &[KV] = if let Storage::Cpu(cpu) = &*k_guard {
        let data = cpu.as_slice::<KV>().context("Expected CPU storage for k")?;
        &data[k_layout.start_offset()..]
    } else {
        return Err(candle_core::Error::Msg("Expected CPU storage for k".into()));
    };
    let (v_guard, v_layout) = v.storage_and_layout();
    let v_data: &[KV] = if let Storage::Cpu(cpu) = &*v_guard {
        let data = cpu.as_slice::<KV>().context("Expected CPU storage for v")?;
        &data[v_layout.start_offset()..]
    } else {
        return Err(candle_core::Error::Msg("Expected CPU storage for v".into()));
    };
    let mut mask_buffer: Option<Vec<f32>> = None;
    let mut mask_dims: Option<Vec<usize>> = None;
    if let Some(mask_tensor) = mask {
        mask_dims = Some(mask_tensor.shape().dims().to_vec());
        let buffer = {
            let (guard, layout) = mask_tensor.storage_and_layout();
            if let Storage::Cpu(cpu) = &*guard {
                let data = cpu
                    .as_slice::<T>()
                    .context("Expected CPU storage for mask")?;
                data[layout.start_offset()..]
                    .iter()
                    .map(|v| (*v).to_f32())
                    .collect::<Vec<f32>>()
            } else {
                return Err(candle_core::Error::Msg(
                    "Expected CPU storage for mask".into(),
                ));
            }
        };
        mask_buffer = Some(buffer);
    }
    // q_guard, k_guard, v_guard, and m_guard (if any) are kept in scope to hold storage alive

    let q_stride = q.stride();
    let k_stride = k.stride();
    let v_stride = v.stride();

    // Fast path for decode: q_len == 1
    let mask_dims_ref = mask_dims.as_deref();
    let mask_slice = mask_buffer.as_deref();

    if q.shape().dims()[1] == 1 {
        return flash_attn_cpu_single_q::<T, KV>(
            q_data,
            k_data,
            v_data,
            mask_slice,
            mask_dims_ref,
            q.shape().dims(),
            k.shape().dims(),
            v.shape().dims(),
            q_stride,
            k_stride,
            v_stride,
            sdpa_params.softmax_scale,
            0.0,
            sdpa_params.softcap.unwrap_or(0.0),
        );
    }

    flash_attn_cpu::<T, KV>(
        q_data,
        k_data,
        v_data,
        mask_slice,
        mask_dims_ref,
        q.shape().dims(),
        k.shape().dims(),
        v.shape().dims(),
        q_stride,
        k_stride,
        v_stride,
        sdpa_params.softmax_scale,
        0.0,
        sdpa_params.softcap.unwrap_or(0.0),
    )
}

/// Optimised path for the common decode case: q_len == 1 but kv_len ≫ 1.
/// All intermediate maths is done in `f32`; we down‑cast to `T` exactly once
/// when writing the output buffer.
#[allow(clippy::too_many_arguments)]
fn flash_attn_cpu_single_q<T, KV>(
    q_data: &[f32],
    k_data: &[KV],
    v_data: &[KV],
    mask_vec: Option<&[f32]>,
    mask_dims: Option<&[usize]>,
    qshape: &[usize],
    kshape: &[usize],
    vshape: &[usize],
    qstride: &[usize],
    kstride: &[usize],
    vstride: &[usize],
    scale: f32,
    max_bias: f32,
    logit_softcap: f32,
) -> Result<Tensor>
where
    T: WithDType + Copy + UpcastF32 + DowncastF32,
    KV: UpcastF32 + Copy + Sync,
{
    let (b, _q_len, h, d) = (qshape[0], qshape[1], qshape[2], qshape[3]);
    let kv_len = kshape[1];
    let kv_tiles = kv_len.div_ceil(TILE_KV);
    let dv = d;

    // --- head tiling factors and softmax helper -----------------------
    let k_h = kshape[2];
    let v_h = vshape[2];
    let rk2 = h / k_h;
    let rv2 = h / v_h;
    let n2 = 2_usize.pow((h as f32).log2().ceil() as u32);

    // final output
    let mut out = vec![T::cast(0.0); b * h * dv];
    // scratch: batch × tile × heads × dv (flattened).
    // sluice: upstream left the batch out of the scratch, so each sequence of a batch wrote over
    // the previous one's partial sums and every sequence got the attention of the batch's last:
    // concurrent requests answered with each other's text.
    let mut scratch = vec![0f32; b * kv_tiles * h * dv];
    let mut scratch_s = vec![0f32; b * kv_tiles * h]; // softmax S per tile
    let mut scratch_m = vec![f32::NEG_INFINITY; b * kv_tiles * h];

    // Store as plain usize so the capture is Sync (raw *mut T is not Sync)
    let scratch_ptr = scratch.as_mut_ptr() as usize;
    let scratch_s_ptr = scratch_s.as_mut_ptr() as usize;
    let scratch_m_ptr = scratch_m.as_mut_ptr() as usize;

    let mask_info = match (mask_vec, mask_dims) {
        (Some(data), Some(dims)) => Some(MaskInfo { data, dims, b, h }),
        _ => None,
    };
    let scale_applied = scale_before_softcap(scale, logit_softcap);

    attention_pool(|| {
        (0..kv_tiles).into_par_iter().for_each(|tile_idx| {
            let start = tile_idx * TILE_KV;
            let end = (start + TILE_KV).min(kv_len);

            for b_i in 0..b {
                for h_i in 0..h {
                    // Per‑head slope for ALiBi / NTK bias.
                    let slope = if max_bias > 0.0 {
                        2.0f32.powf(-max_bias * ((h_i + 1) as f32) / n2 as f32)
                    } else {
                        1.0
                    };
                    let k_head = h_i / rk2;
                    let v_head = h_i / rv2;

                    // pointers into scratch
                    let base_s = ((b_i * kv_tiles + tile_idx) * h + h_i) as isize;
                    let base_vk = base_s * dv as isize;

                    let q_base = b_i * qstride[0] + h_i * qstride[2];
                    let q_row = &q_data[q_base..q_base + d];

                    // Re‑materialise the pointer from the captured usize.
                    let vkq: &mut [f32] = unsafe {
                        std::slice::from_raw_parts_mut(
                            (scratch_ptr as *mut f32).add(base_vk as usize),
                            dv,
                        )
                    };
                    let mut s = 0f32;
                    let mut m = f32::NEG_INFINITY;

                    // sluice: the tile's scores, then their weights (see `fold_scores`). A
                    // masked position (a ragged batch's padding) weighs exactly 0, so the sums
                    // are what they are without it, bit for bit; upstream's per-position
                    // softmax, computed on it, gave a tile that starts masked
                    // exp(-inf - -inf), a NaN.
                    let mut scores = [0f32; TILE_KV];
                    let scores = &mut scores[..end - start];
                    let keys = HeadRows::of_head(k_data, kstride, d, b_i, k_head);
                    let values = HeadRows::of_head(v_data, vstride, dv, b_i, v_head);
                    dot_rows(q_row, keys.from_row(start), scores);
                    let mut mask = [0f32; TILE_KV];
                    if let Some(info) = &mask_info {
                        info.fill(b_i, h_i, 0, start..end, &mut mask);
                    }
                    scale_and_mask(scores, &mask, slope, scale_applied, logit_softcap);
                    fold_scores((vkq, &mut s, &mut m), scores, values.from_row(start));

                    unsafe {
                        *((scratch_s_ptr as *mut f32).add(base_s as usize)) = s;
                        *((scratch_m_ptr as *mut f32).add(base_s as usize)) = m;
                    }
                }
            }
        });
    });

    // -------- serial reduction over tiles (per head) --------
    for b_i in 0..b {
        for h_i in 0..h {
            let out_off = (b_i * h + h_i) * dv;

            // start with tile 0
            let first = b_i * kv_tiles * h + h_i;
            let mut vkq = vec![0f32; dv];
            vkq.copy_from_slice(&scratch[(first * dv)..(first * dv + dv)]);
            let mut s = scratch_s[first];
            let mut m = scratch_m[first];

            for tile_idx in 1..kv_tiles {
                let base_s = (b_i * kv_tiles + tile_idx) * h + h_i;
                let base = base_s * dv;

                let m_b = scratch_m[base_s];
                let s_b = scratch_s[base_s];
                let vkq_b = &scratch[base..base + dv];

                if m >= m_b {
                    let factor = (m_b - m).exp();
                    for (v, v_b) in vkq.iter_mut().zip(vkq_b) {
                        *v += v_b * factor;
                    }
                    s += s_b * factor;
                } else {
                    let factor = (m - m_b).exp();
                    for (v, v_a) in vkq.iter_mut().zip(vkq_b) {
                        *v = v_a + *v * factor;
                    }
                    s = s_b + s * factor;
                    m = m_b;
                }
            }

            let inv_s = 1.0 / s;
            for (o, v) in out[out_off..][..dv].iter_mut().zip(vkq.iter()) {
                *o = T::cast(*v * inv_s);
            }
        }
    }

    Tensor::from_vec(out, (b, h, 1, dv), &Device::Cpu)
}

/// Main forward flash-attention CPU routine.
/// Shapes follow Candle convention: (B, S, H, D)
#[allow(clippy::too_many_arguments)]
fn flash_attn_cpu<T, KV>(
    q_data: &[f32],
    k_data: &[KV],
    v_data: &[KV],
    mask_vec: Option<&[f32]>,
    mask_dims: Option<&[usize]>,
    qshape: &[usize],
    kshape: &[usize],
    vshape: &[usize],
    qstride: &[usize],
    kstride: &[usize],
    vstride: &[usize],
    scale: f32,
    max_bias: f32,
    logit_softcap: f32,
) -> Result<Tensor>
where
    T: WithDType + Copy + UpcastF32 + DowncastF32,
    KV: UpcastF32 + Copy + Sync,
{
    let (b, q_len, h, d) = (qshape[0], qshape[1], qshape[2], qshape[3]);
    let kv_len = kshape[1];
    let k_h = kshape[2];
    let v_h = vshape[2];
    let rk2 = h / k_h;
    let rv2 = h / v_h;
    let dv = d;

    let n2 = 2_usize.pow((h as f32).log2().ceil() as u32);

    let mut out = vec![T::cast(0.0); b * q_len * h * dv];

    assert_eq!(qstride[3], 1, "q must have contiguous rows");
    assert_eq!(kstride[3], 1, "k must have contiguous rows");
    assert_eq!(vstride[3], 1, "v must have contiguous rows");

    let mask_info = match (mask_vec, mask_dims) {
        (Some(data), Some(dims)) => Some(MaskInfo { data, dims, b, h }),
        _ => None,
    };
    // sluice: the common mask, a causal (q_len, kv_len) matrix, is read by row, and the loop
    // stops after the row's last unmasked position (the rest were skipped one by one, each
    // after a lookup of its mask value). Each row's end is found once here, not once per head
    // and sequence.
    let mask_rows = mask_info
        .as_ref()
        .filter(|mask| mask.dims == [q_len, kv_len])
        .map(|mask| {
            let rows: Vec<(&[f32], usize)> = mask
                .data
                .chunks_exact(kv_len)
                .map(|row| {
                    let end = row
                        .iter()
                        .rposition(|&x| x != f32::NEG_INFINITY)
                        .map_or(0, |last| last + 1);
                    (row, end)
                })
                .collect();
            rows
        });

    let scale_applied = scale_before_softcap(scale, logit_softcap);

    // sluice: a tile of `Q_TILE` consecutive queries of one sequence and head goes through the
    // keys together, block by block: each block's K and V rows are read from memory once for
    // the tile and stay in L1 for its other queries (upstream's query-at-a-time loop read all
    // of a head's keys and values per query, from L2: 2x the time of llama.cpp's tiled
    // attention on a 1,000-token prompt). Each query's blocks, scores and sums are what they
    // were alone, in the same order, bit for bit.
    attention_pool(|| {
        out.par_chunks_mut(q_len * dv)
            .enumerate()
            .for_each(|(bh, head_out)| {
                let (b_i, h_i) = (bh / h, bh % h);
                let slope = if max_bias > 0.0 {
                    2.0f32.powf(-max_bias * ((h_i + 1) as f32) / n2 as f32)
                } else {
                    1.0
                };
                let k_head = h_i / rk2;
                let v_head = h_i / rv2;
                let keys = HeadRows::of_head(k_data, kstride, d, b_i, k_head);
                let values = HeadRows::of_head(v_data, vstride, dv, b_i, v_head);
                let row_of = |q_pos: usize| match &mask_rows {
                    Some(rows) => (Some(rows[q_pos].0), rows[q_pos].1),
                    None => (None, kv_len),
                };

                head_out
                    .par_chunks_mut(Q_TILE * dv)
                    .enumerate()
                    .for_each(|(tile, tile_out)| {
                        let q_first = tile * Q_TILE;
                        let tile_rows = tile_out.len() / dv;
                        let mut vkq = vec![0f32; tile_rows * dv];
                        let mut sums = [0f32; Q_TILE];
                        let mut maxima = [f32::NEG_INFINITY; Q_TILE];
                        let tile_end = (q_first..q_first + tile_rows)
                            .map(|q_pos| row_of(q_pos).1)
                            .max()
                            .unwrap_or(0);
                        // sluice: a block of scores, then their weights (see `fold_scores`).
                        let mut scores = [0f32; SCORE_BLOCK];
                        for block_start in (0..tile_end).step_by(SCORE_BLOCK) {
                            for (r, vkq) in vkq.chunks_exact_mut(dv).enumerate() {
                                let q_pos = q_first + r;
                                let (mask_row, kv_end) = row_of(q_pos);
                                if block_start >= kv_end {
                                    continue;
                                }
                                let block = block_start..(block_start + SCORE_BLOCK).min(kv_end);
                                let scores = &mut scores[..block.len()];
                                let q_base =
                                    b_i * qstride[0] + q_pos * qstride[1] + h_i * qstride[2];
                                let q_row = &q_data[q_base..q_base + d];
                                dot_rows(q_row, keys.from_row(block.start), scores);
                                let mut looked_up = [0f32; SCORE_BLOCK];
                                let mask = match (mask_row, &mask_info) {
                                    (Some(row), _) => &row[block.clone()],
                                    (None, Some(mask)) => {
                                        mask.fill(b_i, h_i, q_pos, block.clone(), &mut looked_up);
                                        &looked_up[..]
                                    }
                                    (None, None) => &looked_up[..],
                                };
                                scale_and_mask(scores, mask, slope, scale_applied, logit_softcap);
                                fold_scores(
                                    (vkq, &mut sums[r], &mut maxima[r]),
                                    scores,
                                    values.from_row(block.start),
                                );
                            }
                        }

                        // final normalisation + downcast
                        for ((out_row, vkq), s) in tile_out
                            .chunks_exact_mut(dv)
                            .zip(vkq.chunks_exact(dv))
                            .zip(sums)
                        {
                            let inv_s = 1.0 / s;
                            for (o, v) in out_row.iter_mut().zip(vkq) {
                                *o = T::cast(*v * inv_s);
                            }
                        }
                    });
            });
    });

    let out_shape = (b, h, q_len, dv);
    Tensor::from_vec(out, out_shape, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::SdpaParams;
    use candle_core::{Device, Tensor, D};
    use candle_nn::ops::softmax;

    use candle_core::Result as CandleResult;

    const EPS: f32 = 1e-4;

    /// sluice: each sequence of a decode batch attends to its own keys and values only: its
    /// output is what it gets alone, bit for bit, and what naive attention gives.
    #[test]
    fn single_q_batch_rows_are_independent() -> CandleResult<()> {
        let (b, h, d, kv_len) = (3, 4, 8, 2 * TILE_KV + 5);
        // Distinct values per sequence, head and position.
        let values = |n: usize, salt: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.37 + salt).sin() * 1.5)
                .collect()
        };
        let q = Tensor::from_vec(values(b * h * d, 0.1), (b, 1, h, d), &Device::Cpu)?;
        let k = Tensor::from_vec(
            values(b * kv_len * h * d, 0.7),
            (b, kv_len, h, d),
            &Device::Cpu,
        )?;
        let v = Tensor::from_vec(
            values(b * kv_len * h * d, 1.3),
            (b, kv_len, h, d),
            &Device::Cpu,
        )?;
        let sdpa = SdpaParams {
            softmax_scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let batched = run_flash_attn_cpu::<f32, f32>(&q, &k, &v, None, &sdpa)?;
        for i in 0..b {
            let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
            let alone = run_flash_attn_cpu::<f32, f32>(
                &qi.contiguous()?,
                &ki.contiguous()?,
                &vi.contiguous()?,
                None,
                &sdpa,
            )?;
            let got = batched.narrow(0, i, 1)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(got, alone.flatten_all()?.to_vec1::<f32>()?, "sequence {i}");
            // Naive attention of sequence i.
            let qn = qi.permute((0, 2, 1, 3))?.reshape((h, 1, d))?;
            let kn = ki.permute((0, 2, 1, 3))?.reshape((h, kv_len, d))?;
            let vn = vi.permute((0, 2, 1, 3))?.reshape((h, kv_len, d))?;
            let logits = (qn.matmul(&kn.transpose(1, 2)?)? * sdpa.softmax_scale as f64)?;
            let naive = softmax(&logits, D::Minus1)?
                .matmul(&vn)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (a, n) in got.iter().zip(&naive) {
                assert!((a - n).abs() < EPS, "sequence {i}: {a} vs {n}");
            }
        }
        Ok(())
    }

    /// sluice: a prompt's causal mask as a (q_len, kv_len) matrix, read by row and cut at each
    /// row's last unmasked position, gives the general mask path's results bit for bit (the
    /// same mask broadcast to four dimensions), and naive causal attention's.
    #[test]
    fn causal_rows_match_the_general_mask_path() -> CandleResult<()> {
        let (b, h, d, q_len, past) = (2, 3, 12, 21, 5);
        let kv_len = past + q_len;
        let values = |n: usize, salt: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.29 + salt).cos()).collect()
        };
        let q = Tensor::from_vec(
            values(b * q_len * h * d, 0.2),
            (b, q_len, h, d),
            &Device::Cpu,
        )?;
        let k = Tensor::from_vec(
            values(b * kv_len * h * d, 0.9),
            (b, kv_len, h, d),
            &Device::Cpu,
        )?;
        let v = Tensor::from_vec(
            values(b * kv_len * h * d, 1.7),
            (b, kv_len, h, d),
            &Device::Cpu,
        )?;
        let causal: Vec<f32> = (0..q_len)
            .flat_map(|i| {
                (0..kv_len).map(move |j| {
                    if j <= past + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(causal, (q_len, kv_len), &Device::Cpu)?;
        let mask4 = mask.broadcast_as((b, h, q_len, kv_len))?.contiguous()?;
        let sdpa = SdpaParams {
            softmax_scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let rows = run_flash_attn_cpu::<f32, f32>(&q, &k, &v, Some(&mask), &sdpa)?;
        let general = run_flash_attn_cpu::<f32, f32>(&q, &k, &v, Some(&mask4), &sdpa)?;
        // A query's result does not depend on the tile it is computed in: two queries at a time
        // (each pair in a tile of its own) give each query's full-prompt result, bit for bit.
        for i in 0..q_len - 1 {
            let pair = run_flash_attn_cpu::<f32, f32>(
                &q.narrow(1, i, 2)?.contiguous()?,
                &k,
                &v,
                Some(&mask.narrow(0, i, 2)?.contiguous()?),
                &sdpa,
            )?;
            assert_eq!(
                pair.flatten_all()?.to_vec1::<f32>()?,
                rows.narrow(2, i, 2)?.flatten_all()?.to_vec1::<f32>()?,
                "queries {i} and {}",
                i + 1
            );
        }
        let rows = rows.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(rows, general.flatten_all()?.to_vec1::<f32>()?);
        let (qn, kn, vn) = (
            q.permute((0, 2, 1, 3))?,
            k.permute((0, 2, 1, 3))?.contiguous()?,
            v.permute((0, 2, 1, 3))?.contiguous()?,
        );
        let logits = (qn.contiguous()?.matmul(&kn.t()?)? * sdpa.softmax_scale as f64)?
            .broadcast_add(&mask)?;
        let naive = softmax(&logits, D::Minus1)?
            .matmul(&vn)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, n) in rows.iter().zip(&naive) {
            assert!((a - n).abs() < EPS, "{a} vs {n}");
        }
        Ok(())
    }

    /// sluice: the softmax's exponential is `f32::exp` within 2 ulp over the scores it gets
    /// (at most 0), exactly 1 at 0, and exactly 0 where `e^x` would be subnormal or 0.
    #[test]
    fn exp_non_positive_is_exp_within_2_ulp() {
        assert_eq!(exp_non_positive(0.0), 1.0);
        for x in [-87.5f32, -100.0, -1e30, f32::NEG_INFINITY] {
            assert_eq!(exp_non_positive(x), 0.0, "e^{x}");
        }
        let mut worst = 0f32;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp_non_positive(x), x.exp());
            let ulps = (got - want).abs() / (want * f32::EPSILON);
            worst = worst.max(ulps);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    /// sluice: the lane-wise dot product is the dot product, remainders included.
    #[test]
    fn vec_dot_f32_sums_every_term() {
        for n in [1, 7, 8, 9, 64, 67] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64) * (*y as f64))
                .sum();
            assert!((vec_dot_f32(&a, &b) as f64 - want).abs() < 1e-3, "n = {n}");
        }
    }

    /// sluice: f32's SIMD dot product sums in the generic loop's order, bit for bit.
    #[test]
    fn f32_dot_is_the_generic_dot() {
        for n in [1, 7, 8, 9, 63, 64, 67, 128] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32).sin() * 3.1)
                .collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32).cos() / 0.7).collect();
            assert_eq!(
                vec_dot_f32(&a, &b).to_bits(),
                dot_in_lanes(&a, &b).to_bits(),
                "n = {n}"
            );
        }
    }

    /// sluice: f16 keys' SIMD dot product and values' weighted sum are the generic loops', bit
    /// for bit.
    #[test]
    fn f16_rows_are_the_generic_loops() {
        for n in [1, 7, 8, 9, 63, 64, 67, 128] {
            let q: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32).sin() * 3.1)
                .collect();
            let k: Vec<f16> = (0..n)
                .map(|i| f16::from_f32(((i * 53 % 97) as f32).cos() / 0.7))
                .collect();
            assert_eq!(
                vec_dot_f32(&q, &k).to_bits(),
                dot_in_lanes(&q, &k).to_bits(),
                "n = {n}"
            );
            let (mut simd, mut generic) = (q.clone(), q.clone());
            let weights = [0.37, 0.0, -1.25, 2.5];
            let rows: Vec<Vec<f16>> = (0..weights.len())
                .map(|j| {
                    k.iter()
                        .map(|x| *x * f16::from_f32(j as f32 + 0.5))
                        .collect()
                })
                .collect();
            let flat = padded_rows(&rows);
            f16::add_scaled_rows(&mut simd, rows_of(&flat, n), &weights);
            for (row, &weight) in rows.iter().zip(&weights) {
                if weight != 0.0 {
                    add_scaled(&mut generic, row, weight);
                }
            }
            assert_eq!(simd, generic, "n = {n}");
        }
    }

    /// sluice: `rows` one after the other, each followed by `ROW_PADDING` elements that no
    /// kernel may read (NaN), as rows of a head are in a tensor of several heads.
    fn padded_rows<E: Copy + num_traits::Float>(rows: &[Vec<E>]) -> Vec<E> {
        rows.iter()
            .flat_map(|row| row.iter().copied().chain([E::nan(); ROW_PADDING]))
            .collect()
    }

    const ROW_PADDING: usize = 3;

    fn rows_of<E>(flat: &[E], len: usize) -> HeadRows<'_, E> {
        HeadRows {
            data: flat,
            stride: len + ROW_PADDING,
            len,
        }
    }

    /// sluice: the dot products of 8 keys at once are each key's, bit for bit, for f32 and f16
    /// keys.
    #[test]
    fn dots_of_8_keys_are_each_keys() {
        for n in [1, 7, 8, 9, 63, 64, 67, 128] {
            let q: Vec<f32> = (0..n).map(|i| ((i * 29 % 89) as f32).sin() * 2.3).collect();
            let keys: Vec<Vec<f32>> = (0..8)
                .map(|j| {
                    (0..n)
                        .map(|i| ((i * 31 + j * 7) as f32).cos() / (j as f32 + 0.9))
                        .collect()
                })
                .collect();
            let got = f32::dot_f32_x8(&q, rows_of(&padded_rows(&keys), n));
            let want: Vec<u32> = keys.iter().map(|k| dot_in_lanes(&q, k).to_bits()).collect();
            assert_eq!(got.map(f32::to_bits).to_vec(), want, "f32, n = {n}");
            let keys: Vec<Vec<f16>> = keys
                .iter()
                .map(|k| k.iter().map(|&x| f16::from_f32(x)).collect())
                .collect();
            let got = f16::dot_f32_x8(&q, rows_of(&padded_rows(&keys), n));
            let want: Vec<u32> = keys.iter().map(|k| dot_in_lanes(&q, k).to_bits()).collect();
            assert_eq!(got.map(f32::to_bits).to_vec(), want, "f16, n = {n}");
        }
    }

    /// sluice: f32 rows weighed with their accumulators in registers are the generic loop's,
    /// bit for bit, for heads of 64 and 128 and odd lengths.
    #[test]
    fn f32_rows_are_the_generic_loop() {
        for n in [5, 64, 72, 128, 131] {
            let acc0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.13).sin()).collect();
            let weights = [0.5, 0.0, 1.75, -0.3, 0.9];
            let rows: Vec<Vec<f32>> = (0..weights.len())
                .map(|j| {
                    (0..n)
                        .map(|i| ((i + 3 * j) as f32 * 0.71).cos() * 1.9)
                        .collect()
                })
                .collect();
            let (mut simd, mut generic) = (acc0.clone(), acc0);
            let flat = padded_rows(&rows);
            f32::add_scaled_rows(&mut simd, rows_of(&flat, n), &weights);
            for (row, &weight) in rows.iter().zip(&weights) {
                if weight != 0.0 {
                    add_scaled(&mut generic, row, weight);
                }
            }
            assert_eq!(simd, generic, "n = {n}");
        }
    }

    /// sluice: attention over an f16 KV cache is attention over the same keys and values in
    /// f32, bit for bit, in decode (one query) and in a prompt (a causal mask).
    #[test]
    fn f16_kv_is_f32_kv_of_the_same_values() -> CandleResult<()> {
        let (b, h, d, kv_len) = (2, 3, 64, 2 * TILE_KV + 9);
        let values = |n: usize, salt: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.41 + salt).sin() * 2.0)
                .collect()
        };
        let kv = |salt: f32| -> CandleResult<(Tensor, Tensor)> {
            let half = Tensor::from_vec(
                values(b * kv_len * h * d, salt),
                (b, kv_len, h, d),
                &Device::Cpu,
            )?
            .to_dtype(candle_core::DType::F16)?;
            let full = half.to_dtype(candle_core::DType::F32)?;
            Ok((half, full))
        };
        let ((k16, k32), (v16, v32)) = (kv(0.5)?, kv(1.1)?);
        let sdpa = SdpaParams {
            softmax_scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        for q_len in [1, kv_len] {
            let q = Tensor::from_vec(
                values(b * q_len * h * d, 0.3),
                (b, q_len, h, d),
                &Device::Cpu,
            )?;
            let mask = (q_len > 1)
                .then(|| {
                    let causal: Vec<f32> = (0..q_len * kv_len)
                        .map(|i| {
                            if i % kv_len <= i / kv_len {
                                0.0
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect();
                    Tensor::from_vec(causal, (q_len, kv_len), &Device::Cpu)
                })
                .transpose()?;
            let from_f16 = run_flash_attn_cpu::<f32, f16>(&q, &k16, &v16, mask.as_ref(), &sdpa)?;
            let from_f32 = run_flash_attn_cpu::<f32, f32>(&q, &k32, &v32, mask.as_ref(), &sdpa)?;
            assert_eq!(
                from_f16.flatten_all()?.to_vec1::<f32>()?,
                from_f32.flatten_all()?.to_vec1::<f32>()?,
                "q_len = {q_len}"
            );
        }
        Ok(())
    }

    #[test]
    fn test_flash_attn_cpu_single_q() -> CandleResult<()> {
        // Test for q_len == 1 (single Q)
        let b = 1;
        let h = 2;
        let d = 4;
        let kv_len = 2;

        // Create q with shape (b, 1, h, d) filled with ones
        let q_vec = vec![1.0f32; b * h * d];
        let q = Tensor::from_vec(q_vec.clone(), (b, 1, h, d), &Device::Cpu)?;

        // Create k and v with shape (b, kv_len, h, d) filled with ones
        let k_vec = vec![1.0f32; b * kv_len * h * d];
        let v_vec = vec![1.0f32; b * kv_len * h * d];
        let k = Tensor::from_vec(k_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;

        // SDPA parameters: scale = 1.0, no softcap
        let sdpa = SdpaParams {
            softmax_scale: 1.0,
            softcap: None,
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let scale = sdpa.softmax_scale;

        // Run the flash attention CPU function
        let out = run_flash_attn_cpu::<f32, f32>(&q, &k, &v, None, &sdpa)?;
        // Expect output shape (b, h, 1, d)
        assert_eq!(out.shape().dims(), &[b, h, 1, d]);

        // Naive attention
        let q_perm = q.clone().permute((0, 2, 1, 3))?;
        let k_perm = k.clone().permute((0, 2, 1, 3))?;
        let v_perm = v.clone().permute((0, 2, 1, 3))?;

        let q_resh = q_perm.reshape(&[b * h, 1, d])?;
        let k_resh = k_perm.reshape(&[b * h, kv_len, d])?;
        let v_resh = v_perm.reshape(&[b * h, kv_len, d])?;

        let logits = (q_resh.matmul(&k_resh.transpose(1, 2)?)? * scale as f64)?;
        let weights = softmax(&logits, D::Minus1)?;

        let attn_out = weights.matmul(&v_resh)?;

        let naive_out = attn_out.reshape(&[b, h, 1, d])?;

        let flash_data = out.flatten_all()?.to_vec1::<f32>()?;
        let naive_data = naive_out.flatten_all()?.to_vec1::<f32>()?;
        for (f_val, n_val) in flash_data.iter().zip(naive_data.iter()) {
            assert!((f_val - n_val).abs() < EPS);
        }

        Ok(())
    }

    #[test]
    fn test_flash_attn_cpu_full_q() -> CandleResult<()> {
        // Test for q_len > 1 (full Q)
        let b = 1;
        let q_len = 2;
        let h = 2;
        let d = 4;
        let kv_len = 2;

        // Create q with shape (b, q_len, h, d) filled with ones
        let q_vec = vec![1.0f32; b * q_len * h * d];
        let q = Tensor::from_vec(q_vec.clone(), (b, q_len, h, d), &Device::Cpu)?;

        // Create k and v with shape (b, kv_len, h, d) filled with ones
        let k_vec = vec![1.0f32; b * kv_len * h * d];
        let v_vec = vec![1.0f32; b * kv_len * h * d];
        let k = Tensor::from_vec(k_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;

        // SDPA parameters: scale = 1.0, no softcap
        let sdpa = SdpaParams {
            softmax_scale: 1.0,
            softcap: None,
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let scale = sdpa.softmax_scale;

        // Run the flash attention CPU function
        let out = run_flash_attn_cpu::<f32, f32>(&q, &k, &v, None, &sdpa)?;
        // Expect output shape (b, h, q_len, d)
        assert_eq!(out.shape().dims(), &[b, h, q_len, d]);

        // Naive attention
        let q_perm = q.clone().permute((0, 2, 1, 3))?;
        let k_perm = k.clone().permute((0, 2, 1, 3))?;
        let v_perm = v.clone().permute((0, 2, 1, 3))?;

        let q_resh = q_perm.reshape(&[b * h, q_len, d])?;
        let k_resh = k_perm.reshape(&[b * h, kv_len, d])?;
        let v_resh = v_perm.reshape(&[b * h, kv_len, d])?;

        let logits = (q_resh.matmul(&k_resh.transpose(1, 2)?)? * scale as f64)?;
        let weights = softmax(&logits, D::Minus1)?;

        let attn_out = weights.matmul(&v_resh)?;

        let naive_out = attn_out.reshape(&[b, h, q_len, d])?;

        // 7) Compare element‐by‐element
        let flash_data = out.flatten_all()?.to_vec1::<f32>()?;
        let naive_data = naive_out.flatten_all()?.to_vec1::<f32>()?;
        for (f_val, n_val) in flash_data.iter().zip(naive_data.iter()) {
            assert!((f_val - n_val).abs() < EPS);
        }

        Ok(())
    }

    #[test]
    fn test_flash_attn_cpu_single_q_softcap() -> CandleResult<()> {
        // Test for q_len == 1 (single Q) with softcap
        let b = 1;
        let h = 2;
        let d = 4;
        let kv_len = 2;

        // Create q with shape (b, 1, h, d) filled with ones
        let q_vec = vec![1.0f32; b * h * d];
        let q = Tensor::from_vec(q_vec.clone(), (b, 1, h, d), &Device::Cpu)?;

        // Create k and v with shape (b, kv_len, h, d) filled with ones
        let k_vec = vec![1.0f32; b * kv_len * h * d];
        let v_vec = vec![1.0f32; b * kv_len * h * d];
        let k = Tensor::from_vec(k_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;

        // SDPA parameters: scale = 1.0, softcap = Some(0.5)
        let sdpa = SdpaParams {
            softmax_scale: 1.0,
            softcap: Some(0.5),
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let scale = sdpa.softmax_scale;
        let sc = sdpa.softcap.unwrap();

        // Run the flash attention CPU function
        let out = run_flash_attn_cpu::<f32, f32>(&q, &k, &v, None, &sdpa)?;
        // Expect output shape (b, h, 1, d)
        assert_eq!(out.shape().dims(), &[b, h, 1, d]);

        // Naive attention with softcap
        let q_perm = q.clone().permute((0, 2, 1, 3))?;
        let k_perm = k.clone().permute((0, 2, 1, 3))?;
        let v_perm = v.clone().permute((0, 2, 1, 3))?;

        let q_resh = q_perm.reshape(&[b * h, 1, d])?;
        let k_resh = k_perm.reshape(&[b * h, kv_len, d])?;
        let v_resh = v_perm.reshape(&[b * h, kv_len, d])?;

        let logits = (q_resh.matmul(&k_resh.transpose(1, 2)?)? * scale as f64)?;

        let logits = (logits / sc as f64)?;
        let logits = logits.tanh()?;
        let logits = (logits * sc as f64)?;

        let weights = softmax(&logits, D::Minus1)?;
        let attn_out = weights.matmul(&v_resh)?;
        let naive_out = attn_out.reshape(&[b, h, 1, d])?;

        let flash_data = out.flatten_all()?.to_vec1::<f32>()?;
        let naive_data = naive_out.flatten_all()?.to_vec1::<f32>()?;
        for (f_val, n_val) in flash_data.iter().zip(naive_data.iter()) {
            assert!((f_val - n_val).abs() < EPS);
        }
        Ok(())
    }

    #[test]
    fn test_flash_attn_cpu_full_q_softcap() -> CandleResult<()> {
        // Test for q_len > 1 (full Q) with softcap
        let b = 1;
        let q_len = 2;
        let h = 2;
        let d = 4;
        let kv_len = 2;

        // Create q with shape (b, q_len, h, d) filled with ones
        let q_vec = vec![1.0f32; b * q_len * h * d];
        let q = Tensor::from_vec(q_vec.clone(), (b, q_len, h, d), &Device::Cpu)?;

        // Create k and v with shape (b, kv_len, h, d) filled with ones
        let k_vec = vec![1.0f32; b * kv_len * h * d];
        let v_vec = vec![1.0f32; b * kv_len * h * d];
        let k = Tensor::from_vec(k_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v_vec.clone(), (b, kv_len, h, d), &Device::Cpu)?;

        // SDPA parameters: scale = 1.0, softcap = Some(0.5)
        let sdpa = SdpaParams {
            softmax_scale: 1.0,
            softcap: Some(0.5),
            n_kv_groups: 1,
            sliding_window: None,
            sinks: None,
        };
        let scale = sdpa.softmax_scale;
        let sc = sdpa.softcap.unwrap();

        // Run the flash attention CPU function
        let out = run_flash_attn_cpu::<f32, f32>(&q, &k, &v, None, &sdpa)?;
        // Expect output shape (b, h, q_len, d)
        assert_eq!(out.shape().dims(), &[b, h, q_len, d]);

        // Naive attention with softcap
        let q_perm = q.clone().permute((0, 2, 1, 3))?;
        let k_perm = k.clone().permute((0, 2, 1, 3))?;
        let v_perm = v.clone().permute((0, 2, 1, 3))?;

        let q_resh = q_perm.reshape(&[b * h, q_len, d])?;
        let k_resh = k_perm.reshape(&[b * h, kv_len, d])?;
        let v_resh = v_perm.reshape(&[b * h, kv_len, d])?;

        let logits = (q_resh.matmul(&k_resh.transpose(1, 2)?)? * scale as f64)?;

        let logits = (logits / sc as f64)?;
        let logits = logits.tanh()?;
        let logits = (logits * sc as f64)?;

        let weights = softmax(&logits, D::Minus1)?;
        let attn_out = weights.matmul(&v_resh)?;
        let naive_out = attn_out.reshape(&[b, h, q_len, d])?;

        let flash_data = out.flatten_all()?.to_vec1::<f32>()?;
        let naive_data = naive_out.flatten_all()?.to_vec1::<f32>()?;
        for (f_val, n_val) in flash_data.iter().zip(naive_data.iter()) {
            assert!((f_val - n_val).abs() < EPS);
        }
        Ok(())
    }
}
