//! Where the sidecar computes, as the binary a user runs shows it: the devices it was built for,
//! a refusal with one clear line when `--device cuda` cannot be honoured (never a silent fall back
//! to the CPU), and `--device auto` serving on what there is, saying so in its log and
//! `/metrics`. The same tests run against the CPU build (`make test`) and the CUDA build
//! (`make test-cuda`, which compiles this file with `--features cuda`).

mod common;

use std::process::Command;

use common::{Sidecar, get, model_path};
use sluice_crds::device::{DEVICE_CUDA, DEVICE_ENV};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-sidecar");

/// A GPU this process could use: the NVIDIA driver's control device exists.
fn gpu_here() -> bool {
    std::path::Path::new("/dev/nvidiactl").exists()
}

#[test]
fn devices_lists_what_the_build_computes_on() {
    let out = Command::new(BIN).arg("devices").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let built = text.lines().next().unwrap_or_default();
    if cfg!(feature = "cuda") {
        assert_eq!(built, "built with: cpu, cuda", "{text}");
    } else {
        assert_eq!(built, "built with: cpu", "{text}");
        assert!(
            text.contains("cuda: not in this build (the sluice-sidecar-cuda image has it)"),
            "{text}"
        );
    }
    assert!(text.lines().any(|l| l.starts_with("cpu: ")), "{text}");
    if cfg!(feature = "cuda") && gpu_here() {
        assert!(text.contains("cuda:0: "), "a GPU is here:\n{text}");
    }
}

#[test]
fn cuda_without_a_usable_gpu_stops_before_serving_with_one_line() {
    if cfg!(feature = "cuda") && gpu_here() {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    // As the operator asks a GPU pod to: through the environment.
    let out = Command::new(BIN)
        .args(["serve", "--model"])
        .arg(model_path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env(DEVICE_ENV, DEVICE_CUDA)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let expected = if cfg!(feature = "cuda") {
        "sluice-sidecar: error: --device cuda:0: no NVIDIA driver library (libcuda.so.1) in this \
         container: the pod needs a GPU from the NVIDIA device plugin (nvidia.com/gpu)"
    } else {
        "sluice-sidecar: error: --device cuda: this sidecar was built without CUDA; run the CUDA \
         image (sluice-sidecar-cuda) or pass --device cpu"
    };
    assert_eq!(last, expected, "whole output:\n{stderr}");
    // It stopped before binding a port or touching the model.
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(!stderr.contains("model loaded"), "{stderr}");
}

#[tokio::test]
async fn auto_serves_on_what_there_is_and_says_which() {
    let mut sidecar = Sidecar::spawn(&["--device", "auto"]);
    sidecar.wait_ready().await;
    let log = sidecar.log();
    let (_, metrics) = get(&format!("{}/metrics", sidecar.admin)).await.unwrap();
    let info = metrics
        .lines()
        .find(|l| l.starts_with("sluice_engine_device_info{"))
        .unwrap_or_else(|| panic!("no device info in /metrics:\n{metrics}"));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_engine_device_memory_bytes ")),
        "{metrics}"
    );
    if cfg!(feature = "cuda") && gpu_here() {
        assert!(info.contains("device=\"cuda:0\""), "{info}");
        assert!(
            info.contains("dtype=\"bf16\"") || info.contains("dtype=\"f16\""),
            "{info}"
        );
    } else {
        assert!(info.contains("device=\"cpu\""), "{info}");
        assert!(info.contains("dtype=\"f32\""), "{info}");
        // Why not a GPU: the build has none, or this machine.
        let why = if cfg!(feature = "cuda") {
            "no NVIDIA driver library"
        } else {
            "this build has no CUDA"
        };
        assert!(
            log.lines()
                .any(|l| l.contains("--device auto: computing on the CPU") && l.contains(why)),
            "{log}"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("engine device") && l.contains("memory_bytes=")),
        "{log}"
    );
}
