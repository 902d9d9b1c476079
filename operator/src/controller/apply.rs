//! Applying a model's desired state: server-side apply under one field manager (forced) of
//! each object that differs from the live one, and deletion of the live objects that no
//! longer belong. A second reconcile of an unchanged model only lists.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_crds::InferenceModel;
use tracing::info;

use crate::Result;
use crate::desired::Desired;
use crate::forwarding;
use crate::names::FIELD_MANAGER;

/// Applies what differs from `desired` in the model's namespace and prunes what no longer
/// belongs, in dependency order: the sidecars' identity and config, the Services, the
/// forwarding Secret (the pods mount it: it exists before they do), the Deployments
/// (`live_deployments`, already listed; the activator's among them), the autoscalers. Returns how many objects were applied.
pub async fn apply_desired(
    client: &Client,
    ns: &str,
    model: &InferenceModel,
    owned: &ListParams,
    desired: &Desired,
    live_deployments: &[Deployment],
) -> Result<u64> {
    let mut applied = 0;
    applied += sync(
        client,
        ns,
        model,
        owned,
        std::slice::from_ref(&desired.service_account),
        false,
    )
    .await?;
    applied += sync(
        client,
        ns,
        model,
        owned,
        std::slice::from_ref(&desired.role),
        false,
    )
    .await?;
    applied += sync(
        client,
        ns,
        model,
        owned,
        std::slice::from_ref(&desired.role_binding),
        false,
    )
    .await?;
    applied += sync(
        client,
        ns,
        model,
        owned,
        std::slice::from_ref(&desired.config_map),
        false,
    )
    .await?;
    applied += sync(client, ns, model, owned, &desired.services, true).await?;
    // The pods mount the forwarding Secret: it exists before they do.
    applied += u64::from(forwarding::ensure(client, model, ns).await?);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let desired_deployments: Vec<Deployment> = desired
        .deployments
        .iter()
        .chain(&desired.activator)
        .cloned()
        .collect();
    applied += apply_all(&deployments, &desired_deployments, live_deployments).await?;
    prune(&deployments, &desired_deployments, live_deployments).await?;
    applied += sync(client, ns, model, owned, &desired.autoscalers, true).await?;
    Ok(applied)
}

/// Lists the model's live objects of one kind, applies the desired ones that differ and, when
/// `prune`, deletes live ones no longer desired. Returns how many were applied.
async fn sync<K>(
    client: &Client,
    ns: &str,
    model: &InferenceModel,
    owned: &ListParams,
    desired: &[K],
    prune_extra: bool,
) -> Result<u64>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let live = owned_by(model, api.list(owned).await?.items);
    let applied = apply_all(&api, desired, &live).await?;
    if prune_extra {
        prune(&api, desired, &live).await?;
    }
    Ok(applied)
}

/// Applies each desired object unless the live one already matches it.
async fn apply_all<K>(api: &Api<K>, desired: &[K], live: &[K]) -> Result<u64>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let mut applied = 0;
    for obj in desired {
        let name = obj.name_any();
        let current = live.iter().find(|l| l.name_any() == name);
        if let Some(current) = current
            && up_to_date(obj, current)?
        {
            continue;
        }
        info!(kind = K::kind(&()).as_ref(), %name, created = current.is_none(), "applying");
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?;
        applied += 1;
    }
    Ok(applied)
}

/// Deletes live objects the desired state no longer has (a removed variant, autoscaling
/// turned off).
async fn prune<K>(api: &Api<K>, desired: &[K], live: &[K]) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    for obj in live {
        let name = obj.name_any();
        if desired.iter().all(|d| d.name_any() != name) {
            info!(kind = K::kind(&()).as_ref(), %name, "deleting, no longer desired");
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The live objects this model controls (never touch what someone else labelled alike).
pub fn owned_by<K: Resource>(model: &InferenceModel, objects: Vec<K>) -> Vec<K> {
    let uid = model.uid();
    objects
        .into_iter()
        .filter(|o| {
            o.meta()
                .owner_references
                .iter()
                .flatten()
                .any(|r| Some(&r.uid) == uid.as_ref() && r.controller == Some(true))
        })
        .collect()
}

/// Whether the live object carries everything the desired one says, with the same values
/// (defaults and other managers' fields are ignored) and the same rendered hash (so a field the
/// desired state dropped is noticed too).
pub fn up_to_date<K: Serialize>(desired: &K, live: &K) -> Result<bool> {
    Ok(is_subset(
        &serde_json::to_value(desired)?,
        &serde_json::to_value(live)?,
    ))
}

/// `desired ⊆ live`: objects by key, arrays element-wise with equal length, scalars equal.
pub fn is_subset(desired: &serde_json::Value, live: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d
            .iter()
            .all(|(k, v)| v.is_null() || l.get(k).is_some_and(|lv| is_subset(v, lv))),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (a, b) => a == b,
    }
}
