//! RateLimitPolicy on the example model: the sidecar config the operator writes for the example
//! policies matches the committed golden documents (regenerate with
//! `SLUICE_BLESS=1 cargo test -p sluice-operator --test policy`), and the policy status reports
//! acceptance, conflicts and convergence the way `kubectl get rlp` shows them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use sluice_crds::{InferenceModel, RateLimitPolicy, SidecarConfig};
use sluice_operator::desired::sidecar_config::desired_sidecar_config;
use sluice_operator::desired::weights::for_plan;
use sluice_operator::observe::ReadyCounts;
use sluice_operator::policy::{self, KeysSecrets, PodGeneration, TargetObservation};
use sluice_operator::rollout::route_plan;
use sluice_operator::scrape::{self, MetricsSource, PodEndpoint, Sample, ScrapeError};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(name: &str) -> String {
    std::fs::read_to_string(workspace().join("examples").join(name)).expect("example exists")
}

fn model() -> InferenceModel {
    serde_yaml::from_str(&example("inferencemodel.yaml")).expect("model")
}

/// An example policy, created `second`s after a fixed instant (the free tier is the older).
fn example_policy(file: &str, second: i64) -> RateLimitPolicy {
    let mut p: RateLimitPolicy = serde_yaml::from_str(&example(file)).expect("policy");
    p.metadata.namespace = Some("default".into());
    p.metadata.generation = Some(1);
    p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::from_second(1_700_000_000 + second).expect("time"),
    ));
    p
}

fn free() -> RateLimitPolicy {
    example_policy("ratelimitpolicy-free.yaml", 0)
}

fn paid() -> RateLimitPolicy {
    example_policy("ratelimitpolicy-paid.yaml", 60)
}

fn secrets() -> KeysSecrets {
    let secret: Secret = serde_yaml::from_str(&example("api-keys-secret.yaml")).expect("secret");
    KeysSecrets::from_secrets([&secret])
}

fn now() -> Timestamp {
    Timestamp::from_second(1_700_000_600).expect("time")
}

/// The sidecar config the operator writes for the example model under `policies`, with
/// `ready` pods serving it.
fn sidecar_config(policies: &[RateLimitPolicy], ready: i32) -> SidecarConfig {
    let model = model();
    let resolution = policy::resolve(
        std::slice::from_ref(&model),
        policies,
        &secrets(),
        &BTreeMap::new(),
    );
    let ready: ReadyCounts = [("default", ready)].into_iter().collect();
    let weights = for_plan(&route_plan(&model), &ready);
    desired_sidecar_config(
        &model,
        "default",
        &resolution.models["smollm2"],
        &weights,
        &ready,
        &[],
    )
    .expect("renders")
}

