//! Every committed fuzz input, replayed through its target on every `make test`: the seed
//! corpora (`corpus/<target>/`, where `cargo fuzz` also starts) and the inputs that once broke a
//! promise (`regressions/<target>/`, each named after what it broke).

use std::path::Path;

#[test]
fn committed_inputs_keep_every_promise() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (target, check) in sluice_fuzz::TARGETS {
        let mut replayed = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a readable directory").path();
                let data = std::fs::read(&path).expect("a readable input");
                eprintln!("{target}: {}", path.display());
                check(&data);
                replayed += 1;
            }
        }
        assert!(replayed > 0, "{target} has no committed corpus");
    }
}
