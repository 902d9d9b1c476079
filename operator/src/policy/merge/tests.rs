//! The combination rule, case by case.

use std::collections::BTreeMap;

use sluice_crds::rate_limit_policy::IdentitySource;

use super::*;

fn model(name: &str, labels: &str) -> InferenceModel {
    serde_yaml::from_str(&format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: InferenceModel\nmetadata: {{name: {name}, namespace: ns, labels: {{{labels}}}}}\nspec:\n  variants:\n    - {{name: default, weight: 100, model: {{url: 'https://e.com/m.gguf'}}}}\n"
    ))
    .expect("model")
}

/// A policy created at `second` (so age order is explicit), with `body` as its spec.
fn policy(name: &str, second: i64, body: &str) -> RateLimitPolicy {
    let mut p: RateLimitPolicy = serde_yaml::from_str(&format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n{body}"
    ))
    .unwrap_or_else(|e| panic!("{e}\n{body}"));
    p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + second).expect("time"),
    ));
    p
}

const RULE: &str = "  rules:\n    - {name: r, per: Key, requestsPerMinute: 10}\n";

fn to(model: &str) -> String {
    format!("  targetRef: {{name: {model}}}\n{RULE}")
}

fn keys(secret: &str) -> String {
    format!("  identity: {{source: Bearer, keys: {{secretName: {secret}, key: keys.yaml}}}}\n")
}

fn secrets() -> KeysSecrets {
    let mut s = KeysSecrets::default();
    s.insert("keys-a", ["keys.yaml".to_owned()]);
    s.insert("keys-b", ["keys.yaml".to_owned()]);
    s
}

fn run(models: &[InferenceModel], policies: &[RateLimitPolicy]) -> Resolution {
    resolve(models, policies, &secrets(), &BTreeMap::new())
}

