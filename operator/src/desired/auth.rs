//! `spec.auth` in a model's pods: its API-key Secret and JWKS Secrets or ConfigMaps mounted
//! read-only under [`AUTH_DIR`], and the sidecar config's `auth` naming those files. Mounted
//! Secrets and ConfigMaps are updated in place by the kubelet, and the sidecar re-reads them, so
//! rotating keys needs no restart; only adding or removing a source changes the pod template.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, KeyToPath, SecretVolumeSource, Volume, VolumeMount,
};
use sluice_crds::auth::{Auth, AuthConfig};

use crate::names::AUTH_DIR;

/// The pod volume of the API-key Secret.
const KEYS_VOLUME: &str = "auth-keys";

fn keys_dir() -> String {
    format!("{AUTH_DIR}/keys")
}

fn jwks_dir(issuer: usize) -> String {
    format!("{AUTH_DIR}/jwks-{issuer}")
}

fn jwks_volume(issuer: usize) -> String {
    format!("auth-jwks-{issuer}")
}

/// The sidecar config's `auth` for `auth`, naming the files [`auth_volumes`] mounts.
pub fn auth_config(auth: &Auth) -> AuthConfig {
    let keys_file = auth
        .api_keys
        .as_ref()
        .map(|k| format!("{}/{}", keys_dir(), k.key));
    auth.to_config(keys_file, |i| {
        let entry = auth.jwt[i].jwks.as_ref().map_or("", |r| r.entry());
        format!("{}/{entry}", jwks_dir(i))
    })
}

/// The volumes and sidecar mounts of `auth`'s key sources (only the named entries, read-only).
pub fn auth_volumes(auth: &Auth) -> Vec<(Volume, VolumeMount)> {
    let keys = auth.api_keys.as_ref().map(|k| {
        let volume = Volume {
            name: KEYS_VOLUME.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(k.secret_name.clone()),
                items: Some(vec![entry(&k.key)]),
                ..Default::default()
            }),
            ..Default::default()
        };
        (volume, mount(KEYS_VOLUME, keys_dir()))
    });
    let jwks = auth.jwt.iter().enumerate().filter_map(|(i, j)| {
        let r = j.jwks.as_ref()?;
        let items = Some(vec![entry(r.entry())]);
        let volume = Volume {
            name: jwks_volume(i),
            secret: r.secret_name.as_ref().map(|name| SecretVolumeSource {
                secret_name: Some(name.clone()),
                items: items.clone(),
                ..Default::default()
            }),
            config_map: r
                .config_map_name
                .as_ref()
                .map(|name| ConfigMapVolumeSource {
                    name: name.clone(),
                    items,
                    ..Default::default()
                }),
            ..Default::default()
        };
        Some((volume, mount(&jwks_volume(i), jwks_dir(i))))
    });
    keys.into_iter().chain(jwks).collect()
}

fn entry(key: &str) -> KeyToPath {
    KeyToPath {
        key: key.to_owned(),
        path: key.to_owned(),
        mode: None,
    }
}

fn mount(volume: &str, path: String) -> VolumeMount {
    VolumeMount {
        name: volume.to_owned(),
        mount_path: path,
        read_only: Some(true),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use sluice_crds::{
        auth::{JwksRef, JwtIssuer},
        rate_limit_policy::SecretKeysRef,
    };

    use super::*;

    #[test]
    fn every_file_the_config_names_is_mounted() {
        let auth = Auth {
            api_keys: Some(SecretKeysRef {
                secret_name: "keys".into(),
                key: "keys.yaml".into(),
            }),
            jwt: vec![
                JwtIssuer {
                    issuer: "https://a".into(),
                    audiences: vec!["sluice".into()],
                    jwks_uri: Some("https://a/jwks".into()),
                    ..Default::default()
                },
                JwtIssuer {
                    issuer: "https://b".into(),
                    audiences: vec!["sluice".into()],
                    jwks: Some(JwksRef {
                        config_map_name: Some("b-keys".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            allow: vec![],
        };
        let config = auth_config(&auth);
        config.validate().unwrap();
        assert_eq!(config.jwt[0].tenant_claim, "sub");
        assert_eq!(config.jwt[1].roles_claim, "roles");
        assert_eq!(config.jwt[0].jwks_file, None);
        let volumes = auth_volumes(&auth);
        assert_eq!(volumes.len(), 2, "the jwksUri issuer mounts nothing");
        let mounted: Vec<String> = volumes
            .iter()
            .map(|(v, m)| {
                let items = v
                    .secret
                    .as_ref()
                    .and_then(|s| s.items.clone())
                    .or_else(|| v.config_map.as_ref().and_then(|c| c.items.clone()))
                    .unwrap();
                assert_eq!(m.read_only, Some(true));
                assert_eq!(m.name, v.name);
                format!("{}/{}", m.mount_path, items[0].path)
            })
            .collect();
        assert_eq!(
            mounted,
            [
                config.keys_file.clone().unwrap(),
                config.jwt[1].jwks_file.clone().unwrap()
            ]
        );
        assert_eq!(
            volumes[1].0.config_map.as_ref().unwrap().name,
            "b-keys",
            "a ConfigMap key set is mounted from the ConfigMap"
        );
    }
}
