//! `make bench`: the engine's CPU quantized matmul on the demo model's shapes (30 layers of
//! q, k, v, o, gate, up and down projections), for 8 and 128 input rows, computed the way candle
//! did before `vendor/candle-core.patch` (one pass over the weights per row: here, one matmul per
//! row) and batched (one pass for all rows), side by side in one run. Prefill has one row per
//! prompt token; a decode step has one row per sequence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use candle_core::{
    Device, Module, Tensor,
    quantized::{GgmlDType, QMatMul, QTensor},
};

/// (in, out) features of one SmolLM2-135M layer's projections.
const LAYER: [(usize, usize); 7] = [
    (576, 576),
    (576, 192),
    (576, 192),
    (576, 576),
    (576, 1536),
    (576, 1536),
    (1536, 576),
];
const LAYERS: usize = 30;

/// Deterministic values in [-1, 1).
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

/// Best of `reps` wall times of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let dev = Device::Cpu;
    println!(
        "quantized matmul, {LAYERS} layers of SmolLM2-135M shapes (distinct weights per layer), rows/s (best of 3)"
    );
    println!("| weights | rows | one at a time | batched | speed-up |");
    println!("|---------|-----:|--------------:|--------:|---------:|");
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let weights: Vec<(QMatMul, usize)> = (0..LAYERS)
            .flat_map(|l| {
                LAYER
                    .iter()
                    .enumerate()
                    .map(move |(i, &(k, n))| (l, i, k, n))
            })
            .map(|(l, i, k, n)| {
                let w = Tensor::from_vec(values(n * k, (l * 7 + i) as u64), (n, k), &dev).unwrap();
                (
                    QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap(),
                    k,
                )
            })
            .collect();
        for rows in [8, 128] {
            let inputs: Vec<Tensor> = weights
                .iter()
                .map(|(_, k)| Tensor::from_vec(values(rows * k, 7), (rows, *k), &dev).unwrap())
                .collect();
            let one_by_one = best(3, || {
                for ((mm, _), x) in weights.iter().zip(&inputs) {
                    for r in 0..rows {
                        std::hint::black_box(mm.forward(&x.narrow(0, r, 1).unwrap()).unwrap());
                    }
                }
            });
            let batched = best(3, || {
                for ((mm, _), x) in weights.iter().zip(&inputs) {
                    std::hint::black_box(mm.forward(x).unwrap());
                }
            });
            println!(
                "| {:<7} | {rows:>4} | {:>13.0} | {:>7.0} | {:>7.2}x |",
                format!("{dtype:?}"),
                rows as f64 / one_by_one,
                rows as f64 / batched,
                one_by_one / batched
            );
        }
    }
}
