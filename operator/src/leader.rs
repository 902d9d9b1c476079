//! Leader election on a `coordination.k8s.io/v1` Lease, so several replicas can run and only
//! one writes. Optimistic concurrency (the Lease's resourceVersion) settles races: whoever's
//! update lands first leads; the other gets 409 and stays a follower.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::Result;

/// How long a Lease stays valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews (and followers retry).
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// A leader that could not renew for this long stops writing (before anyone can take over).
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// One replica's view of the leader Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    holder: String,
}

// === impl LeaderElector ===

impl LeaderElector {
    /// Competes for Lease `name` in `namespace` as `holder` (the pod name).
    pub fn new(client: Client, namespace: &str, name: &str, holder: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            holder: holder.to_owned(),
        }
    }

    /// One attempt to take or renew the Lease; `true` while this replica holds it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let duration = LEASE_DURATION.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.holder.as_str());
        if !ours {
            let valid_for = SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or(duration),
            ));
            let held = spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty())
                && spec
                    .renew_time
                    .as_ref()
                    .is_some_and(|t| t.0 + valid_for > now);
            if held {
                return Ok(false);
            }
            spec.holder_identity = Some(self.holder.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(duration);
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Gives the Lease up (on graceful shutdown) so another replica takes over at once.
    pub async fn release(&self) -> Result<()> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await?
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.holder.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            conflict_is_false(
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await,
            )?;
        }
        Ok(())
    }
}

fn conflict_is_false(result: kube::Result<Lease>) -> Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use serde_json::{Value, json};

    use super::*;
    use crate::controller::Context;
    use crate::fixtures::Step;

    const LEASE: &str =
        "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases/sluice-operator";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases";

    fn lease(holder: &str, renewed: Timestamp) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "sluice-operator", "namespace": "sluice-system", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": MicroTime(renewed), "leaseTransitions": 2},
        })
    }

    fn elector(ctx: &Context) -> LeaderElector {
        LeaderElector::new(
            ctx.client.clone(),
            "sluice-system",
            "sluice-operator",
            "pod-a",
        )
    }

    #[tokio::test]
    async fn creates_the_lease_when_there_is_none() {
        let (ctx, server) = Context::test();
        let verifier = server.run(vec![Step::get(LEASE, None), Step::create(LEASES)]);
        assert!(
            elector(&ctx)
                .try_acquire_or_renew()
                .await
                .expect("acquires")
        );
        let seen = verifier.await.expect("verifier");
        assert_eq!(seen[1].body["spec"]["holderIdentity"], "pod-a");
    }

    #[tokio::test]
    async fn follows_while_another_replica_renews() {
        let (ctx, server) = Context::test();
        let verifier = server.run(vec![Step::get(
            LEASE,
            Some(lease("pod-b", Timestamp::now())),
        )]);
        assert!(!elector(&ctx).try_acquire_or_renew().await.expect("answers"));
        verifier.await.expect("verifier");
    }

    #[tokio::test]
    async fn takes_over_an_expired_lease_with_optimistic_concurrency() {
        let (ctx, server) = Context::test();
        let stale = Timestamp::now() - SignedDuration::from_secs(60);
        let verifier = server.run(vec![
            Step::get(LEASE, Some(lease("pod-b", stale))),
            Step::replace(LEASE),
        ]);
        assert!(
            elector(&ctx)
                .try_acquire_or_renew()
                .await
                .expect("acquires")
        );
        let seen = verifier.await.expect("verifier");
        let put = &seen[1].body;
        assert_eq!(
            put["metadata"]["resourceVersion"], "7",
            "a racing replica gets 409"
        );
        assert_eq!(put["spec"]["holderIdentity"], "pod-a");
        assert_eq!(put["spec"]["leaseTransitions"], 3);
    }

    #[tokio::test]
    async fn losing_the_race_is_not_an_error() {
        let (ctx, server) = Context::test();
        let stale = Timestamp::now() - SignedDuration::from_secs(60);
        let verifier = server.run(vec![
            Step::get(LEASE, Some(lease("pod-b", stale))),
            Step::replace(LEASE).fails_with(409),
        ]);
        assert!(!elector(&ctx).try_acquire_or_renew().await.expect("answers"));
        verifier.await.expect("verifier");
    }
}