#[test]
fn example_policies_match_golden_sidecar_configs() {
    let bless = std::env::var_os("SLUICE_BLESS").is_some_and(|v| v == "1");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/policy");
    let cases = [
        ("smollm2-free.sidecar.yaml", vec![free()], 1),
        ("smollm2-free-paid.sidecar.yaml", vec![paid(), free()], 1),
        (
            "smollm2-free-paid-4-ready.sidecar.yaml",
            vec![free(), paid()],
            4,
        ),
    ];
    let mut stale = Vec::new();
    // The share the operator writes for 1..=10 ready pods: the sidecar's cluster-share test
    // (sidecar/tests/cluster_share.rs) drives its real limiters with these values.
    let mut shares = String::from(
        "# Golden: replicaShare the operator writes for N ready pods of examples/inferencemodel.yaml.\n\
         # Read by sidecar/tests/cluster_share.rs. Regenerate with SLUICE_BLESS=1 cargo test -p sluice-operator --test policy.\n",
    );
    for n in 1..=10 {
        let share = sidecar_config(&[free(), paid()], n).replica_share;
        shares.push_str(&format!("{n}: {share:?}\n"));
    }
    let path = dir.join("replica-shares.yaml");
    if bless {
        std::fs::create_dir_all(&dir).expect("creates dir");
        std::fs::write(&path, &shares).expect("writes golden");
    } else if std::fs::read_to_string(&path).unwrap_or_default() != shares {
        stale.push("replica-shares.yaml");
    }
    for (file, policies, ready) in cases {
        let config = sidecar_config(&policies, ready);
        let yaml = format!(
            "# Golden: the sidecar config for examples/inferencemodel.yaml with {} and {ready} \
             ready pod(s). Regenerate with SLUICE_BLESS=1 cargo test -p sluice-operator --test policy.\n{}",
            policies
                .iter()
                .map(|p| p.metadata.name.clone().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(" + "),
            config.to_yaml().expect("renders")
        );
        let path = dir.join(file);
        if bless {
            std::fs::create_dir_all(&dir).expect("creates dir");
            std::fs::write(&path, &yaml).expect("writes golden");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if want != yaml {
            stale.push(file);
        }
        // The golden document is what the sidecar reads: valid and sealed as is.
        let parsed = SidecarConfig::from_yaml(&want).expect("golden parses");
        assert_eq!(
            parsed.clone().sealed().expect("seals").generation,
            parsed.generation
        );
    }
    assert!(
        stale.is_empty(),
        "sidecar configs differ from {stale:?}; review and run \
         `SLUICE_BLESS=1 cargo test -p sluice-operator --test policy`"
    );
}

#[test]
fn example_policies_combine_with_the_older_identity_and_every_rule() {
    let config = sidecar_config(&[paid(), free()], 1);
    let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "free-tier/free-per-key",
            "free-tier/free-sheddable",
            "free-tier/free-tier-total",
            "paid-tier/paid-per-tenant",
            "paid-tier/paid-tokens-trial",
        ]
    );
    assert_eq!(
        config.identity.keys_file.as_deref(),
        Some("/etc/sluice/keys/free-tier/keys.yaml")
    );
    assert_eq!(config.replica_share, 1.0);
    // Scaling changes the share and the generation, not the rules.
    let scaled = sidecar_config(&[paid(), free()], 4);
    assert_eq!(scaled.replica_share, 0.25);
    assert_eq!(scaled.rules, config.rules);
    assert_ne!(scaled.generation, config.generation);
    // Without the Secret, neither tier is accepted and nothing is enforced.
    let r = policy::resolve(
        &[model()],
        &[free(), paid()],
        &KeysSecrets::default(),
        &BTreeMap::new(),
    );
    assert!(r.models["smollm2"].rules.is_empty());
    for v in r.policies.values() {
        assert_eq!(
            v.rejection.as_ref().map(|r| r.reason),
            Some("KeysSecretNotFound")
        );
    }
}

fn pods(generations: &[Result<u64, ScrapeError>]) -> Vec<PodGeneration> {
    generations
        .iter()
        .enumerate()
        .map(|(i, g)| PodGeneration {
            pod: format!("smollm2-default-{i}"),
            generation: g.clone(),
        })
        .collect()
}

fn condition<'a>(
    status: &'a sluice_crds::RateLimitPolicyStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status:?}"))
}

#[test]
fn status_shows_convergence_pod_by_pod() {
    let free = free();
    let r = policy::resolve(
        &[model()],
        &[free.clone(), paid()],
        &secrets(),
        &BTreeMap::new(),
    );
    let verdict = &r.policies["free-tier"];
    let g = sidecar_config(&[free.clone(), paid()], 5).generation;
    let observe = |pods: Vec<PodGeneration>| TargetObservation {
        model: "smollm2".into(),
        desired_generation: Some(g),
        pods,
    };

    // Three pods have reloaded, one still runs the old config, one cannot be scraped.
    let status = policy::policy_status(
        &free,
        verdict,
        &[observe(pods(&[
            Ok(g),
            Ok(g),
            Ok(g),
            Ok(7),
            Err(ScrapeError::Timeout),
        ]))],
        now(),
    );
    assert_eq!(status.converged.as_deref(), Some("3/5"));
    assert_eq!(status.target.as_deref(), Some("smollm2"));
    assert_eq!(status.rules, Some(3));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.targets[0].desired_generation, g as i64);
    assert_eq!(
        (status.targets[0].pods_applied, status.targets[0].pods_total),
        (3, 5)
    );
    let accepted = condition(&status, policy::ACCEPTED);
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("True", "Accepted")
    );
    let converged = condition(&status, policy::CONVERGED);
    assert_eq!(converged.status, "False");
    assert_eq!(converged.reason, "Progressing");
    assert!(
        converged
            .message
            .contains("smollm2-default-3 enforces generation 7")
            && converged
                .message
                .contains("smollm2-default-4: metrics scrape timed out"),
        "{}",
        converged.message
    );

    // All five: 5/5 and Converged=True, with one Event for it.
    let mut before = free.clone();
    before.status = Some(status.clone());
    let done = policy::policy_status(&before, verdict, &[observe(pods(&vec![Ok(g); 5]))], now());
    assert_eq!(done.converged.as_deref(), Some("5/5"));
    let converged = condition(&done, policy::CONVERGED);
    assert_eq!(
        (converged.status.as_str(), converged.reason.as_str()),
        ("True", "Converged")
    );
    // The Accepted condition kept its transition time.
    assert_eq!(
        condition(&done, policy::ACCEPTED),
        condition(&status, policy::ACCEPTED)
    );
    let events = policy::transitions(&status.conditions, &done.conditions);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].type_.as_str(), events[0].warning),
        ("Converged", false)
    );

    // The operator has not written the new rules yet: Pending, never a premature 5/5.
    let pending = TargetObservation {
        desired_generation: None,
        ..observe(pods(&vec![Ok(g); 5]))
    };
    let status = policy::policy_status(&free, verdict, &[pending], now());
    assert_eq!(condition(&status, policy::CONVERGED).reason, "Pending");
    assert_eq!(status.converged.as_deref(), Some("0/5"));
}

