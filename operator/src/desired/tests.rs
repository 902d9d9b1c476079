//! The desired state of example models: names, owner references, sidecar flags, what rolls
//! pods and what does not, GPUs, autoscaling, model sources and invalid specs.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;

use sluice_crds::contract::{
    COMPLETION_TOKENS_PER_SECOND_SERIES, QUEUE_DEPTH_SERIES, REQUESTS_IN_FLIGHT_SERIES,
};
use sluice_crds::device::{DEVICE_CPU, DEVICE_CUDA, DEVICE_ENV, ENGINE_OVERHEAD_BYTES};
use sluice_crds::inference_model::DEFAULT_MAX_CONCURRENT_SEQUENCES;
use sluice_crds::lifecycle::{
    DRAIN_GRACE_SECS_FLAG, FIRST_TOKEN_TIMEOUT_SECS_FLAG, PRE_STOP_SLEEP_SECS,
    REQUEST_TIMEOUT_SECS, REQUEST_TIMEOUT_SECS_FLAG, termination_grace_period_secs,
};
use sluice_crds::quantity::parse_bytes;
use sluice_crds::sidecar_config::FALLBACK_TOKEN_FILE_FLAG;

use super::*;
use crate::fixtures::{desired_for, desired_with, model_from_yaml};
use crate::names::{
    ANNOTATION_VARIANT_HASH, GPU_PRODUCT_LABEL, GPU_RESOURCE, LABEL_ACTIVATOR, LABEL_MODEL,
};

const TWO_VARIANTS: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns, uid: "1234"}
spec:
  replicas: 2
  resources: {cpu: "2", memory: 1Gi}
  variants:
    - name: stable
      weight: 90
      model: {url: "https://example.com/a.gguf"}
      engine: {contextLength: 2048}
    - name: canary
      weight: 10
      model: {pvc: {claimName: weights, path: b.gguf}}
"#;

fn render(yaml: &str) -> Desired {
    desired_for(&model_from_yaml(yaml)).expect("renders")
}

fn container(d: &Deployment) -> &Container {
    &d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
        .containers[0]
}

fn template_hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .expect("template meta")
        .annotations
        .as_ref()
        .expect("annotations")[ANNOTATION_VARIANT_HASH]
        .clone()
}

#[test]
fn names_owner_refs_and_sidecar_args() {
    let d = render(TWO_VARIANTS);
    let names: Vec<_> = d.services.iter().map(|s| s.name_any()).collect();
    assert_eq!(names, ["chat", "chat-stable", "chat-canary"]);
    assert_eq!(d.deployments[0].name_any(), "chat-stable");
    assert_eq!(d.config_map.name_any(), "chat-sidecar-config");
    assert_eq!(d.service_account.name_any(), "chat-sidecar");
    assert_eq!(d.deployments[0].owner_references()[0].uid, "1234");
    let args = container(&d.deployments[0]).args.clone().expect("args");
    assert_eq!(
        args.join(" "),
        "serve --model /models/model.gguf --served-name chat --variant stable \
             --configmap ns/chat-sidecar-config --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090 \
             --forward-token-file /etc/sluice/forwarding/token --cache-dir /tmp/sluice-cache \
             --drain-grace-secs 300 --context-length 2048"
    );
    let canary = container(&d.deployments[1]).args.clone().expect("args");
    assert_eq!(canary[2], "/models/b.gguf");
    assert_eq!(
        d.deployments[0].spec.as_ref().and_then(|s| s.replicas),
        Some(2)
    );
    assert!(d.autoscalers.is_empty());
}

#[test]
fn weight_change_changes_only_the_config_map() {
    let a = render(TWO_VARIANTS);
    let b = render(
        &TWO_VARIANTS
            .replace("weight: 90", "weight: 80")
            .replace("weight: 10", "weight: 20"),
    );
    assert_ne!(a.config_map, b.config_map);
    assert_eq!(a.deployments, b.deployments, "weights must never roll pods");
    assert_eq!(a.services, b.services);
}

#[test]
fn model_change_rolls_only_that_variant() {
    let a = render(TWO_VARIANTS);
    let b = render(&TWO_VARIANTS.replace("a.gguf", "a2.gguf"));
    assert_ne!(
        template_hash(&a.deployments[0]),
        template_hash(&b.deployments[0])
    );
    assert_eq!(a.deployments[1], b.deployments[1]);
}