fn rule_names(limits: &ModelLimits) -> Vec<&str> {
    limits.rules.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn every_rule_of_every_accepted_policy_applies_named_by_policy() {
    let models = [model("m", "")];
    let r = run(
        &models,
        &[
            policy("b", 1, &format!("{}{RULE}", "  targetRef: {name: m}\n")),
            policy("a", 2, &to("m")),
        ],
    );
    // Oldest first, whatever the names.
    assert_eq!(rule_names(&r.models["m"]), ["b/r", "a/r"]);
    assert_eq!(r.models["m"].policies, ["b", "a"]);
    assert!(r.policies.values().all(Verdict::accepted));
    assert_eq!(r.policies["a"].applied_to, ["m"]);
}

#[test]
fn identity_comes_from_the_oldest_policy_and_a_different_newer_one_conflicts() {
    let models = [model("m", ""), model("n", "")];
    let r = run(
        &models,
        &[
            policy("newer", 2, &format!("{}{}", keys("keys-b"), to("m"))),
            policy("older", 1, &format!("{}{}", keys("keys-a"), to("m"))),
            policy("same", 3, &format!("{}{}", keys("keys-a"), to("m"))),
            policy("none", 4, &to("m")),
        ],
    );
    let m = &r.models["m"];
    assert_eq!(
        m.keys,
        Some(KeysMount {
            policy: "older".into(),
            secret_name: "keys-a".into(),
            key: "keys.yaml".into()
        })
    );
    assert_eq!(
        m.identity.keys_file.as_deref(),
        Some("/etc/sluice/keys/older/keys.yaml")
    );
    assert_eq!(m.identity.source, IdentitySource::Bearer);
    assert_eq!(rule_names(m), ["older/r", "same/r", "none/r"]);
    let newer = &r.policies["newer"];
    let rejection = newer.rejection.as_ref().expect("conflict");
    assert_eq!(rejection.reason, REASON_CONFLICT);
    assert!(
        rejection.message.contains("\"older\"") && rejection.message.contains("keys-b"),
        "{}",
        rejection.message
    );
    assert!(newer.applied_to.is_empty());
    assert!(r.policies["same"].accepted() && r.policies["none"].accepted());
}

#[test]
fn a_conflict_on_one_target_leaves_the_others_applied() {
    let models = [model("m", "tier: a"), model("n", "tier: a")];
    let r = run(
        &models,
        &[
            policy("older", 1, &format!("{}{}", keys("keys-a"), to("m"))),
            policy(
                "wide",
                2,
                &format!(
                    "{}  selector: {{matchLabels: {{tier: a}}}}\n{RULE}",
                    keys("keys-b")
                ),
            ),
        ],
    );
    let wide = &r.policies["wide"];
    assert_eq!(wide.targets, ["m", "n"]);
    assert_eq!(wide.applied_to, ["n"]);
    let rejection = wide.rejection.as_ref().expect("conflict on m");
    assert_eq!(rejection.reason, REASON_CONFLICT);
    assert!(
        rejection.message.contains("(applied to n)"),
        "{}",
        rejection.message
    );
    assert_eq!(rule_names(&r.models["n"]), ["wide/r"]);
    assert_eq!(
        r.models["n"].keys.as_ref().map(|k| k.policy.as_str()),
        Some("wide")
    );
}

#[test]
fn selectors_match_labels_and_expressions_in_the_namespace_only() {
    let mut elsewhere = model("x", "tier: a");
    elsewhere.metadata.namespace = Some("other".into());
    let models = [
        model("m", "tier: a, size: small"),
        model("n", "tier: b"),
        model("o", "tier: a, size: large"),
        elsewhere,
    ];
    let p = policy(
        "p",
        1,
        &format!(
            "  selector:\n    matchLabels: {{tier: a}}\n    matchExpressions:\n      - {{key: size, operator: In, values: [small, medium]}}\n{RULE}"
        ),
    );
    assert_eq!(targets(&p, &models), ["m"]);
    let all = policy("all", 1, &format!("  selector: {{}}\n{RULE}"));
    assert_eq!(targets(&all, &models), ["m", "n", "o"]);
}

#[test]
fn a_missing_target_is_reported() {
    let r = run(&[model("m", "")], &[policy("p", 1, &to("gone"))]);
    let v = &r.policies["p"];
    assert_eq!(v.rejection.as_ref().map(|r| r.reason), Some(REASON_TARGET));
    assert!(
        v.rejection
            .as_ref()
            .is_some_and(|r| r.message.contains("gone"))
    );
    let r = run(
        &[model("m", "")],
        &[policy(
            "p",
            1,
            &format!("  selector: {{matchLabels: {{x: y}}}}\n{RULE}"),
        )],
    );
    assert_eq!(
        r.policies["p"].rejection.as_ref().map(|r| r.reason),
        Some(REASON_TARGET)
    );
}

#[test]
fn invalid_policies_are_refused_with_the_reason_and_change_nothing_else() {
    let cases = [
        (
            "  rules:\n    - {name: r, requestsPerMinute: 0}\n",
            "must be positive",
        ),
        (
            "  rules:\n    - {name: r, maxConcurrent: 2, burst: 5}\n",
            "burst applies only",
        ),
        (
            "  rules:\n    - {name: r, maxConcurrent: 2}\n    - {name: r, maxConcurrent: 3}\n",
            "unique",
        ),
        ("  rules:\n    - {name: r}\n", "at least one limit"),
        ("  rules: []\n", "at least one rule"),
    ];
    for (rules, expected) in cases {
        let bad = policy("bad", 1, &format!("  targetRef: {{name: m}}\n{rules}"));
        let good = policy("good", 2, &to("m"));
        let r = run(&[model("m", "")], &[bad, good]);
        let rejection = r.policies["bad"].rejection.clone().expect("rejected");
        assert_eq!(rejection.reason, REASON_INVALID, "{rules}");
        assert!(
            rejection.message.contains(expected),
            "{}",
            rejection.message
        );
        assert_eq!(rule_names(&r.models["m"]), ["good/r"], "{rules}");
    }
    let both = policy("both", 1, &format!("  selector: {{}}\n{}", to("m")));
    assert!(check_policy(&both).is_err_and(|e| e.contains("exactly one")));
    let bad_selector = policy(
        "sel",
        1,
        &format!("  selector:\n    matchExpressions: [{{key: a, operator: Bogus}}]\n{RULE}"),
    );
    assert!(check_policy(&bad_selector).is_err_and(|e| e.contains("selector")));
}

#[test]
fn a_missing_keys_secret_or_entry_is_reported() {
    let r = run(
        &[model("m", "")],
        &[
            policy("p", 1, &format!("{}{}", keys("nope"), to("m"))),
            policy(
                "q",
                2,
                &format!(
                    "  identity: {{keys: {{secretName: keys-a, key: other.yaml}}}}\n{}",
                    to("m")
                ),
            ),
        ],
    );
    for (name, expected) in [
        ("p", "\"nope\" does not exist"),
        ("q", "no entry \"other.yaml\""),
    ] {
        let rejection = r.policies[name].rejection.clone().expect("rejected");
        assert_eq!(rejection.reason, REASON_KEYS_SECRET);
        assert!(
            rejection.message.contains(expected),
            "{}",
            rejection.message
        );
    }
    assert_eq!(r.models["m"], ModelLimits::default());
}

#[test]
fn an_unreadable_keys_secret_is_taken_as_present() {
    // The operator may not read it (403): not checked, so the policy applies and its Secret is
    // mounted; the kubelet's mount is the check.
    let mut secrets = secrets();
    secrets.insert_unreadable("locked");
    let r = resolve(
        &[model("m", "")],
        &[policy("p", 1, &format!("{}{}", keys("locked"), to("m")))],
        &secrets,
        &BTreeMap::new(),
    );
    assert!(r.policies["p"].accepted(), "{:?}", r.policies["p"]);
    let mount = r.models["m"].keys.clone().expect("mounted");
    assert_eq!(mount.secret_name, "locked");
    // A readable Secret is still checked, entry included.
    let r = resolve(
        &[model("m", "")],
        &[policy("p", 1, &format!("{}{}", keys("nope"), to("m")))],
        &secrets,
        &BTreeMap::new(),
    );
    assert_eq!(
        r.policies["p"].rejection.as_ref().map(|r| r.reason),
        Some(REASON_KEYS_SECRET)
    );
}

#[test]
fn a_rejected_edit_keeps_what_was_in_force() {
    let models = [model("m", "")];
    let good = policy("p", 1, &format!("{}{}", keys("keys-a"), to("m")));
    let first = run(&models, std::slice::from_ref(&good));
    let limits = &first.models["m"];
    let config = apply_limits(base_config(), limits).expect("valid");
    let previous = BTreeMap::from([(
        "m".to_owned(),
        Previous {
            config: Some(config),
            keys: limits.keys.clone(),
        },
    )]);

    // The Secret is renamed to one that does not exist, and a rule becomes invalid.
    for edit in [
        format!("{}{}", keys("typo"), to("m")),
        format!(
            "{}  targetRef: {{name: m}}\n  rules:\n    - {{name: r, requestsPerMinute: 0}}\n",
            keys("keys-a")
        ),
    ] {
        let edited = policy("p", 1, &edit);
        let newer = policy("q", 2, &to("m"));
        let r = resolve(&models, &[edited, newer], &secrets(), &previous);
        assert_eq!(r.models["m"].keys, limits.keys, "{edit}");
        assert_eq!(r.models["m"].identity, limits.identity, "{edit}");
        assert_eq!(rule_names(&r.models["m"]), ["p/r", "q/r"], "{edit}");
        assert_eq!(r.models["m"].rules[0], limits.rules[0]);
        assert_eq!(r.policies["p"].kept_on, ["m"]);
        assert!(!r.policies["p"].accepted());
    }
}

#[test]
fn a_policy_being_deleted_targets_nothing() {
    let models = [model("m", "")];
    let mut gone = policy("p", 1, &format!("{}{}", keys("keys-a"), to("m")));
    gone.metadata.deletion_timestamp = gone.metadata.creation_timestamp.clone();
    let r = run(&models, &[gone, policy("q", 2, &to("m"))]);
    assert_eq!(rule_names(&r.models["m"]), ["q/r"]);
    assert_eq!(r.models["m"].keys, None);
    assert!(!r.policies.contains_key("p"));
}

#[test]
fn shares_split_over_ready_pods() {
    assert_eq!(replica_share(1), 1.0);
    assert_eq!(replica_share(4), 0.25);
    // No ready pod yet: the first one takes the whole limit.
    assert_eq!(replica_share(0), 1.0);
    assert_eq!(replica_share(-1), 1.0);
    for n in 1..=10 {
        let share = replica_share(n);
        assert!(share > 0.0 && share <= 1.0);
        assert!((share * f64::from(n) - 1.0).abs() < 1e-12);
    }
}

#[test]
fn key_volumes_depend_only_on_the_mount_and_round_trip() {
    let models = [model("m", "")];
    let before = run(
        &models,
        &[policy("p", 1, &format!("{}{}", keys("keys-a"), to("m")))],
    );
    let after = run(
        &models,
        &[policy(
            "p",
            1,
            &format!(
                "{}  targetRef: {{name: m}}\n  rules:\n    - {{name: r, per: Key, requestsPerMinute: 99}}\n    - {{name: s, maxConcurrent: 1}}\n",
                keys("keys-a")
            ),
        )],
    );
    let (b, a) = (&before.models["m"], &after.models["m"]);
    assert_ne!(b.rules, a.rules);
    assert_eq!(
        key_secret_volumes(b.keys.as_ref()),
        key_secret_volumes(a.keys.as_ref())
    );

    let vols = key_secret_volumes(b.keys.as_ref());
    assert_eq!(vols.len(), 1);
    let (volume, mount) = &vols[0];
    assert_eq!(mount.mount_path, "/etc/sluice/keys/p");
    assert_eq!(mount.read_only, Some(true));
    let secret = volume.secret.as_ref().expect("secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("keys-a"));
    let spec = PodSpec {
        containers: vec![k8s_openapi::api::core::v1::Container {
            name: "sidecar".into(),
            volume_mounts: Some(vec![mount.clone()]),
            ..Default::default()
        }],
        volumes: Some(vec![volume.clone()]),
        ..Default::default()
    };
    assert_eq!(keys_mount_in(&spec), b.keys);
    assert!(key_secret_volumes(None).is_empty());
    assert_eq!(keys_mount_in(&PodSpec::default()), None);
}

fn base_config() -> SidecarConfig {
    SidecarConfig {
        version: SIDECAR_CONFIG_VERSION.into(),
        generation: 0,
        model: "m".into(),
        variants: vec![VariantRoute {
            name: "default".into(),
            weight: 100,
            address: None,
        }],
        routing: Default::default(),
        identity: Default::default(),
        auth: None,
        rules: Vec::new(),
        replica_share: 1.0,
        saturation: Default::default(),
        fallback: None,
        cache: None,
        models: Vec::new(),
    }
}

#[test]
fn applying_limits_reseals_the_generation() {
    let models = [model("m", "")];
    let a = run(&models, &[policy("p", 1, &to("m"))]);
    let b = run(
        &models,
        &[policy(
            "p",
            1,
            "  targetRef: {name: m}\n  rules:\n    - {name: r, per: Key, requestsPerMinute: 11}\n",
        )],
    );
    let ca = apply_limits(base_config(), &a.models["m"]).expect("valid");
    let cb = apply_limits(base_config(), &b.models["m"]).expect("valid");
    assert_ne!(ca.generation, cb.generation);
    assert!(ca.generation > 0 && ca.generation < 1 << 48);
    assert_eq!(
        apply_limits(ca.clone(), &a.models["m"])
            .expect("valid")
            .generation,
        ca.generation
    );
    let none = apply_limits(base_config(), &ModelLimits::default()).expect("valid");
    assert!(none.rules.is_empty());
}
