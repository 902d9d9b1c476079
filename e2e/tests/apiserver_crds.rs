//! The generated CRDs against a real kube-apiserver (scripts/cluster.sh): they install (the
//! server compiles every CEL rule within its cost budget), every example is accepted, and every
//! invalid fixture of crds/tests/invalid is rejected by the server, CEL ones with the very
//! message the client-side CEL tests (crds/tests/validation.rs) expect, while each fixture's
//! fixed counterpart is accepted.

use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use sluice_e2e::{control_plane, objects, wait, workspace};

const MANAGER: &str = "sluice-e2e";

/// Installs the CRDs and waits until the server serves them.
async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in sluice_crds::crds() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("installing CRD {name}"))?;
        wait::until(
            &format!("CRD {name} Established"),
            Duration::from_secs(60),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let crd = crds.get(&name).await?;
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    Ok(established.then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_server_accepts_the_examples_and_rejects_each_invalid_fixture_as_the_client_side_tests_expect()
-> anyhow::Result<()> {
    let cluster = control_plane::shared()?;
    let client = cluster.admin().await?;
    install_crds(&client).await?;
    let ns = cluster.namespace(&client, "crds").await?;

    let mut checked = 0;
    for entry in std::fs::read_dir(workspace().join("examples"))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for object in objects::documents(&std::fs::read_to_string(&path)?)? {
            // Argo CD's Application is not ours to install; sidecar-config.yaml is a file, not
            // an object.
            let api_version = object["apiVersion"].as_str().unwrap_or_default();
            if api_version.is_empty() || api_version.starts_with("argoproj.io") {
                continue;
            }
            objects::apply(&client, &ns, &object, MANAGER, true)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("the server rejected an object of {}: {e}", path.display())
                })?;
            checked += 1;
        }
    }
    assert!(checked >= 7, "only {checked} example objects found");

    let mut fixtures = 0;
    for entry in std::fs::read_dir(workspace().join("crds/tests/invalid"))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let expected_cel = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect-cel: "))
            .map(str::to_owned);
        let docs = objects::documents(&text)?;
        let [invalid, fixed] = docs.as_slice() else {
            bail!("{name}: expected two documents (invalid, fixed)");
        };
        match objects::apply(&client, &ns, invalid, MANAGER, true).await {
            Ok(_) => bail!("{name}: the server accepted the invalid object"),
            Err(kube::Error::Api(status)) => {
                // Server-side apply answers an undeclared field with a 500 naming it.
                assert!(
                    status.code == 422 || status.message.contains("field not declared in schema"),
                    "{name}: {} {}",
                    status.code,
                    status.message
                );
                if let Some(message) = &expected_cel {
                    assert!(
                        status.message.contains(message.as_str()),
                        "{name}: the server's message {:?} lacks the client-side CEL message {message:?}",
                        status.message
                    );
                }
            }
            Err(e) => return Err(e).context(name),
        }
        objects::apply(&client, &ns, fixed, MANAGER, true)
            .await
            .map_err(|e| anyhow::anyhow!("{name}: the server rejected the fixed object: {e}"))?;
        fixtures += 1;
    }
    assert!(fixtures >= 30, "only {fixtures} fixtures found");
    Ok(())
}