#[test]
fn gpu_adds_limit_selector_toleration_and_cuda_image() {
    let yaml = TWO_VARIANTS.replace(
            "resources: {cpu: \"2\", memory: 1Gi}",
            "resources: {cpu: \"2\", memory: 1Gi, gpu: {count: 1, product: NVIDIA-H100}}\n  scheduling: {nodeSelector: {pool: a}}",
        );
    let d = render(&yaml);
    let pod = d.deployments[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod");
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("sidecar-cuda:test"));
    let limits = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .expect("limits");
    assert_eq!(limits[GPU_RESOURCE], Quantity("1".into()));
    let ns = pod.node_selector.expect("selector");
    assert_eq!(ns[GPU_PRODUCT_LABEL], "NVIDIA-H100");
    assert_eq!(ns["pool"], "a");
    assert!(
        pod.tolerations
            .expect("tolerations")
            .iter()
            .any(|t| t.key.as_deref() == Some(GPU_RESOURCE))
    );
    // The fetch init container never asks for a GPU.
    let init = &pod.init_containers.expect("init")[0];
    assert!(
        init.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .is_some_and(|l| !l.contains_key(GPU_RESOURCE))
    );
}

fn env<'c>(c: &'c Container, name: &str) -> Option<&'c str> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn startup_allowance_secs(c: &Container) -> i32 {
    let p = c.startup_probe.as_ref().expect("startup probe");
    p.period_seconds.unwrap_or(10) * p.failure_threshold.unwrap_or(3)
}

#[test]
fn gpu_pods_are_told_to_compute_on_the_gpu_and_get_longer_to_load() {
    let cpu = render(TWO_VARIANTS);
    let gpu = render(&TWO_VARIANTS.replace(
        "resources: {cpu: \"2\", memory: 1Gi}",
        "resources: {cpu: \"2\", memory: 1Gi, gpu: {count: 1}}",
    ));
    let (cpu, gpu) = (
        container(&cpu.deployments[0]),
        container(&gpu.deployments[0]),
    );
    // The names the sidecar's --device reads (sidecar/src/engine/device.rs parses them).
    assert_eq!(env(cpu, DEVICE_ENV), Some(DEVICE_CPU));
    assert_eq!(env(gpu, DEVICE_ENV), Some(DEVICE_CUDA));
    // Which GPUs the container sees is the device plugin's to say.
    for name in ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"] {
        assert_eq!(env(gpu, name), None, "{name}");
    }
    assert_eq!(startup_allowance_secs(cpu), 300);
    assert_eq!(startup_allowance_secs(gpu), 600);
}

#[test]
fn model_size_sizes_the_memory_request_and_the_startup_allowance() {
    let yaml = TWO_VARIANTS
        .replace(
            "resources: {cpu: \"2\", memory: 1Gi}",
            "resources: {gpu: {count: 1}}",
        )
        .replace(
            "model: {url: \"https://example.com/a.gguf\"}",
            "model: {url: \"https://example.com/a.gguf\", size: 8Gi}",
        );
    let d = render(&yaml);
    let c = container(&d.deployments[0]);
    let r = c.resources.as_ref().expect("resources");
    let request = parse_bytes(&r.requests.as_ref().expect("requests")["memory"].0).unwrap();
    assert_eq!(request, (8u64 << 30) * 6 / 5 + ENGINE_OVERHEAD_BYTES);
    assert!(request > 8 << 30, "the request holds the weights");
    // No memory limit the operator made up: the weights' pages are reclaimable file pages.
    assert!(!r.limits.as_ref().expect("limits").contains_key("memory"));
    // Ten minutes for a GPU load, a minute more per 2 GiB of weights.
    assert_eq!(startup_allowance_secs(c), 600 + 4 * 60);
    // The variant without a size asks for no memory at all, as before.
    let other = container(&d.deployments[1])
        .resources
        .as_ref()
        .expect("resources");
    assert!(
        other
            .requests
            .as_ref()
            .is_none_or(|r| !r.contains_key("memory"))
    );

    // resources.memory, when set, is the request and the limit, whatever the size.
    let set = render(&yaml.replace("resources: {gpu: {count: 1}}", "resources: {memory: 2Gi}"));
    let r = container(&set.deployments[0])
        .resources
        .clone()
        .expect("resources");
    assert_eq!(
        r.requests.expect("requests")["memory"],
        Quantity("2Gi".into())
    );
    assert_eq!(r.limits.expect("limits")["memory"], Quantity("2Gi".into()));
}

