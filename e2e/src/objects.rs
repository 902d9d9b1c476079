//! Objects from YAML, applied as `kubectl apply --server-side` does.

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde_json::Value;

/// The non-empty documents of a multi-document YAML text.
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The API of `object`'s kind in `ns`.
pub fn api_for(client: &Client, ns: &str, object: &Value) -> Api<DynamicObject> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Api::namespaced_with(client.clone(), ns, &resource)
}

/// Server-side apply of `object` into `ns` by `manager`, with strict field validation;
/// `dry_run` stores nothing. Returns the object as the server has (or would have) it.
pub async fn apply(
    client: &Client,
    ns: &str,
    object: &Value,
    manager: &str,
    dry_run: bool,
) -> Result<DynamicObject, kube::Error> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let mut params = PatchParams::apply(manager).force().validation_strict();
    if dry_run {
        params = params.dry_run();
    }
    api_for(client, ns, object)
        .patch(name, &params, &Patch::Apply(object))
        .await
}
