//! The weights are mapped from the model file, not copied (vendor/README.md): on the real binary
//! and model, a sidecar's private memory after load is what loading costs without the weights,
//! plus at most 10% of the file, and the file's pages it computes from are one shared, clean
//! copy that a second sidecar on the same node shares instead of holding its own.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "memory/mod.rs"]
mod memory;

use std::path::Path;

use candle_core::{Device, Tensor, quantized::gguf_file};
use common::*;
use memory::{file_mapping, status_bytes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_one_shared_clean_copy_not_private_memory() {
    let model = std::fs::canonicalize(model_path()).unwrap();
    let file_size = std::fs::metadata(&model).unwrap().len();
    let weightless = memory::copy_of(&model);

    // What loading costs apart from the weights (tokenizer, grammar trie, warm-up KV cache...).
    let fixed = {
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice-sidecar"));
        let mut other = Sidecar::launch(bin, &weightless, free_port(), free_port(), &[]);
        other.wait_ready().await;
        status_bytes(&other.child.id().to_string(), "RssAnon")
    };
    let _ = std::fs::remove_file(&weightless);

    let mut a = Sidecar::spawn(&[]);
    let mut b = Sidecar::spawn(&[]);
    a.wait_ready().await;
    b.wait_ready().await;
    for sidecar in [&a, &b] {
        let anon = status_bytes(&sidecar.child.id().to_string(), "RssAnon");
        eprintln!(
            "RssAnon at ready: {} MB; without the weights {} MB; file {} MB",
            anon >> 20,
            fixed >> 20,
            file_size >> 20
        );
        // Before, the weights were read onto the heap (and the embedding table dequantized to
        // F32): RssAnon held the file and more on top of the fixed allocations.
        assert!(
            anon <= fixed + file_size / 10,
            "RssAnon at ready is {} MB: more than the {} MB that loading costs without the \
             weights plus 10% of the {} MB file",
            anon >> 20,
            fixed >> 20,
            file_size >> 20
        );
    }

    // A request reads every weight (the embedding table too: it is also the output projection).
    a.chat_once().await;
    b.chat_once().await;
    for sidecar in [&a, &b] {
        let m = file_mapping(sidecar.child.id(), &model);
        eprintln!("mapping of the model: {m:?}");
        assert!(
            m.entries > 0,
            "the model file is not mapped: the weights were read into private memory"
        );
        assert!(
            m.shared_flag,
            "the model file is mapped private (copy-on-write), not shared: {m:?}"
        );
        assert_eq!(
            (m.anonymous, m.private_dirty, m.shared_dirty),
            (0, 0, 0),
            "pages of the model's mapping were written: {m:?}"
        );
        assert!(
            m.rss >= file_size * 9 / 10,
            "the weights were not computed from the mapping: {m:?}"
        );
        // Both sidecars map the same page-cache pages: each page counts once between them.
        assert!(
            m.shared_clean >= m.rss * 9 / 10,
            "the two sidecars do not share the model's pages: {m:?}"
        );
    }
}

/// The embedding lookup dequantizes only the rows it needs; each row holds exactly the values
/// the whole table dequantized held (before, the table was dequantized whole at load).
#[test]
fn embedding_rows_equal_the_dequantized_table() {
    let model = model_path();
    let mut file = std::fs::File::open(&model).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    // The embedding table (Q8_0 in the demo model) and a Q4_1 matrix.
    for name in ["token_embd.weight", "blk.0.attn_q.weight"] {
        let table = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let rows = table.shape().dims2().unwrap().0 as u32;
        let ids = [0, 1, rows - 1, rows / 2, 7, 1, 0];
        let looked_up = table.dequantize_rows(&ids).unwrap();
        let whole = table
            .dequantize(&Device::Cpu)
            .unwrap()
            .index_select(&Tensor::new(&ids[..], &Device::Cpu).unwrap(), 0)
            .unwrap();
        let bits = |t: &Tensor| -> Vec<Vec<u32>> {
            t.to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|row| row.into_iter().map(f32::to_bits).collect())
                .collect()
        };
        assert_eq!(bits(&looked_up), bits(&whole), "{name}");
        assert!(table.dequantize_rows(&[rows]).is_err(), "{name}");
    }
}