#[test]
fn autoscaling_omits_replicas_and_renders_hpas() {
    let yaml = TWO_VARIANTS.replace(
            "replicas: 2",
            "autoscaling: {minReplicas: 1, maxReplicas: 3, metrics: [{type: CPU, target: 70}, {type: TokensPerSecond, target: 50}], behavior: {scaleDown: {stabilizationWindowSeconds: 600}}}",
        );
    let d = render(&yaml);
    assert_eq!(
        d.deployments[0].spec.as_ref().and_then(|s| s.replicas),
        None
    );
    assert_eq!(d.autoscalers.len(), 2);
    let spec = d.autoscalers[1].spec.clone().expect("spec");
    assert_eq!(spec.scale_target_ref.name, "chat-canary");
    let metrics = spec.metrics.expect("metrics");
    assert_eq!(
        metrics[1].pods.as_ref().expect("pods").metric.name,
        "sluice_completion_tokens_per_second"
    );
    assert_eq!(
        metrics[1].pods.as_ref().expect("pods").metric.name,
        COMPLETION_TOKENS_PER_SECOND_SERIES
    );
    assert_eq!(
        spec.behavior
            .and_then(|b| b.scale_down)
            .and_then(|s| s.stabilization_window_seconds),
        Some(600)
    );
}

#[test]
fn every_pods_metric_an_autoscaler_uses_is_a_contract_series() {
    let yaml = TWO_VARIANTS.replace(
        "replicas: 2",
        "autoscaling: {minReplicas: 1, maxReplicas: 3, metrics: [{type: InFlightRequests, target: 8}, {type: QueueDepth, target: 2}, {type: TokensPerSecond, target: 50}]}",
    );
    for hpa in render(&yaml).autoscalers {
        let names: Vec<String> = hpa
            .spec
            .and_then(|s| s.metrics)
            .expect("metrics")
            .into_iter()
            .map(|m| {
                assert_eq!(m.type_, "Pods");
                m.pods.expect("pods").metric.name
            })
            .collect();
        assert_eq!(
            names,
            [
                REQUESTS_IN_FLIGHT_SERIES,
                QUEUE_DEPTH_SERIES,
                COMPLETION_TOKENS_PER_SECOND_SERIES
            ]
        );
    }
}

#[test]
fn shedding_starts_at_the_engines_concurrency_the_smallest_of_any_variant() {
    let mark = |yaml: &str| render(yaml).sidecar_config.saturation.max_in_flight;
    // Unset everywhere: the sidecar's own default.
    assert_eq!(mark(TWO_VARIANTS), Some(DEFAULT_MAX_CONCURRENT_SEQUENCES));
    // One variant runs 8 and the other the default: every pod sheds at 8.
    let one_set = TWO_VARIANTS.replace(
        "engine: {contextLength: 2048}",
        "engine: {contextLength: 2048, maxConcurrentSequences: 8}",
    );
    assert_eq!(mark(&one_set), Some(8));
    let larger = TWO_VARIANTS.replace(
        "engine: {contextLength: 2048}",
        "engine: {contextLength: 2048, maxConcurrentSequences: 64}",
    );
    assert_eq!(mark(&larger), Some(DEFAULT_MAX_CONCURRENT_SEQUENCES));
    // What the sidecar reads: the document in the ConfigMap.
    let d = render(&one_set);
    let text = &d.config_map.data.as_ref().expect("data")["sidecar.yaml"];
    let config = SidecarConfig::from_yaml(text).expect("the sidecar accepts it");
    assert_eq!(config.saturation.max_in_flight, Some(8));
    // A concurrency change re-renders the config (no restart) as well as the pods' flag.
    assert_ne!(render(TWO_VARIANTS).config_map, d.config_map);
}

