//! The CRD YAML committed in `crds/` (which `kubectl apply -f crds/` and the Helm chart install)
//! is exactly what the Rust types generate: editing a type without `make crds` fails here.

use std::path::Path;

fn crds_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    for (file, crd) in sluice_crds::crds() {
        let generated = sluice_crds::crd_yaml(&crd).expect("CRD renders as YAML");
        let path = crds_dir().join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!("crds/{file} cannot be read ({error}): run `make crds` to generate it")
        });
        if committed != generated {
            let line = committed
                .lines()
                .zip(generated.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
            panic!(
                "crds/{file} is stale (first difference at line {}):\n  committed: {:?}\n  generated: {:?}\n\
                 run `make crds` and commit the result",
                line + 1,
                committed.lines().nth(line).unwrap_or("<end of file>"),
                generated.lines().nth(line).unwrap_or("<end of file>"),
            );
        }
    }
}

#[test]
fn crds_dir_holds_only_generated_crds() {
    let expected: Vec<&str> = sluice_crds::crds().iter().map(|(file, _)| *file).collect();
    let mut found: Vec<String> = std::fs::read_dir(crds_dir())
        .expect("crds/ is readable")
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect();
    found.sort();
    let mut expected_sorted: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
    expected_sorted.sort();
    assert_eq!(
        found, expected_sorted,
        "crds/ must hold exactly the generated CRDs (`kubectl apply -f crds/` installs every file): \
         remove stray files or run `make crds`"
    );
}

#[test]
fn crds_name_group_version_and_kinds() {
    for (file, crd) in sluice_crds::crds() {
        let name = crd.metadata.name.as_deref().expect("CRD has a name");
        assert_eq!(
            name,
            format!("{}.{}", crd.spec.names.plural, sluice_crds::GROUP),
            "{file}"
        );
        assert_eq!(file, format!("{}.yaml", crd.spec.names.plural));
        assert_eq!(crd.spec.scope, "Namespaced", "{file}");
        let versions: Vec<_> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(versions, [sluice_crds::VERSION], "{file}");
        let version = &crd.spec.versions[0];
        assert!(
            version.served && version.storage,
            "{file}: v1alpha1 is served and stored"
        );
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{file}: status is a subresource, so users cannot write it with the spec"
        );
    }
}
