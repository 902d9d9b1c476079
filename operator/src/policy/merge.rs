//! Pure functions: which models a policy targets, whether it is accepted, and the effective
//! identity, rules and key mount of each model (the combination rule is documented on
//! [`crate::policy`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    KeyToPath, PodSpec, Secret, SecretVolumeSource, Volume, VolumeMount,
};
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use sluice_crds::rate_limit_policy::{Identity, IdentitySource, RateLimitRule};
use sluice_crds::sidecar_config::{
    IdentityConfig, SIDECAR_CONFIG_VERSION, VariantRoute, validate_rule,
};
use sluice_crds::{InferenceModel, RateLimitPolicy, SidecarConfig};

use crate::Result;
use crate::names::{KEYS_DIR, KEYS_VOLUME};

/// `Accepted=False` reason: the policy is invalid on its own.
pub const REASON_INVALID: &str = "PolicyInvalid";
/// `Accepted=False` reason: the API-key Secret or its entry does not exist.
pub const REASON_KEYS_SECRET: &str = "KeysSecretNotFound";
/// `Accepted=False` reason: no existing InferenceModel is targeted.
pub const REASON_TARGET: &str = "TargetNotFound";
/// `Accepted=False` reason: the policy's identity differs from an older policy's on a model.
pub const REASON_CONFLICT: &str = "Conflict";

/// The API-key Secret mounted into a model's pods, and whose policy it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeysMount {
    /// The policy whose identity names the Secret (the mount directory's name).
    pub policy: String,
    /// The Secret, in the model's namespace.
    pub secret_name: String,
    /// The Secret's entry holding the YAML list of keys.
    pub key: String,
}

/// API-key Secrets that exist in a namespace and their entries (names only: the operator
/// never needs the keys themselves), and those the operator may not read (no `get` granted on
/// them), which count as present: the pods' mount of the Secret is then the only check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeysSecrets {
    found: BTreeMap<String, BTreeSet<String>>,
    unreadable: BTreeSet<String>,
}

/// What a model's sidecars enforced before this reconcile: the live sidecar config (from the
/// ConfigMap) and the live key mount (from the Deployments). Lets a rejected policy change
/// nothing that was working.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Previous {
    /// The sidecar config document in the model's ConfigMap.
    pub config: Option<SidecarConfig>,
    /// The key Secret mounted in the model's pods.
    pub keys: Option<KeysMount>,
}

/// Why a policy is not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// `PolicyInvalid`, `KeysSecretNotFound`, `TargetNotFound` or `Conflict`.
    pub reason: &'static str,
    /// For a human: what is wrong and what to do.
    pub message: String,
}

/// The outcome for one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Existing models it targets, by name.
    pub targets: Vec<String>,
    /// Models whose sidecars get its current rules.
    pub applied_to: Vec<String>,
    /// Models where, rejected, its previously enforced rules are kept.
    pub kept_on: Vec<String>,
    /// Set when not accepted.
    pub rejection: Option<Rejection>,
}

/// What one model's sidecars enforce: the identity section, the rules (named
/// `<policy>/<rule>`), the key Secret to mount, and the policies applied.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelLimits {
    /// The sidecar config's `identity`.
    pub identity: IdentityConfig,
    /// The sidecar config's `rules`, oldest policy first.
    pub rules: Vec<RateLimitRule>,
    /// The Secret to mount for `identity.keysFile`.
    pub keys: Option<KeysMount>,
    /// Policies whose current rules are in `rules`, oldest first.
    pub policies: Vec<String>,
}

/// The effective limits of every model and the verdict on every policy of one namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    /// By model name (every model given, with or without policies).
    pub models: BTreeMap<String, ModelLimits>,
    /// By policy name (policies being deleted are left out).
    pub policies: BTreeMap<String, Verdict>,
}

/// The identity a model uses, in comparable form.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IdentityKey {
    source: IdentitySource,
    header: Option<String>,
    keys: Option<(String, String)>,
}

struct Owner {
    policy: String,
    identity: IdentityKey,
}

// === impl KeysMount ===

impl KeysMount {
    /// The directory the Secret is mounted at.
    pub fn dir(&self) -> String {
        format!("{KEYS_DIR}/{}", self.policy)
    }

    /// The sidecar config's `identity.keysFile`.
    pub fn file(&self) -> String {
        format!("{}/{}", self.dir(), self.key)
    }
}

// === impl KeysSecrets ===

impl KeysSecrets {
    /// Records that Secret `name` exists with these entries.
    pub fn insert(&mut self, name: impl Into<String>, entries: impl IntoIterator<Item = String>) {
        self.found.entry(name.into()).or_default().extend(entries);
    }

