//! Which changes of an InferenceModel re-render the sidecar configs of the other models of its
//! namespace, whose `models` list names it (one endpoint for all models): a model that appears,
//! changes the name it is listed under ([`listed_name`]: its `spec.servedName`, or none once
//! its deletion starts), or is deleted. Status writes and other spec edits do not: each would
//! otherwise reconcile every model of the namespace.
//!
//! The controller's watch hands over the objects an event touched, not the event, so a deletion
//! is recognised by what it looks like there: the object as last seen, under a new
//! resourceVersion (a write that changes nothing makes no event, so any other new version
//! differs in content).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use sluice_crds::InferenceModel;

use crate::desired::sidecar_config::listed_name;

/// What was last seen of each model.
#[derive(Debug, Default)]
pub struct Listings {
    seen: Mutex<HashMap<ObjectRef<InferenceModel>, Seen>>,
}

#[derive(Debug, PartialEq, Eq)]
struct Seen {
    listed: Option<String>,
    resource_version: Option<String>,
    /// The object but for its resourceVersion.
    digest: u64,
}

// === impl Listings ===

impl Listings {
    /// Whether `model`, as a watch event carries it, changes how the other models of its
    /// namespace list it. A model seen for the first time does (at start-up every model is, and
    /// every model is reconciled then anyway).
    pub fn changed(&self, model: &InferenceModel) -> bool {
        let key = ObjectRef::from_obj(model);
        let now = Seen {
            listed: listed_name(model),
            resource_version: model.metadata.resource_version.clone(),
            digest: digest(model),
        };
        // A poisoned lock only means a mapper call panicked; the map is still usable.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.insert(key.clone(), now) {
            None => true,
            Some(before) => {
                let now = &seen[&key];
                if before.listed != now.listed {
                    return true;
                }
                let deleted =
                    before.digest == now.digest && before.resource_version != now.resource_version;
                if deleted {
                    // A model created again under the name is new.
                    seen.remove(&key);
                }
                deleted
            }
        }
    }
}

fn digest(model: &InferenceModel) -> u64 {
    let mut model = model.clone();
    model.metadata.resource_version = None;
    let mut hasher = DefaultHasher::new();
    // Serialising a model cannot fail; an empty digest would only make a change look like none.
    serde_json::to_vec(&model)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::model_from_yaml;

    fn model(served: &str, version: &str) -> InferenceModel {
        model_from_yaml(&format!(
            r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {{name: chat, namespace: ns, resourceVersion: "{version}"}}
spec:
  servedName: {served}
  variants:
    - {{name: a, weight: 100, model: {{url: "https://e.com/a.gguf"}}}}
"#
        ))
    }

    #[test]
    fn only_what_changes_the_others_lists_re_renders_them() {
        let listings = Listings::default();
        let first = model("chat", "1");
        assert!(listings.changed(&first), "a new model");
        assert!(
            !listings.changed(&first),
            "the same version again (a re-list)"
        );
        let mut status = model("chat", "2");
        status.status = Some(Default::default());
        assert!(!listings.changed(&status), "a status write");
        let mut annotated = model("chat", "3");
        annotated.status = Some(Default::default());
        annotated.metadata.annotations = Some([("a".to_owned(), "b".to_owned())].into());
        assert!(!listings.changed(&annotated), "another edit");
        let mut renamed = annotated.clone();
        renamed.metadata.resource_version = Some("4".into());
        renamed.spec.served_name = Some("chat-v2".into());
        assert!(listings.changed(&renamed), "a new served name");
        // The deletion: the object as last seen, under a new version.
        let mut deleted = renamed.clone();
        deleted.metadata.resource_version = Some("5".into());
        assert!(listings.changed(&deleted), "deleted");
        assert!(listings.changed(&model("chat", "6")), "created again");

        let mut deleting = model("chat", "7");
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(crate::fixtures::test_now()),
        );
        assert!(listings.changed(&deleting), "its deletion started");
    }
}
