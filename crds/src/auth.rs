//! Who may call a model: `InferenceModel.spec.auth` (API keys and JWT issuers, and the access
//! rules over the tenants and roles they give), and its form in the sidecar config
//! ([`AuthConfig`]), where Secrets and ConfigMaps are file paths.
//!
//! Authentication lives on the model, not on a `RateLimitPolicy`: it decides who may use the
//! model at all, is owned by the model's team, and must hold whether or not any limit applies.
//! Rate-limit rules then match the tenant and roles it establishes.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::rate_limit_policy::SecretKeysRef;

/// The claim JWT tenants come from when `tenantClaim` is unset.
pub const DEFAULT_TENANT_CLAIM: &str = "sub";
/// The claim JWT roles come from when `rolesClaim` is unset.
pub const DEFAULT_ROLES_CLAIM: &str = "roles";
/// The data entry of a JWKS Secret or ConfigMap when `key` is unset.
pub const DEFAULT_JWKS_ENTRY: &str = "jwks.json";

/// See `InferenceModelSpec.auth`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.apiKeys) || (has(self.jwt) && size(self.jwt) > 0)").message("auth needs apiKeys or at least one jwt issuer"))]
pub struct Auth {
    /// API keys, sent as `Authorization: Bearer <key>`: a Secret entry holding a YAML list of
    /// `{key, tenant, roles}` (roles optional). Edits to the Secret apply without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<SecretKeysRef>,
    /// JWT issuers whose bearer tokens are accepted (RS256/384/512, PS256/384/512, ES256/384
    /// and EdDSA; never HMAC or `none`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.issuer == a.issuer))").message("jwt issuers must be unique"))]
    pub jwt: Vec<JwtIssuer>,
    /// Who may call the model; a caller matching any rule may. Empty: every authenticated
    /// caller may use every variant and the override header. Others get 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allow: Vec<AccessRule>,
}

/// One accepted JWT issuer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.jwksUri) != has(self.jwks)").message("set exactly one of jwksUri and jwks"))]
pub struct JwtIssuer {
    /// The `iss` claim the tokens carry, exactly.
    #[schemars(length(min = 1, max = 512))]
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one.
    #[schemars(length(min = 1, max = 16))]
    pub audiences: Vec<String>,
    /// The issuer's key set, fetched over HTTP(S) and refreshed every 5 minutes, and at once
    /// (at most every 30 s) when a token names a key it lacks, so rotated keys are picked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub jwks_uri: Option<String>,
    /// The key set from a Secret or ConfigMap in the model's namespace (edits apply without a
    /// restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<JwksRef>,
    /// The claim naming the caller's tenant (default `sub`); a dotted path reaches into
    /// objects, e.g. `org.id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_claim: Option<String>,
    /// The claim listing the caller's roles (default `roles`): an array of strings, or one
    /// space-separated string (as `scope` is); a dotted path reaches into objects, e.g.
    /// `realm_access.roles`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles_claim: Option<String>,
}

/// A JSON Web Key Set held in a Secret or ConfigMap entry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretName) != has(self.configMapName)").message("set exactly one of secretName and configMapName"))]
pub struct JwksRef {
    /// A Secret holding the key set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// A ConfigMap holding the key set (public keys are not secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub config_map_name: Option<String>,
    /// The data entry, default `jwks.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: Option<String>,
}

/// Callers one access rule admits, and what they may do. Every condition given must hold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessRule {
    /// Tenants admitted. Empty: any tenant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    /// Roles admitted; the caller needs one of them. Empty: any roles, or none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Variants these callers may be routed to: weighted routing picks among them only.
    /// Empty: every variant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<String>,
    /// Whether these callers may pin a variant with `routing.overrideHeader` (within
    /// `variants`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub variant_override: bool,
}

// === the sidecar config's form ===

/// `auth` in the sidecar config: the model's [`Auth`], with its Secrets and ConfigMaps as the
/// paths of the files the operator mounts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Path of the mounted API-key list (a YAML list of `{key, tenant, roles}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_file: Option<String>,
    /// Accepted JWT issuers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt: Vec<JwtIssuerConfig>,
    /// Who may call (see [`Auth::allow`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AccessRule>,
}