    /// Records that Secret `name` cannot be read (403): whether it exists, and with which
    /// entries, is not known, so a policy naming it is not rejected for it.
    pub fn insert_unreadable(&mut self, name: impl Into<String>) {
        self.unreadable.insert(name.into());
    }

    /// From Secrets read from the cluster (entry names of `data` and `stringData`).
    pub fn from_secrets<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> Self {
        let mut out = Self::default();
        for s in secrets {
            let entries = s
                .data
                .iter()
                .flat_map(|d| d.keys())
                .chain(s.string_data.iter().flat_map(|d| d.keys()))
                .cloned();
            out.insert(s.name_any(), entries);
        }
        out
    }

    fn check(&self, name: &str, entry: &str) -> Result<(), String> {
        if self.unreadable.contains(name) {
            return Ok(());
        }
        match self.found.get(name) {
            None => Err(format!(
                "the API-key Secret {name:?} does not exist in this namespace"
            )),
            Some(entries) if !entries.contains(entry) => Err(format!(
                "the API-key Secret {name:?} has no entry {entry:?}"
            )),
            Some(_) => Ok(()),
        }
    }
}

// === impl Verdict ===

impl Verdict {
    /// Whether the policy is accepted (its rules are enforced on every target).
    pub fn accepted(&self) -> bool {
        self.rejection.is_none()
    }
}

// === impl IdentityKey ===

impl IdentityKey {
    fn of(identity: &Identity) -> Self {
        Self {
            source: identity.source,
            header: identity.header.clone(),
            keys: identity
                .keys
                .as_ref()
                .map(|k| (k.secret_name.clone(), k.key.clone())),
        }
    }

    fn describe(&self) -> String {
        let from = match (self.source, &self.header) {
            (IdentitySource::Header, Some(h)) => format!("header {h}"),
            _ => "bearer token".to_owned(),
        };
        match &self.keys {
            Some((secret, key)) => format!("{from}, keys from Secret {secret}/{key}"),
            None => format!("{from}, no key list"),
        }
    }
}

/// Each pod's share of a `scope: Cluster` limit: 1 / ready pods of the model, in (0, 1]. With
/// no ready pod the share is 1 (the first pod to become ready may take the whole limit until
/// the next pod is counted).
pub fn replica_share(ready_pods: i32) -> f64 {
    1.0 / f64::from(ready_pods.max(1))
}

/// Checks what makes a policy unusable on its own, whatever it targets: exactly one of
/// `targetRef`/`selector`, a selector the API server would accept, and rules the sidecar can
/// enforce (the sidecar's own validation, on the rules as they will be named).
pub fn check_policy(policy: &RateLimitPolicy) -> Result<(), String> {
    let name = policy.name_any();
    let spec = &policy.spec;
    match (&spec.target_ref, &spec.selector) {
        (Some(_), Some(_)) | (None, None) => {
            return Err("set exactly one of targetRef or selector".to_owned());
        }
        (None, Some(selector)) => {
            Selector::try_from(selector.clone()).map_err(|e| format!("selector: {e}"))?;
        }
        (Some(_), None) => {}
    }
    if spec.rules.is_empty() {
        return Err("at least one rule is required".to_owned());
    }
    let mut names = BTreeSet::new();
    for rule in &spec.rules {
        if !names.insert(rule.name.as_str()) {
            return Err(format!("rule names must be unique: {:?}", rule.name));
        }
        validate_rule(rule)?;
        let rate_limited = rule.requests_per_second.is_some()
            || rule.requests_per_minute.is_some()
            || rule.tokens_per_minute.is_some()
            || rule.bytes_per_second.is_some();
        if rule.burst.is_some() && !rate_limited {
            return Err(format!(
                "rule {:?}: burst applies only to rate limits",
                rule.name
            ));
        }
    }
    // The sidecar's validation of the document these rules end up in, so whatever it would
    // reject is refused here, with the policy named, instead of breaking the model's config.
    let probe = SidecarConfig {
        version: SIDECAR_CONFIG_VERSION.to_owned(),
        generation: 0,
        model: "probe".to_owned(),
        variants: vec![VariantRoute {
            name: "probe".to_owned(),
            weight: 100,
            address: None,
        }],
        routing: Default::default(),
        auth: None,
        identity: spec
            .identity
            .as_ref()
            .map(|i| SidecarConfig::identity_from_policy(i, Some(format!("{KEYS_DIR}/{name}/k"))))
            .unwrap_or_default(),
        rules: renamed(&name, &spec.rules),
        replica_share: 1.0,
        saturation: Default::default(),
        fallback: None,
        cache: None,
        models: Vec::new(),
    };
    probe.validate().map_err(|e| {
        let text = e.to_string();
        text.strip_prefix("invalid sidecar config: ")
            .unwrap_or(&text)
            .to_owned()
    })?;
    if let Some(header) = spec.identity.as_ref().and_then(|i| i.header.as_deref())
        && http::HeaderName::from_bytes(header.as_bytes()).is_err()
    {
        return Err(format!(
            "identity.header {header:?} is not a valid header name"
        ));
    }
    Ok(())
}

