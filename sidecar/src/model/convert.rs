//! Converts GGUF weights to a quantization candle has fast CPU kernels for (Q4_0, Q8_0), once,
//! into a cache. candle has no AVX path for Q4_1; re-quantizing its weights to Q8_0 loses
//! almost nothing (8 bits hold a 4-bit block exactly up to rounding of the scale); Q4_0 drops
//! Q4_1's per-block minimum and is measurably lossy (tests/convert.rs has the numbers).

use std::{
    fs::File,
    io::{BufReader, BufWriter},
    path::{Path, PathBuf},
    time::{Instant, UNIX_EPOCH},
};

use candle_core::{
    Device,
    quantized::{GgmlDType, QTensor, gguf_file},
};

use crate::error::{Result, StartupError};

/// Weight quantizations the sidecar can convert to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Quant {
    /// 4-bit, block 32, one scale: AVX2 kernel, ~same size as Q4_1.
    #[value(name = "q4_0")]
    Q4_0,
    /// 8-bit, block 32: AVX2 kernel, best quality, ~1.9x the size of Q4_1.
    #[value(name = "q8_0")]
    Q8_0,
    /// Dense F16 weights (dequantized once, lossless w.r.t. the source): candle runs them
    /// through its batched GEMM, so prefill and many concurrent streams scale, at ~4x the
    /// memory of Q4_1 and a slower single stream.
    #[value(name = "f16")]
    F16,
}

/// `general.file_type` values (llama.cpp's `llama_ftype`).
fn file_type(quant: Quant) -> u32 {
    match quant {
        Quant::Q4_0 => 2,
        Quant::Q8_0 => 7,
        Quant::F16 => 1,
    }
}

fn ggml_dtype(quant: Quant) -> GgmlDType {
    match quant {
        Quant::Q4_0 => GgmlDType::Q4_0,
        Quant::Q8_0 => GgmlDType::Q8_0,
        Quant::F16 => GgmlDType::F16,
    }
}

fn suffix(quant: Quant) -> &'static str {
    match quant {
        Quant::Q4_0 => "q4_0",
        Quant::Q8_0 => "q8_0",
        Quant::F16 => "f16",
    }
}

/// Where the converted copy of `src` lives in `cache_dir`: named after the source, its size and
/// modification time, so a changed source is converted again.
pub fn cached_path(src: &Path, quant: Quant, cache_dir: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(src)
        .map_err(|e| StartupError::Model(format!("cannot read {}: {e}", src.display())))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stem = src
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(cache_dir.join(format!(
        "{stem}.{}-{:x}-{mtime:x}.gguf",
        suffix(quant),
        meta.len()
    )))
}

/// Returns a GGUF holding `src`'s weights in `quant`, converting (and caching) on first use.
pub fn ensure_converted(src: &Path, quant: Quant, cache_dir: &Path) -> Result<PathBuf> {
    if quant == Quant::Q4_0 {
        tracing::warn!(
            "converting to q4_0 loses accuracy (Q4_1's per-block minimum is dropped); \
             q8_0 keeps the predictions (see tests/convert.rs)"
        );
    }
    let dst = cached_path(src, quant, cache_dir)?;
    if dst.is_file() {
        tracing::info!(path = %dst.display(), "using cached converted weights");
        return Ok(dst);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| {
        StartupError::Model(format!(
            "cannot create cache dir {}: {e}",
            cache_dir.display()
        ))
    })?;
    convert(src, &dst, quant)?;
    Ok(dst)
}

/// Converts every block-quantized tensor of `src` to `quant` and writes `dst` (atomically,
/// through a temporary file). Float tensors (norms) stay as they are.
pub fn convert(src: &Path, dst: &Path, quant: Quant) -> Result<()> {
    let started = Instant::now();
    let model_err =
        |e: candle_core::Error| StartupError::Model(format!("converting {}: {e}", src.display()));
    let mut reader = BufReader::new(
        File::open(src)
            .map_err(|e| StartupError::Model(format!("cannot read {}: {e}", src.display())))?,
    );
    let content = gguf_file::Content::read(&mut reader).map_err(model_err)?;
    let target = ggml_dtype(quant);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    let mut converted = 0usize;
    for name in names {
        let tensor = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(model_err)?;
        let dims = tensor.shape().dims().to_vec();
        let last = dims.last().copied().unwrap_or(0);
        let dtype = tensor.dtype();
        let is_block_quant = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let tensor = if is_block_quant && dtype != target && last % target.block_size() == 0 {
            converted += 1;
            let dense = tensor.dequantize(&Device::Cpu).map_err(model_err)?;
            QTensor::quantize(&dense, target).map_err(model_err)?
        } else {
            tensor
        };
        tensors.push((name.clone(), tensor));
    }
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in metadata.iter_mut() {
        if k == "general.file_type" {
            *v = gguf_file::Value::U32(file_type(quant));
        }
    }
    // A per-process temporary name: several sidecars sharing a cache directory may convert the
    // same file at once; each writes its own file and the atomic rename makes the last one win.
    let tmp = dst.with_extension(format!("gguf.{}.part", std::process::id()));
    {
        let mut out =
            BufWriter::new(File::create(&tmp).map_err(|e| {
                StartupError::Model(format!("cannot write {}: {e}", tmp.display()))
            })?);
        let md: Vec<(&str, &gguf_file::Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut out, &md, &ts).map_err(model_err)?;
        std::io::Write::flush(&mut out)?;
    }
    std::fs::rename(&tmp, dst)?;
    tracing::info!(
        src = %src.display(),
        dst = %dst.display(),
        to = suffix(quant),
        tensors_converted = converted,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "converted weights"
    );
    Ok(())
}