/// One JWT issuer in the sidecar config.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// The exact `iss`.
    pub issuer: String,
    /// Accepted `aud` values (at least one).
    pub audiences: Vec<String>,
    /// The key set's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The key set's mounted file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// The tenant's claim (dotted path).
    pub tenant_claim: String,
    /// The roles' claim (dotted path).
    pub roles_claim: String,
}

// === impl Auth ===

impl Auth {
    /// The sidecar config's form, with the API keys at `keys_file` and issuer `i`'s mounted key
    /// set (if any) at `jwks_file(i)`.
    pub fn to_config(
        &self,
        keys_file: Option<String>,
        jwks_file: impl Fn(usize) -> String,
    ) -> AuthConfig {
        AuthConfig {
            keys_file: self.api_keys.as_ref().and(keys_file),
            jwt: self
                .jwt
                .iter()
                .enumerate()
                .map(|(i, j)| JwtIssuerConfig {
                    issuer: j.issuer.clone(),
                    audiences: j.audiences.clone(),
                    jwks_uri: j.jwks_uri.clone(),
                    jwks_file: j.jwks.as_ref().map(|_| jwks_file(i)),
                    tenant_claim: j
                        .tenant_claim
                        .clone()
                        .unwrap_or_else(|| DEFAULT_TENANT_CLAIM.to_owned()),
                    roles_claim: j
                        .roles_claim
                        .clone()
                        .unwrap_or_else(|| DEFAULT_ROLES_CLAIM.to_owned()),
                })
                .collect(),
            allow: self.allow.clone(),
        }
    }

    /// Checks what the schema cannot: key-set sources, access rules naming existing variants,
    /// and (through [`AuthConfig::validate`]) what the sidecar checks of the config's form.
    pub fn validate(&self, variants: &[&str]) -> Result<(), String> {
        for j in &self.jwt {
            if let Some(uri) = &j.jwks_uri
                && !(uri.starts_with("https://") || uri.starts_with("http://"))
            {
                return Err(format!(
                    "spec.auth.jwt {:?}: jwksUri {uri:?} is not an http(s) URL",
                    j.issuer
                ));
            }
            if let Some(r) = &j.jwks
                && r.secret_name.is_some() == r.config_map_name.is_some()
            {
                return Err(format!(
                    "spec.auth.jwt {:?}: jwks: set exactly one of secretName and configMapName",
                    j.issuer
                ));
            }
        }
        for (i, rule) in self.allow.iter().enumerate() {
            if let Some(v) = rule
                .variants
                .iter()
                .find(|v| !variants.contains(&v.as_str()))
            {
                return Err(format!(
                    "spec.auth.allow[{i}] names variant {v:?}, which the model does not have"
                ));
            }
        }
        // Any paths do: only which sources are set matters here.
        self.to_config(Some(String::new()), |_| String::new())
            .validate()
            .map_err(|e| format!("spec.{e}"))
    }
}

impl JwksRef {
    /// The data entry holding the key set.
    pub fn entry(&self) -> &str {
        self.key.as_deref().unwrap_or(DEFAULT_JWKS_ENTRY)
    }
}

// === impl AuthConfig ===

impl AuthConfig {
    /// Checks a document's `auth` (the sidecar reads it from a file a person may write).
    pub fn validate(&self) -> Result<(), String> {
        if self.keys_file.is_none() && self.jwt.is_empty() {
            return Err("auth needs API keys or at least one jwt issuer".to_owned());
        }
        for j in &self.jwt {
            if j.issuer.is_empty() || j.audiences.iter().all(String::is_empty) {
                return Err("auth.jwt: issuer and at least one audience are required".to_owned());
            }
            if j.jwks_uri.is_some() == j.jwks_file.is_some() {
                return Err(format!(
                    "auth.jwt {:?}: set exactly one key set: jwksUri, or a mounted one (jwks, jwksFile)",
                    j.issuer
                ));
            }
            if j.tenant_claim.is_empty() || j.roles_claim.is_empty() {
                return Err(format!(
                    "auth.jwt {:?}: tenantClaim and rolesClaim must not be empty",
                    j.issuer
                ));
            }
        }
        let mut issuers = std::collections::HashSet::new();
        if let Some(j) = self.jwt.iter().find(|j| !issuers.insert(&j.issuer)) {
            return Err(format!("auth.jwt: issuer {:?} is listed twice", j.issuer));
        }
        Ok(())
    }
}
