//! What `benches/load_memory.rs` and `tests/mapped_weights.rs` (through `#[path]`) measure memory
//! with: a process's `RssAnon`, its mappings of a file (`/proc/<pid>/smaps`), and the model
//! without its weights: the same GGUF metadata (tokenizer, chat template, architecture: layers,
//! heads, head size, context) with every weight matrix cut to [`WIDTH`] columns. Loading that
//! costs what loading the model costs apart from the weights (the engine's fixed allocations:
//! tokenizer, grammar token trie, the warm-up step's KV cache, RoPE tables, threads).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use candle_core::{
    Device, Tensor,
    quantized::{GgmlDType, QTensor, gguf_file},
};

/// A field of `/proc/<pid>/status` in bytes (`self` for this process).
pub fn status_bytes(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// The sizes (bytes) of one process's mappings of one file, summed over its `/proc/<pid>/smaps`
/// entries.
#[derive(Debug, Default)]
pub struct FileMapping {
    pub entries: usize,
    pub shared_flag: bool,
    pub size: u64,
    pub rss: u64,
    pub pss: u64,
    pub shared_clean: u64,
    pub shared_dirty: u64,
    pub private_clean: u64,
    pub private_dirty: u64,
    pub anonymous: u64,
}

pub fn file_mapping(pid: u32, file: &Path) -> FileMapping {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let file = file.to_str().unwrap();
    let mut total = FileMapping::default();
    let mut in_file = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, perms, offset, device, inode, path.
            let perms = fields.next().unwrap_or_default();
            in_file = fields.nth(3) == Some(file);
            if in_file {
                total.entries += 1;
                total.shared_flag |= perms.ends_with('s');
            }
            continue;
        }
        if !in_file {
            continue;
        }
        let Some(kb) = fields.next().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        let bytes = kb * 1024;
        match first {
            "Size:" => total.size += bytes,
            "Rss:" => total.rss += bytes,
            "Pss:" => total.pss += bytes,
            "Shared_Clean:" => total.shared_clean += bytes,
            "Shared_Dirty:" => total.shared_dirty += bytes,
            "Private_Clean:" => total.private_clean += bytes,
            "Private_Dirty:" => total.private_dirty += bytes,
            "Anonymous:" => total.anonymous += bytes,
            _ => {}
        }
    }
    total
}

/// The hidden and feed-forward size of the copy (one Q8_0 block).
pub const WIDTH: usize = 32;

/// Writes the weight-less copy of the llama-architecture GGUF `model` to `out` (heads and head
/// size kept through `attention.key_length`, so the KV cache and RoPE tables are the model's).
pub fn write(model: &Path, out: &Path) {
    let mut file = std::fs::File::open(model).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let meta = &content.metadata;
    let arch = meta["general.architecture"].to_string().unwrap().clone();
    assert_eq!(
        arch, "llama",
        "the weight-less copy is written for llama models"
    );
    let u32_of = |key: &str| match &meta[&format!("{arch}.{key}")] {
        gguf_file::Value::U32(v) => *v as usize,
        v => panic!("{key}: {v:?}"),
    };
    let (hidden, heads, kv_heads) = (
        u32_of("embedding_length"),
        u32_of("attention.head_count"),
        u32_of("attention.head_count_kv"),
    );
    let head_dim = hidden / heads;
    let vocab = content.tensor_infos["token_embd.weight"].shape.dims()[0];

    let mut metadata: Vec<(String, gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let set = |metadata: &mut Vec<(String, gguf_file::Value)>, key: &str, value: usize| {
        let key = format!("{arch}.{key}");
        metadata.retain(|(k, _)| *k != key);
        metadata.push((key, gguf_file::Value::U32(value as u32)));
    };
    set(&mut metadata, "embedding_length", WIDTH);
    set(&mut metadata, "feed_forward_length", WIDTH);
    set(&mut metadata, "attention.key_length", head_dim);
    set(&mut metadata, "attention.value_length", head_dim);

    let zeros = |shape: &[usize], dtype| {
        let t = Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        let suffix = name.rsplit_once('.').map(|(_, s)| s).unwrap_or_default();
        let layer = name.strip_suffix(&format!(".{suffix}")).unwrap_or(name);
        let role = layer.rsplit('.').next().unwrap_or(layer);
        let shape: Vec<usize> = match role {
            "token_embd" | "output" => vec![vocab, WIDTH],
            "output_norm" | "attn_norm" | "ffn_norm" => vec![WIDTH],
            "attn_q" => vec![heads * head_dim, WIDTH],
            "attn_k" | "attn_v" => vec![kv_heads * head_dim, WIDTH],
            "attn_output" => vec![WIDTH, heads * head_dim],
            "ffn_gate" | "ffn_up" | "ffn_down" => vec![WIDTH, WIDTH],
            other => panic!("unexpected tensor {name} ({other})"),
        };
        let dtype = if shape.len() == 1 {
            GgmlDType::F32
        } else {
            GgmlDType::Q8_0
        };
        tensors.push((name.clone(), zeros(&shape, dtype)));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    let mut w = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut w, &metadata, &tensors).unwrap();
}

/// The weight-less copy of `model` in the temporary directory, written once per process.
pub fn copy_of(model: &Path) -> PathBuf {
    let out = std::env::temp_dir().join(format!(
        "sluice-weightless-{}-{}",
        std::process::id(),
        model.file_name().unwrap().to_string_lossy()
    ));
    if !out.exists() {
        write(model, &out);
    }
    out
}

/// Bytes of KV cache the engine keeps from its warm-up step at start: one sequence's K and V
/// for every layer, at the 512 positions a cache block holds (`gguf`: the model).
pub fn warmup_kv_cache_bytes(model: &Path) -> u64 {
    let mut file = std::fs::File::open(model).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let get = |key: &str| content.metadata[&format!("llama.{key}")].to_u32().unwrap() as u64;
    let head_dim = match content.metadata.get("llama.attention.key_length") {
        Some(v) => v.to_u32().unwrap() as u64,
        None => get("embedding_length") / get("attention.head_count"),
    };
    get("block_count") * 2 * 512 * get("attention.head_count_kv") * head_dim * 4
}