/// The value after `flag` in a container's args.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

#[test]
fn pods_sleep_before_sigterm_and_drain_as_long_as_a_request_may_take() {
    // Default request timeout; then one variant's set to 10 minutes, first token within 30 s.
    let slow = TWO_VARIANTS.replace(
        "engine: {contextLength: 2048}",
        "engine: {contextLength: 2048, requestTimeout: 10m, firstTokenTimeout: 30s}",
    );
    assert_ne!(
        slow, TWO_VARIANTS,
        "the fixture has an engine block to extend"
    );
    for (yaml, timeouts) in [
        (TWO_VARIANTS, vec![REQUEST_TIMEOUT_SECS; 2]),
        (slow.as_str(), vec![600, REQUEST_TIMEOUT_SECS]),
    ] {
        let d = render(yaml);
        for (deployment, timeout) in d.deployments.iter().zip(timeouts) {
            let pod = deployment
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .expect("pod spec");
            let sidecar = &pod.containers[0];
            let sleep = sidecar
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|h| h.sleep.as_ref())
                .expect("a preStop sleep (the image has no shell for exec)");
            assert_eq!(sleep.seconds, i64::from(PRE_STOP_SLEEP_SECS));
            let args = sidecar.args.as_ref().expect("args");
            let drain: i64 = flag_value(args, &format!("--{DRAIN_GRACE_SECS_FLAG}"))
                .expect("drain flag")
                .parse()
                .expect("whole seconds");
            assert_eq!(
                drain,
                i64::from(timeout),
                "the drain is the request timeout"
            );
            let grace = pod.termination_grace_period_seconds.expect("grace period");
            assert_eq!(grace, i64::from(termination_grace_period_secs(timeout)));
            assert!(
                grace > sleep.seconds + drain,
                "the kubelet would SIGKILL mid-drain: {grace} s for a {} s sleep and a {drain} s drain",
                sleep.seconds
            );
            // The timeouts reach the sidecar only when set, as seconds its flags parse.
            let request = flag_value(args, &format!("--{REQUEST_TIMEOUT_SECS_FLAG}"));
            let first = flag_value(args, &format!("--{FIRST_TOKEN_TIMEOUT_SECS_FLAG}"));
            if timeout == 600 {
                assert_eq!((request, first), (Some("600"), Some("30")));
            } else {
                assert_eq!((request, first), (None, None));
            }
        }
    }
}

#[test]
fn huggingface_source_becomes_a_resolve_url() {
    let yaml = TWO_VARIANTS.replace(
            "{url: \"https://example.com/a.gguf\"}",
            "{huggingFace: {repo: o/r, file: m.gguf, revision: abc}, sha256: \"AB00000000000000000000000000000000000000000000000000000000000000\"}",
        );
    let d = render(&yaml);
    let pod = d.deployments[0]
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod");
    let args = pod.init_containers.expect("init")[0]
        .args
        .clone()
        .expect("args");
    assert_eq!(
        args.join(" "),
        "fetch --url https://huggingface.co/o/r/resolve/abc/m.gguf --sha256 ab00000000000000000000000000000000000000000000000000000000000000 --out /models/model.gguf"
    );
}

#[test]
fn invalid_specs_are_rejected_with_the_reason() {
    let bad = TWO_VARIANTS.replace("weight: 10", "weight: 20");
    let err = desired_for(&model_from_yaml(&bad)).expect_err("weights sum to 110");
    assert!(err.to_string().contains("sum to 110"), "{err}");
    let bad = TWO_VARIANTS.replace("name: canary", "name: stable");
    assert!(
        model_from_yaml(&bad)
            .validate()
            .expect_err("dup")
            .contains("unique")
    );
    let bad = TWO_VARIANTS.replace(
        "model: {url: \"https://example.com/a.gguf\"}",
        "model: {url: \"https://example.com/a.gguf\", size: lots}",
    );
    let err = model_from_yaml(&bad).validate().expect_err("size");
    assert!(err.contains("model.size"), "{err}");
    // The CEL rules on the engine's timeouts, for a model applied without them.
    for (engine, reason) in [
        (
            "requestTimeout: 0s",
            "engine.requestTimeout must be positive",
        ),
        (
            "firstTokenTimeout: 0s",
            "engine.firstTokenTimeout must be positive",
        ),
        (
            "requestTimeout: 30s, firstTokenTimeout: 1m",
            "must not exceed requestTimeout (30s)",
        ),
        (
            "firstTokenTimeout: 6m",
            "must not exceed requestTimeout (300s)",
        ),
    ] {
        let bad = TWO_VARIANTS.replace(
            "engine: {contextLength: 2048}",
            &format!("engine: {{contextLength: 2048, {engine}}}"),
        );
        let err = model_from_yaml(&bad).validate().expect_err(engine);
        assert!(err.contains(reason), "{engine}: {err}");
    }
}

