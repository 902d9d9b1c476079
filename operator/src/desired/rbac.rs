//! The sidecars' identity: a ServiceAccount, and a Role that lets it read (only) the model's
//! sidecar config ConfigMap, which the sidecars watch, and, for a model that scales to zero,
//! lets its activator scale (only) the model's Deployments.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::meta::Renderer;
use crate::names::{config_map_name, sidecar_account_name};

// === impl Renderer ===

impl Renderer<'_> {
    pub(super) fn service_account(&self) -> ServiceAccount {
        ServiceAccount {
            metadata: self.meta(sidecar_account_name(self.name), None),
            ..Default::default()
        }
    }

    pub(super) fn role(&self) -> Role {
        Role {
            metadata: self.meta(sidecar_account_name(self.name), None),
            rules: Some(
                std::iter::once(PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["configmaps".to_owned()]),
                    resource_names: Some(vec![config_map_name(self.name)]),
                    verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
                    ..Default::default()
                })
                .chain(self.activator_rule())
                .collect(),
            ),
        }
    }

    pub(super) fn role_binding(&self) -> RoleBinding {
        let account = sidecar_account_name(self.name);
        RoleBinding {
            metadata: self.meta(account.clone(), None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".to_owned(),
                kind: "Role".to_owned(),
                name: account.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".to_owned(),
                name: account,
                namespace: Some(self.namespace.to_owned()),
                ..Default::default()
            }]),
        }
    }
}
