//! The per-model forwarding Secret: a random token (key `token`) every variant's sidecars
//! mount (`--forward-token-file`) to authenticate requests forwarded between variants.
//!
//! Created once, never applied: a server-side apply would re-send a fresh random value each
//! reconcile, and pods started at different times would disagree. Each reconcile asks to
//! create it and takes "already exists" (409) for "there": the operator may create Secrets but
//! not read any (a read permission cannot be limited to the Secrets it made, and would expose
//! every Secret of the cluster). So it never looks inside an existing one; one without its
//! `token` entry shows as pods that cannot mount it (delete it to have a new one created).
//! Owned by the InferenceModel, so deleting the model deletes it. `render` never prints it
//! (the value is random); it renders only the volume and mount.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};
use sluice_crds::InferenceModel;
use tracing::{debug, info};

use crate::names::{
    FIELD_MANAGER, FORWARDING_KEY, LABEL_MODEL, MANAGED_BY, forwarding_secret_name,
};
use crate::{Error, Result};

/// Random bytes in a token (hex-encoded in the Secret: 64 characters).
pub const TOKEN_BYTES: usize = 32;

/// A fresh random token: [`TOKEN_BYTES`] bytes from the OS, hex-encoded.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| {
        Error::Io(std::io::Error::other(format!(
            "no OS randomness for the forwarding token: {e}"
        )))
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The forwarding Secret of `model` in `ns`, holding `token`.
pub fn forwarding_secret(model: &InferenceModel, ns: &str, token: &str) -> Secret {
    let name = model.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(forwarding_secret_name(&name)),
            namespace: Some(ns.to_owned()),
            labels: Some(BTreeMap::from([
                (LABEL_MODEL.to_owned(), name),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    MANAGED_BY.to_owned(),
                ),
            ])),
            owner_references: model.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            FORWARDING_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// Creates `model`'s forwarding Secret unless it exists; an existing one is left as it is
/// (never rotated, never read). Returns whether it was created.
pub async fn ensure(client: &Client, model: &InferenceModel, ns: &str) -> Result<bool> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = forwarding_secret_name(&model.name_any());
    let secret = forwarding_secret(model, ns, &new_token()?);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match api.create(&params, &secret).await {
        Ok(_) => {
            info!(secret = %name, "created the forwarding Secret");
            Ok(true)
        }
        // It exists (from an earlier reconcile, or another replica's): theirs stands, and the
        // token just drawn is dropped unseen.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!(secret = %name, "the forwarding Secret exists");
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_32_random_bytes_in_hex() {
        let a = new_token().expect("randomness");
        let b = new_token().expect("randomness");
        assert_eq!(a.len(), 2 * TOKEN_BYTES);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