#[test]
fn rendering_is_deterministic() {
    assert_eq!(
        render(TWO_VARIANTS).to_yaml().expect("yaml"),
        render(TWO_VARIANTS).to_yaml().expect("yaml")
    );
}

#[test]
fn the_breaker_reaches_the_sidecar_config_in_whole_seconds() {
    let config_of = |yaml: &str| {
        let d = render(yaml);
        let text = &d.config_map.data.as_ref().expect("data")["sidecar.yaml"];
        SidecarConfig::from_yaml(text).expect("the sidecar accepts it")
    };
    // Unset: absent, and the sidecar uses its defaults.
    assert_eq!(config_of(TWO_VARIANTS).routing.breaker, None);
    let with = TWO_VARIANTS.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  routing: {breaker: {consecutiveFailures: 3, openFor: 1m30s}}\n",
    );
    let breaker = config_of(&with).routing.breaker.expect("breaker");
    assert_eq!(
        (breaker.consecutive_failures, breaker.open_seconds),
        (3, 90)
    );
    let only_time = TWO_VARIANTS.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  routing: {breaker: {openFor: 1500ms}}\n",
    );
    let breaker = config_of(&only_time).routing.breaker.expect("breaker");
    assert_eq!((breaker.consecutive_failures, breaker.open_seconds), (5, 2));
    let too_short = TWO_VARIANTS.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  routing: {breaker: {openFor: 100ms}}\n",
    );
    let err = model_from_yaml(&too_short)
        .validate()
        .expect_err("too short");
    assert!(err.contains("openFor must be at least 1s"), "{err}");
}

#[test]
fn a_fallback_model_is_addressed_and_its_token_mounted_optionally() {
    let with = TWO_VARIANTS.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  fallback: {model: backup}\n",
    );
    let d = render(&with);
    let text = &d.config_map.data.as_ref().expect("data")["sidecar.yaml"];
    let config = SidecarConfig::from_yaml(text).expect("the sidecar accepts it");
    let fallback = config.fallback.expect("fallback");
    assert_eq!(fallback.model, "backup");
    assert_eq!(fallback.address, "http://backup.ns.svc:8080");
    for deployment in &d.deployments {
        let pod = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec");
        let args = pod.containers[0].args.as_ref().expect("args");
        let file = flag_value(args, &format!("--{FALLBACK_TOKEN_FILE_FLAG}")).expect("flag");
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| file.starts_with(&format!("{}/", m.mount_path)))
            .expect("the token file is on a mount");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("its volume");
        let secret = volume.secret.as_ref().expect("a Secret");
        assert_eq!(secret.secret_name.as_deref(), Some("backup-forwarding"));
        assert_eq!(
            secret.optional,
            Some(true),
            "a missing fallback must not keep pods from starting"
        );
    }
    // Without one: no flag, no volume.
    let d = render(TWO_VARIANTS);
    let args = d.deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert!(flag_value(&args, &format!("--{FALLBACK_TOKEN_FILE_FLAG}")).is_none());
    // Itself: refused.
    let itself = TWO_VARIANTS.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  fallback: {model: chat}\n",
    );
    let err = model_from_yaml(&itself).validate().expect_err("itself");
    assert!(err.contains("spec.fallback.model"), "{err}");
}