#[test]
fn status_reports_conflict_and_missing_targets_with_warning_events() {
    let mut rival = paid();
    rival.metadata.name = Some("rival".into());
    rival.spec.identity.as_mut().expect("identity").source =
        sluice_crds::rate_limit_policy::IdentitySource::Header;
    rival.spec.identity.as_mut().expect("identity").header = Some("x-api-key".into());
    let mut orphan = paid();
    orphan.metadata.name = Some("orphan".into());
    orphan.spec.target_ref.as_mut().expect("target").name = "missing".into();
    let r = policy::resolve(
        &[model()],
        &[free(), rival.clone(), orphan.clone()],
        &secrets(),
        &BTreeMap::new(),
    );

    for (p, reason, needle) in [
        (&rival, "Conflict", "older policy \"free-tier\""),
        (&orphan, "TargetNotFound", "\"missing\" does not exist"),
    ] {
        let status = policy::policy_status(
            p,
            &r.policies[p.metadata.name.as_deref().unwrap_or_default()],
            &[],
            now(),
        );
        let accepted = condition(&status, policy::ACCEPTED);
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", reason)
        );
        assert!(accepted.message.contains(needle), "{}", accepted.message);
        assert_eq!(condition(&status, policy::CONVERGED).reason, "NotApplied");
        assert_eq!(status.converged, None);
        let events = policy::transitions(&[], &status.conditions);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].warning);
        assert_eq!(events[0].reason, reason);
    }
}

/// A metrics source answering from a table, as the sidecars would.
struct FakeSidecars(BTreeMap<String, Result<String, ScrapeError>>);

impl MetricsSource for FakeSidecars {
    fn scrape<'a>(
        &'a self,
        pod: &'a PodEndpoint,
    ) -> BoxFuture<'a, Result<Vec<Sample>, ScrapeError>> {
        Box::pin(async move {
            match self.0.get(&pod.name) {
                Some(Ok(text)) => scrape::parse_prometheus_text(text),
                Some(Err(e)) => Err(e.clone()),
                None => Err(ScrapeError::Http("connection refused".into())),
            }
        })
    }
}

#[tokio::test]
async fn generations_are_read_through_the_metrics_source() {
    let source = FakeSidecars(BTreeMap::from([
        (
            "a".to_owned(),
            Ok(
                "# TYPE sluice_config_generation gauge\nsluice_config_generation 12345\n# EOF\n"
                    .to_owned(),
            ),
        ),
        ("b".to_owned(), Ok("sluice_requests_total 3\n".to_owned())),
        ("c".to_owned(), Err(ScrapeError::Status(500))),
    ]));
    let endpoints: Vec<PodEndpoint> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| PodEndpoint {
            name: (*n).into(),
            admin_url: format!("http://{n}:9090"),
        })
        .collect();
    let got = policy::pod_generations(&source, &endpoints).await;
    let generations: Vec<_> = got.iter().map(|p| p.generation.clone()).collect();
    assert_eq!(
        generations,
        [
            Ok(12345),
            Err(ScrapeError::NoGeneration),
            Err(ScrapeError::Status(500)),
            Err(ScrapeError::Http("connection refused".into())),
        ]
    );
}
