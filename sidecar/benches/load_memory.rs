//! `make bench`: the memory a model costs, on the real model (vendor/README.md, "weights mapped,
//! not copied").
//!
//! 1. In-process: `RssAnon` (private memory: the heap, thread stacks) and `RssFile` (mapped files)
//!    of a fresh process before and after `Engine::load`, and after one request; the growth of
//!    `RssAnon` against the GGUF file's size. Loading may add at most 10% of the file plus the
//!    engine's fixed allocations, measured as the growth of loading the same model without its
//!    weights (`tests/memory`) and named: the kernel thread pool (measured), the KV cache of
//!    the engine's warm-up step (computed from the model's shape), and the rest (the tokenizer,
//!    llguidance's token trie, RoPE tables, runtime; vendor/README.md has a heap profile).
//! 2. Two `sluice-sidecar serve` processes on the same file: from `/proc/<pid>/smaps`, their
//!    mappings of the model file hold one copy of its resident pages between them (the sum of
//!    their `Pss` is about one process's `Rss` of it), none of it private to either.
//!
//! Environment: `SLUICE_TEST_MODEL` (the Makefile exports it), `SLUICE_BENCH_BASELINE` (another
//! `sluice-sidecar` binary, e.g. a build before the change: part 2 for it too).
#![allow(clippy::unwrap_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/memory/mod.rs"]
mod memory;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use common::{Sidecar, free_port, load_engine, model_path};
use memory::{file_mapping, status_bytes};
use sluice_sidecar::engine::{ChatTurn, Event, GenerationParams, Prompt, start_kernel_threads};

const MB: f64 = 1e6;

#[derive(Clone, Copy, Debug)]
struct Snapshot {
    anon: u64,
    file: u64,
}

fn snapshot() -> Snapshot {
    Snapshot {
        anon: status_bytes("self", "RssAnon"),
        file: status_bytes("self", "RssFile"),
    }
}

fn mb(bytes: impl TryInto<i64>) -> String {
    let bytes: i64 = bytes.try_into().unwrap_or(i64::MAX);
    format!("{:.1}", bytes as f64 / MB)
}

/// `bin serve` on `model`, ready.
async fn serve(bin: &Path, model: &Path) -> Sidecar {
    let mut sidecar = Sidecar::launch(bin, model, free_port(), free_port(), &[]);
    sidecar.wait_ready().await;
    sidecar
}

/// What one `Engine::load` in a fresh process adds (this bench run again as a child, so that
/// each load starts from the same clean process).
#[derive(Clone, Copy, Debug)]
struct Load {
    /// Before anything: the process with its tokio runtime.
    start: Snapshot,
    /// The kernel thread pool started (as `Engine::load` starts it) and every worker running.
    pool: Snapshot,
    /// After `Engine::load`.
    loaded: Snapshot,
    /// After one request (every weight read once).
    served: Snapshot,
}

const CHILD_ENV: &str = "SLUICE_BENCH_LOAD_ONLY";

/// The child's side: loads the model at `CHILD_ENV`, prints the snapshots on one line.
fn child(model: PathBuf) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let start = snapshot();
    start_kernel_threads(None, 10);
    rayon::broadcast(|_| ());
    let pool = snapshot();
    let engine = rt.block_on(load_engine(model));
    let loaded = snapshot();
    rt.block_on(async {
        let params = GenerationParams {
            max_tokens: Some(4),
            temperature: Some(0.0),
            ..Default::default()
        };
        let prompt = Prompt::Chat(vec![ChatTurn {
            role: "user".into(),
            content: "Name a colour.".into(),
        }]);
        let prompt = engine.tokenize(&prompt).await.unwrap();
        let mut generation = engine.submit(prompt, &params, true).await.unwrap();
        while let Some(event) = generation.next().await {
            match event {
                Event::Delta { finish_reason, .. } if finish_reason.is_some() => break,
                Event::Done { .. } => break,
                Event::Delta { .. } => {}
                event => panic!("{event:?}"),
            }
        }
    });
    let served = snapshot();
    let line: Vec<String> = [start, pool, loaded, served]
        .iter()
        .flat_map(|s| [s.anon.to_string(), s.file.to_string()])
        .collect();
    println!("LOAD {}", line.join(" "));
}

fn measure_load(model: &Path) -> Load {
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, model)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "loading {} failed", model.display());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("LOAD "))
        .unwrap();
    let v: Vec<u64> = line.split(' ').map(|n| n.parse().unwrap()).collect();
    let s = |i: usize| Snapshot {
        anon: v[2 * i],
        file: v[2 * i + 1],
    };
    Load {
        start: s(0),
        pool: s(1),
        loaded: s(2),
        served: s(3),
    }
}