/// The models (by name) a policy targets among `models`: those in its namespace named by
/// `targetRef` or matched by `selector`. Empty for a policy being deleted or with a selector
/// that does not parse.
pub fn targets(policy: &RateLimitPolicy, models: &[InferenceModel]) -> Vec<String> {
    if policy.metadata.deletion_timestamp.is_some() {
        return Vec::new();
    }
    let ns = policy.namespace();
    let in_ns = models
        .iter()
        .filter(|m| ns.is_none() || m.namespace().is_none() || m.namespace() == ns);
    let mut out: Vec<String> = match (&policy.spec.target_ref, &policy.spec.selector) {
        (Some(target), _) => in_ns
            .filter(|m| m.name_any() == target.name)
            .map(|m| m.name_any())
            .collect(),
        (None, Some(selector)) => match Selector::try_from(selector.clone()) {
            Ok(selector) => in_ns
                .filter(|m| selector.matches(m.labels()))
                .map(|m| m.name_any())
                .collect(),
            Err(_) => Vec::new(),
        },
        (None, None) => Vec::new(),
    };
    out.sort();
    out.dedup();
    out
}

/// Resolves every model and policy of one namespace (see the module docs for the rule).
/// `previous` holds what each model's sidecars enforced before (by model name).
pub fn resolve(
    models: &[InferenceModel],
    policies: &[RateLimitPolicy],
    secrets: &KeysSecrets,
    previous: &BTreeMap<String, Previous>,
) -> Resolution {
    let mut ordered: Vec<&RateLimitPolicy> = policies
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    ordered.sort_by(|a, b| {
        let at = |p: &RateLimitPolicy| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        at(a)
            .cmp(&at(b))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });

    // Each policy on its own.
    let mut verdicts: BTreeMap<String, Verdict> = BTreeMap::new();
    for p in &ordered {
        let targets = targets(p, models);
        let keys_check = p
            .spec
            .identity
            .as_ref()
            .and_then(|i| i.keys.as_ref())
            .map(|k| secrets.check(&k.secret_name, &k.key))
            .unwrap_or(Ok(()));
        let rejection = if let Err(message) = check_policy(p) {
            Some(Rejection {
                reason: REASON_INVALID,
                message,
            })
        } else if let Err(message) = keys_check {
            Some(Rejection {
                reason: REASON_KEYS_SECRET,
                message,
            })
        } else if targets.is_empty() {
            Some(Rejection {
                reason: REASON_TARGET,
                message: match (&p.spec.target_ref, &p.spec.selector) {
                    (Some(t), _) => format!("InferenceModel {:?} does not exist", t.name),
                    _ => "the selector matches no InferenceModel".to_owned(),
                },
            })
        } else {
            None
        };
        verdicts.insert(
            p.name_any(),
            Verdict {
                targets,
                rejection,
                ..Default::default()
            },
        );
    }

    // Each model, policies oldest first.
    let mut conflicts: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut resolved = BTreeMap::new();
    let mut names: Vec<String> = models.iter().map(|m| m.name_any()).collect();
    names.sort();
    names.dedup();
    for model in names {
        let prev = previous.get(&model);
        let mut limits = ModelLimits::default();
        let mut owner: Option<Owner> = None;
        for p in &ordered {
            let name = p.name_any();
            let Some(verdict) = verdicts.get_mut(&name) else {
                continue;
            };
            if let Some(rejection) = &verdict.rejection {
                if matches!(rejection.reason, REASON_INVALID | REASON_KEYS_SECRET)
                    && let Some(prev) = prev
                {
                    keep_previous(&name, prev, &mut limits, &mut owner, verdict, &model);
                }
                continue;
            }
            if !verdict.targets.contains(&model) {
                continue;
            }
            if let Some(identity) = &p.spec.identity {
                let key = IdentityKey::of(identity);
                match &owner {
                    None => {
                        let keys = identity.keys.as_ref().map(|k| KeysMount {
                            policy: name.clone(),
                            secret_name: k.secret_name.clone(),
                            key: k.key.clone(),
                        });
                        limits.identity = SidecarConfig::identity_from_policy(
                            identity,
                            keys.as_ref().map(KeysMount::file),
                        );
                        limits.keys = keys;
                        owner = Some(Owner {
                            policy: name.clone(),
                            identity: key,
                        });
                    }
                    Some(o) if o.identity == key => {}
                    Some(o) => {
                        conflicts.entry(name.clone()).or_default().push((
                            model.clone(),
                            format!(
                                "on InferenceModel {model:?} its identity ({}) differs from that of the older policy {:?} ({})",
                                key.describe(),
                                o.policy,
                                o.identity.describe()
                            ),
                        ));
                        continue;
                    }
                }
            }
            limits.rules.extend(renamed(&name, &p.spec.rules));
            limits.policies.push(name);
            verdict.applied_to.push(model.clone());
        }
        resolved.insert(model, limits);
    }

    for (name, found) in conflicts {
        if let Some(v) = verdicts.get_mut(&name) {
            let mut message = found
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            message
                .push_str(": its rules are not applied there; declare the same identity or none");
            if !v.applied_to.is_empty() {
                message.push_str(&format!(" (applied to {})", v.applied_to.join(", ")));
            }
            v.rejection = Some(Rejection {
                reason: REASON_CONFLICT,
                message,
            });
        }
    }
    Resolution {
        models: resolved,
        policies: verdicts,
    }
}

