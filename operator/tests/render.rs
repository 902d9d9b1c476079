//! `sluice-operator render` on every example InferenceModel: the output matches the committed
//! golden YAML (regenerate with `SLUICE_BLESS=1 cargo test -p sluice-operator --test render`),
//! every object passes `kubernetes-validate --strict`, and the ConfigMap carries a sidecar
//! config the sidecar accepts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sluice_crds::SidecarConfig;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `examples/inferencemodel*.yaml`, plus the fixtures that cover what the examples do
/// not (other model sources).
fn examples() -> Vec<PathBuf> {
    let dirs = [
        workspace().join("examples"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    ];
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).expect("directory exists"))
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("inferencemodel") && name.ends_with(".yaml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples/inferencemodel*.yaml");
    files
}

fn render(files: &[&Path]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice-operator"));
    cmd.args([
        "render",
        "--sidecar-image",
        "ghcr.io/sluice-dev/sluice-sidecar:test",
    ])
    .args([
        "--sidecar-cuda-image",
        "ghcr.io/sluice-dev/sluice-sidecar-cuda:test",
    ])
    .env_remove("SLUICE_SIDECAR_IMAGE")
    .env_remove("SLUICE_SIDECAR_CUDA_IMAGE");
    for f in files {
        cmd.arg("-f").arg(f);
    }
    cmd.output().expect("runs sluice-operator")
}

fn rendered(file: &Path) -> String {
    let out = render(&[file]);
    assert!(
        out.status.success(),
        "render {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn render_matches_golden_yaml() {
    let bless = std::env::var_os("SLUICE_BLESS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for file in examples() {
        let yaml = rendered(&file);
        let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(file.file_name().expect("file name"));
        if bless {
            std::fs::write(&golden, &yaml).expect("writes golden");
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if want != yaml {
            stale.push(golden.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "render output differs from {stale:?}; review the change and run \
         `SLUICE_BLESS=1 cargo test -p sluice-operator --test render` to accept it"
    );
}

#[test]
fn config_maps_carry_valid_sidecar_configs() {
    for file in examples() {
        for doc in serde_yaml::Deserializer::from_str(&rendered(&file)) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("YAML");
            if v["kind"].as_str() == Some("ConfigMap") {
                let text = v["data"]["sidecar.yaml"].as_str().expect("sidecar.yaml");
                let config = SidecarConfig::from_yaml(text)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                assert!(config.generation > 0, "sealed");
            }
        }
    }
}

/// Validates every object of a rendered stream with kubernetes-validate; false (skipped) when
/// no Python with it is installed.
fn validate_strict(label: &str, yaml: &str) -> bool {
    let python = std::env::var_os("SLUICE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".cache/venv/bin/python"));
    if !python.exists() {
        eprintln!(
            "SKIPPED: no Python with kubernetes-validate at {} (run `make venv`, or set SLUICE_TEST_PYTHON)",
            python.display()
        );
        return false;
    }
    let script = r#"
import sys, yaml
sys.path.insert(0, sys.argv[1])
import k8s_schema
n = 0
for doc in yaml.safe_load_all(sys.stdin):
    if doc is None:
        continue
    assert k8s_schema.validate(doc) == "validated", doc["kind"]
    n += 1
print(n)
"#;
    let mut child = Command::new(&python)
        .args(["-c", script])
        .arg(workspace().join("tests-py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs python");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("writes");
    let out = child.wait_with_output().expect("python finishes");
    assert!(
        out.status.success(),
        "{}: {}",
        label,
        String::from_utf8_lossy(&out.stderr)
    );
    let count: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("count");
    assert!(count >= 7, "{label}: only {count} objects validated");
    true
}

#[test]
fn every_rendered_object_passes_kubernetes_validate_strict() {
    for file in examples() {
        if !validate_strict(&file.display().to_string(), &rendered(&file)) {
            return;
        }
    }
}

/// The demo model with both example tiers and their keys Secret, as `kubectl apply -f
/// examples/` would create them.
fn with_policies() -> Vec<PathBuf> {
    [
        "inferencemodel.yaml",
        "ratelimitpolicy-free.yaml",
        "ratelimitpolicy-paid.yaml",
        "api-keys-secret.yaml",
    ]
    .iter()
    .map(|f| workspace().join("examples").join(f))
    .collect()
}

fn rendered_with_policies() -> String {
    let files = with_policies();
    let out = render(&files.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn render_with_policies_and_secrets_matches_golden_yaml() {
    let yaml = rendered_with_policies();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/inferencemodel-with-policies.yaml");
    if std::env::var_os("SLUICE_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&golden, &yaml).expect("writes golden");
    } else {
        assert!(
            std::fs::read_to_string(&golden).unwrap_or_default() == yaml,
            "render output differs from {}; review the change and run \
             `SLUICE_BLESS=1 cargo test -p sluice-operator --test render` to accept it",
            golden.display()
        );
    }
    validate_strict("inferencemodel.yaml with policies", &yaml);

    // What the controller would apply: every rule of both tiers, with the free tier's (older
    // by name) identity, its keys Secret mounted, the cluster limit shared by the one ready
    // pod; the forwarding Secret only named in a comment (its token is random).
    let mut keys_mounted = false;
    let mut config = None;
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).expect("YAML");
        assert_ne!(v["kind"].as_str(), Some("Secret"), "no Secret is rendered");
        match v["kind"].as_str() {
            Some("ConfigMap") => {
                let text = v["data"]["sidecar.yaml"].as_str().expect("sidecar.yaml");
                config = Some(SidecarConfig::from_yaml(text).expect("valid"));
            }
            Some("Deployment") => {
                let volumes = v["spec"]["template"]["spec"]["volumes"]
                    .as_sequence()
                    .expect("volumes");
                keys_mounted = volumes
                    .iter()
                    .any(|vol| vol["secret"]["secretName"].as_str() == Some("sluice-api-keys"));
            }
            _ => {}
        }
    }
    let config = config.expect("a ConfigMap");
    let rules: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        rules,
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
    assert!(keys_mounted, "the keys Secret is mounted");
    assert!(
        yaml.contains("# Secret default/smollm2-forwarding"),
        "{yaml}"
    );
}

#[test]
fn render_without_the_keys_secret_leaves_the_policies_out() {
    // As in the cluster: a policy whose keys Secret does not exist is not accepted.
    let files = with_policies();
    let out = render(&files[..3].iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(!yaml.contains("free-tier/"), "{yaml}");
    assert!(!yaml.contains("sluice-api-keys"), "{yaml}");
}

#[test]
fn invalid_model_fails_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("sluice-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: sluice.dev/v1alpha1\nkind: InferenceModel\nmetadata: {name: bad}\nspec:\n  variants:\n    - {name: a, weight: 60, model: {url: 'https://e.com/a.gguf'}}\n",
    )
    .expect("writes");
    let out = render(&[&file]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sum to 60, not 100") && stderr.contains("bad"),
        "{stderr}"
    );
}