/// Two sidecars of `bin` on `model`: RssAnon at ready, and their mappings of the file after
/// one request each.
async fn two_sidecars(label: &str, bin: &Path, model: &Path) {
    let a = serve(bin, model).await;
    let b = serve(bin, model).await;
    let pids = [a.child.id(), b.child.id()];
    let ready = pids.map(|pid| status_bytes(&pid.to_string(), "RssAnon"));
    a.chat_once().await;
    b.chat_once().await;
    let maps = pids.map(|pid| file_mapping(pid, model));
    println!("\nTwo `sluice-sidecar serve` ({label}) on the same file, after one request each:");
    println!(
        "| sidecar | RssAnon at ready MB | mapping of the model | Rss MB | Pss MB | Shared_Clean MB | Private_Clean MB | Private_Dirty MB |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    for (i, (anon, m)) in ready.iter().zip(&maps).enumerate() {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            ["a", "b"][i],
            mb(*anon),
            if m.entries == 0 {
                "none (weights read into memory)"
            } else if m.shared_flag {
                "shared"
            } else {
                "private"
            },
            mb(m.rss),
            mb(m.pss),
            mb(m.shared_clean),
            mb(m.private_clean),
            mb(m.private_dirty)
        );
    }
    let pss: u64 = maps.iter().map(|m| m.pss).sum();
    let rss = maps.iter().map(|m| m.rss).max().unwrap();
    if rss > 0 {
        println!(
            "Sum of Pss: {} MB for {} MB resident, {:.2} copies of the file's resident pages.",
            mb(pss),
            mb(rss),
            pss as f64 / rss as f64
        );
    }
}

fn main() {
    if let Some(model) = std::env::var_os(CHILD_ENV) {
        return child(PathBuf::from(model));
    }
    let model = std::fs::canonicalize(model_path()).unwrap();
    let file_size = std::fs::metadata(&model).unwrap().len();
    let weightless = memory::copy_of(&model);
    let weightless_size = std::fs::metadata(&weightless).unwrap().len();

    // 1. In-process, each load in a fresh process.
    let real = measure_load(&model);
    let fixed = measure_load(&weightless);
    println!(
        "`Engine::load` (CPU) in a fresh process: {} ({} MB), and the same model without its \
         weights (every matrix cut to {} columns: {} MB):",
        model.file_name().unwrap().to_string_lossy(),
        mb(file_size),
        memory::WIDTH,
        mb(weightless_size)
    );
    println!(
        "| model | RssAnon before MB | + kernel threads MB | + load MB | + one request MB | RssFile + load MB | RssFile + request MB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let diff = |a: u64, b: u64| b as i64 - a as i64;
    for (label, l) in [("the model", real), ("without weights", fixed)] {
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} |",
            mb(l.start.anon),
            mb(diff(l.start.anon, l.pool.anon)),
            mb(diff(l.pool.anon, l.loaded.anon)),
            mb(diff(l.loaded.anon, l.served.anon)),
            mb(diff(l.pool.file, l.loaded.file)),
            mb(diff(l.loaded.file, l.served.file)),
        );
    }
    let growth = diff(real.start.anon, real.loaded.anon);
    let fixed_growth = diff(fixed.start.anon, fixed.loaded.anon);
    let threads = diff(fixed.start.anon, fixed.pool.anon);
    let kv = memory::warmup_kv_cache_bytes(&model) as i64;
    let allowed = file_size as i64 / 10 + fixed_growth;
    println!(
        "\nRssAnon grew {} MB at load: {:.0}% of the file.",
        mb(growth),
        growth as f64 * 100.0 / file_size as f64
    );
    println!(
        "The engine's fixed allocations (the load without weights): {} MB:",
        mb(fixed_growth)
    );
    println!(
        "- kernel thread pool (stacks, per-thread state): {} MB",
        mb(threads)
    );
    println!(
        "- the KV cache the engine keeps from its warm-up step (layers x K,V x 512 positions x \
         KV heads x head size x 4 bytes): {} MB",
        mb(kv)
    );
    println!(
        "- the rest: the tokenizer (vocabulary and merges built from the GGUF, and its copies), \
         llguidance's token trie, RoPE tables, the engine's runtime, the allocator's free lists: \
         {} MB",
        mb(fixed_growth - threads - kv)
    );
    println!(
        "Load growth {} MB {} 10% of the file plus the fixed allocations ({} + {} = {} MB): {}",
        mb(growth),
        if growth <= allowed { "<=" } else { ">" },
        mb(file_size / 10),
        mb(fixed_growth),
        mb(allowed),
        if growth <= allowed {
            "within"
        } else {
            "NOT within"
        }
    );

    // 2. Two sidecars on the same file (and, with SLUICE_BENCH_BASELINE, another build's).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let this = PathBuf::from(env!("CARGO_BIN_EXE_sluice-sidecar"));
    rt.block_on(two_sidecars("this build", &this, &model));
    if let Some(baseline) = std::env::var_os("SLUICE_BENCH_BASELINE") {
        rt.block_on(two_sidecars(
            "SLUICE_BENCH_BASELINE",
            Path::new(&baseline),
            &model,
        ));
    }
    let _ = std::fs::remove_file(&weightless);
}