#[test]
fn a_response_cache_reaches_the_sidecars_with_its_defaults() {
    let config_of = |yaml: &str| {
        let d = render(yaml);
        let text = &d.config_map.data.as_ref().expect("data")["sidecar.yaml"];
        SidecarConfig::from_yaml(text).expect("the sidecar accepts it")
    };
    assert_eq!(config_of(TWO_VARIANTS).cache, None);
    let on = TWO_VARIANTS.replace("  replicas: 2\n", "  replicas: 2\n  cache: {}\n");
    let cache = config_of(&on).cache.expect("cache");
    assert_eq!(
        (cache.max_bytes, cache.ttl_seconds, cache.shared),
        (64 << 20, 600, false)
    );
    let set = TWO_VARIANTS.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  cache: {maxSize: 1Mi, ttl: 90s, shared: true}\n",
    );
    let cache = config_of(&set).cache.expect("cache");
    assert_eq!(
        (cache.max_bytes, cache.ttl_seconds, cache.shared),
        (1 << 20, 90, true)
    );
    let bad = TWO_VARIANTS.replace("  replicas: 2\n", "  replicas: 2\n  cache: {ttl: 10ms}\n");
    let err = model_from_yaml(&bad).validate().expect_err("too short");
    assert!(err.contains("cache.ttl"), "{err}");
}

/// A model named `name` in `ns`, served as `served` (none: its name).
fn neighbour(name: &str, served: Option<&str>) -> InferenceModel {
    let served = served.map_or(String::new(), |s| format!("  servedName: {s}\n"));
    model_from_yaml(&format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: InferenceModel\n\
         metadata: {{name: {name}, namespace: ns}}\nspec:\n{served}  variants:\n    \
         - {{name: a, weight: 100, model: {{url: \"https://e.com/a.gguf\"}}}}\n"
    ))
}

#[test]
fn the_sidecars_answer_for_every_other_model_of_the_namespace() {
    let model = model_from_yaml(TWO_VARIANTS);
    let mut deleting = neighbour("d", None);
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(crate::fixtures::test_now()),
    );
    let namespace = [
        neighbour("g", Some("dup")),
        model.clone(),
        neighbour("c", None),
        neighbour("b", Some("bee")),
        deleting,
        // Served under this model's own name: this model's pods serve that name.
        neighbour("e", Some("chat")),
        neighbour("f", Some("dup")),
    ];
    let d = crate::fixtures::desired_in(&model, &namespace).expect("renders");
    let text = &d.config_map.data.as_ref().expect("data")["sidecar.yaml"];
    let config = SidecarConfig::from_yaml(text).expect("the sidecar accepts it");
    let listed: Vec<(&str, &str)> = config
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.address.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            ("bee", "http://b.ns.svc:8080"),
            ("c", "http://c.ns.svc:8080"),
            // Two models served as one name: the first by object name takes it.
            ("dup", "http://f.ns.svc:8080"),
        ]
    );
    // The order the models are listed in does not matter; what they are does.
    let mut reversed = namespace.to_vec();
    reversed.reverse();
    let again = crate::fixtures::desired_in(&model, &reversed).expect("renders");
    assert_eq!(again.sidecar_config, d.sidecar_config);
    let fewer = crate::fixtures::desired_in(&model, &namespace[..3]).expect("renders");
    assert_ne!(
        fewer.sidecar_config.generation, d.sidecar_config.generation,
        "the sealed generation covers the list"
    );
    // Alone in its namespace: no list at all (the document is as before).
    assert!(
        !render(TWO_VARIANTS).config_map.data.expect("data")["sidecar.yaml"].contains("models")
    );
}

const SCALES_TO_ZERO: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns}
spec:
  autoscaling:
    minReplicas: 0
    maxReplicas: 3
    idleAfter: 10m
    activationTimeout: 2m
    metrics: [{type: QueueDepth, target: 4}]
  variants:
    - {name: stable, weight: 90, model: {url: "https://example.com/a.gguf"}}
    - {name: canary, weight: 10, model: {pvc: {claimName: weights, path: b.gguf}}}
"#;