/// A rejected policy keeps on `model` what it had in force there: its rules, and the identity
/// and key mount it provided (unless an older policy already provides the identity).
fn keep_previous(
    policy: &str,
    prev: &Previous,
    limits: &mut ModelLimits,
    owner: &mut Option<Owner>,
    verdict: &mut Verdict,
    model: &str,
) {
    let Some(config) = &prev.config else { return };
    let prefix = format!("{policy}/");
    let kept: Vec<RateLimitRule> = config
        .rules
        .iter()
        .filter(|r| r.name.starts_with(&prefix))
        .cloned()
        .collect();
    if !kept.is_empty() {
        limits.rules.extend(kept);
        verdict.kept_on.push(model.to_owned());
    }
    if owner.is_none()
        && let Some(keys) = &prev.keys
        && keys.policy == policy
        && config.identity.keys_file.as_deref() == Some(keys.file().as_str())
    {
        limits.identity = config.identity.clone();
        limits.keys = Some(keys.clone());
        *owner = Some(Owner {
            policy: policy.to_owned(),
            identity: IdentityKey {
                source: config.identity.source,
                header: config.identity.header.clone(),
                keys: Some((keys.secret_name.clone(), keys.key.clone())),
            },
        });
    }
}

fn renamed(policy: &str, rules: &[RateLimitRule]) -> Vec<RateLimitRule> {
    rules
        .iter()
        .map(|r| RateLimitRule {
            name: format!("{policy}/{}", r.name),
            ..r.clone()
        })
        .collect()
}

/// `config` with `limits`' identity and rules, validated and sealed again (so its
/// `generation` names exactly what the sidecars will enforce).
pub fn apply_limits(mut config: SidecarConfig, limits: &ModelLimits) -> Result<SidecarConfig> {
    config.identity = limits.identity.clone();
    config.rules = limits.rules.clone();
    config.validate()?;
    Ok(config.sealed()?)
}

/// The pod volume and sidecar mount for a model's key Secret (none without one). Only the
/// Secret's entry is projected, read-only. The result depends only on the mount (policy,
/// Secret, entry), so editing limits never changes the pod template.
pub fn key_secret_volumes(keys: Option<&KeysMount>) -> Vec<(Volume, VolumeMount)> {
    keys.map(|k| {
        (
            Volume {
                name: KEYS_VOLUME.to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(k.secret_name.clone()),
                    items: Some(vec![KeyToPath {
                        key: k.key.clone(),
                        path: k.key.clone(),
                        mode: None,
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            },
            VolumeMount {
                name: KEYS_VOLUME.to_owned(),
                mount_path: k.dir(),
                read_only: Some(true),
                ..Default::default()
            },
        )
    })
    .into_iter()
    .collect()
}

/// The key mount a live pod spec carries (the inverse of [`key_secret_volumes`]), for
/// [`Previous::keys`].
pub fn keys_mount_in(spec: &PodSpec) -> Option<KeysMount> {
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == KEYS_VOLUME)?;
    let secret = volume.secret.as_ref()?;
    let key = secret.items.as_ref()?.first()?.key.clone();
    let mount = spec
        .containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .find(|m| m.name == KEYS_VOLUME)?;
    let policy = mount
        .mount_path
        .strip_prefix(KEYS_DIR)?
        .strip_prefix('/')?
        .to_owned();
    Some(KeysMount {
        policy,
        secret_name: secret.secret_name.clone()?,
        key,
    })
}

#[cfg(test)]
mod tests;
