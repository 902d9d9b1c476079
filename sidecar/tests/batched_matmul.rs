//! The quantized matmul the engine runs on CPU (candle-core, patched in `vendor/candle-core` so
//! that several input rows share one pass over the weights) must give every row exactly what
//! the same row alone gets: otherwise a request's output would depend on what else the engine
//! batched with it. And it must still be the matmul: close to the dense product of the
//! dequantized weights.
#![allow(clippy::unwrap_used)]

use candle_core::{
    Device, Module, Tensor,
    quantized::{GgmlDType, QMatMul, QTensor},
};

/// Deterministic values in [-1, 1) (no RNG dependency, the same on every run).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn check(dtype: GgmlDType, k: usize, n: usize, rows: usize) {
    let dev = Device::Cpu;
    let w = Tensor::from_vec(values(n * k, 1), (n, k), &dev).unwrap();
    let qw = QTensor::quantize(&w, dtype).unwrap();
    let dense = qw.dequantize(&dev).unwrap();
    let mm = QMatMul::from_qtensor(qw).unwrap();
    let x = Tensor::from_vec(values(rows * k, 2), (rows, k), &dev).unwrap();

    let batched: Vec<Vec<f32>> = mm.forward(&x).unwrap().to_vec2().unwrap();
    let reference: Vec<Vec<f32>> = x.matmul(&dense.t().unwrap()).unwrap().to_vec2().unwrap();
    for (r, row) in batched.iter().enumerate() {
        let alone: Vec<f32> = mm
            .forward(&x.narrow(0, r, 1).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            row, &alone,
            "{dtype:?} {rows} rows: row {r} differs from row {r} alone"
        );
        for (c, (&got, &want)) in row.iter().zip(&reference[r]).enumerate() {
            // The activations are quantized to 8 bits per block: a relative error of about
            // 1% of the row's scale (sqrt(k) for values in [-1, 1)).
            let tolerance = 0.02 * (k as f32).sqrt();
            assert!(
                (got - want).abs() <= tolerance,
                "{dtype:?} {rows} rows: [{r}, {c}] = {got}, dense product {want}"
            );
        }
    }
}

#[test]
fn every_row_of_a_batch_gets_what_it_gets_alone() {
    // Shapes of the demo model (hidden 576, MLP 1536) and ragged ones: a column count that is
    // no multiple of the kernel's block of columns, one row, two, and a prefill's worth.
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for (k, n) in [(576, 1536), (1536, 576), (64, 13)] {
            for rows in [1, 2, 8, 37] {
                check(dtype, k, n, rows);
            }
        }
    }
    // K-quants (blocks of 256): what most published GGUF files use.
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        for rows in [1, 5] {
            check(dtype, 512, 100, rows);
        }
    }
}

/// The AVX2 quantizer of the activations (`quantize_row_q8_1`, patched in from llama.cpp with
/// the scalar rounding) gives the scalar code's blocks, bit for bit: values that scale to exact
/// halves (where AVX's own rounding, half to even, would differ), a zero block and extremes.
#[test]
fn activations_quantize_as_the_scalar_code_does() {
    use candle_core::quantized::k_quants::{BlockQ8_1, GgmlType, QK8_1};
    let blocks = 6;
    let mut xs = values(blocks * QK8_1, 7);
    // Block 1: max 127, so each value is its own scaled value: the halves stay halves.
    for (j, x) in xs[QK8_1..2 * QK8_1].iter_mut().enumerate() {
        *x = if j == 0 { 127.0 } else { j as f32 * 0.5 - 8.0 };
    }
    xs[2 * QK8_1..3 * QK8_1].fill(0.0);
    xs[3 * QK8_1] = -1e30;
    xs[4 * QK8_1 + 5] = 1e-30;
    let mut fast = vec![BlockQ8_1::zeros(); blocks];
    let mut scalar = vec![BlockQ8_1::zeros(); blocks];
    BlockQ8_1::from_float(&xs, &mut fast);
    BlockQ8_1::from_float_unopt(&xs, &mut scalar);
    for (b, (f, s)) in fast.iter().zip(&scalar).enumerate() {
        assert_eq!(format!("{f:?}"), format!("{s:?}"), "block {b}");
    }
}