#[test]
fn a_model_that_scales_to_zero_gets_an_activator_that_may_scale_only_its_deployments() {
    let d = render(SCALES_TO_ZERO);
    // The HPAs keep a floor of 1: going to 0 is the operator's.
    for hpa in &d.autoscalers {
        assert_eq!(hpa.spec.as_ref().and_then(|s| s.min_replicas), Some(1));
    }
    let activator = d.activator.as_ref().expect("an activator");
    assert_eq!(activator.name_any(), "chat-activator");
    let args = container(activator).args.clone().expect("args");
    assert_eq!(
        args,
        [
            "activate",
            "--wake",
            "chat-stable",
            "--wake",
            "chat-canary",
            "--upstream",
            "http://chat-stable.ns.svc:8080",
            "--upstream",
            "http://chat-canary.ns.svc:8080",
            "--hold-timeout-secs",
            "120",
        ]
    );
    // Its pods do not carry the model's label (the model's Service selects that).
    let pod_labels = activator
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    assert!(!pod_labels.contains_key(LABEL_MODEL));
    assert_eq!(pod_labels[LABEL_ACTIVATOR], "chat");
    // The Role lets the pods scale exactly the model's Deployments.
    let rules = d.role.rules.clone().expect("rules");
    let scale = rules
        .iter()
        .find(|r| r.resources.as_deref() == Some(&["deployments/scale".to_owned()]))
        .expect("a scale rule");
    assert_eq!(
        scale.resource_names.as_deref(),
        Some(&["chat-stable".to_owned(), "chat-canary".to_owned()][..])
    );
    assert_eq!(scale.verbs, ["get", "patch"]);
    // A model that does not scale to zero has neither.
    let plain = render(TWO_VARIANTS);
    assert!(plain.activator.is_none());
    assert_eq!(plain.role.rules.expect("rules").len(), 1);
}

#[test]
fn the_model_service_selects_the_activator_while_no_pod_is_ready_or_it_is_at_zero() {
    let model = model_from_yaml(SCALES_TO_ZERO);
    let selector = |model: &InferenceModel, ready: &ReadyCounts| {
        desired_with(model, &ModelLimits::default(), ready)
            .expect("renders")
            .services[0]
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .expect("selector")
    };
    let none = ReadyCounts::none();
    let one: ReadyCounts = [("stable", 1)].into_iter().collect();
    assert_eq!(selector(&model, &none)[LABEL_ACTIVATOR], "chat");
    assert_eq!(selector(&model, &one)[LABEL_MODEL], "chat");
    // Decided idle (status): the activator takes requests before the last pod stops.
    let mut idle = model.clone();
    idle.status = Some(sluice_crds::InferenceModelStatus {
        scaled_to_zero: true,
        ..Default::default()
    });
    assert_eq!(selector(&idle, &one)[LABEL_ACTIVATOR], "chat");
    // Without scale to zero, the model's pods whatever is ready.
    assert_eq!(
        selector(&model_from_yaml(TWO_VARIANTS), &none)[LABEL_MODEL],
        "chat"
    );
}

#[test]
fn the_operators_tracing_settings_reach_every_sidecar_and_activator() {
    let settings = Settings {
        tracing_env: vec![(
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            "http://collector:4318".to_owned(),
        )],
        ..crate::fixtures::settings()
    };
    let zero = model_from_yaml(
        &TWO_VARIANTS.replace(
            "  replicas: 2\n",
            "  autoscaling: {minReplicas: 0, maxReplicas: 2, metrics: [{type: QueueDepth, target: 4}]}\n",
        ),
    );
    let (_, desired) = crate::controller::desired_state(
        &zero,
        "ns",
        &settings,
        &crate::policy::merge::ModelLimits::default(),
        &crate::observe::ReadyCounts::none(),
        &[],
    )
    .expect("renders");
    let containers: Vec<&Container> = desired
        .deployments
        .iter()
        .chain(desired.activator.iter())
        .map(container)
        .collect();
    assert_eq!(containers.len(), 3, "two variants and the activator");
    for c in containers {
        let env = c.env.as_ref().expect("env");
        assert!(
            env.iter().any(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT"
                && e.value.as_deref() == Some("http://collector:4318")),
            "{}: {env:?}",
            c.name
        );
    }
    // Without them, nothing is added.
    for d in &render(TWO_VARIANTS).deployments {
        let env = container(d).env.as_ref().expect("env");
        assert!(!env.iter().any(|e| e.name.starts_with("OTEL_")), "{env:?}");
    }
}
