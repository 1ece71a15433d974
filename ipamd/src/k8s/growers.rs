//! The cluster's nodes whose pools grow now, counted through the API
//! server, so that the calls that grow a pool share the cloud account's
//! budget among the nodes that make them, not among every node (see
//! [`providers::bucket::Buckets::set_growers`]).
//!
//! Why: at the end of a cluster-wide cold start most nodes are done, and
//! the few still growing would each keep their 1/N share of the account
//! (one call per API every 400 s at 2,000 nodes) while the account's
//! budget sits unused. In the 2,000-node simulation (`cluster-sim`) this
//! tail took the cold start from about 1.08× to 1.5× its floor.
//!
//! How: while its pool grows ([`crate::reconciler::Reconciler::grows`]
//! within [`GROWS_WITHIN`], looked at every [`PUBLISH_EVERY`]), ipamd holds
//! a `coordination.k8s.io/v1` Lease named after its node in the growers
//! namespace (`--growers-namespace` / `IPAMD_GROWERS_NAMESPACE`, which
//! holds nothing else), and deletes it when it stops growing and when it
//! stops. Every node counts that namespace's Leases the way it counts nodes
//! ([`super::peers::count_of`]: one LIST with `limit=1` and
//! `remainingItemCount`), on the node count's schedule. Two writes per
//! node per spell of growth; no central operator.
//!
//! The count applies only to a node that has grown for a long spell
//! ([`Spell`]): nodes idle alike start to grow together when pods are
//! scheduled cluster-wide, and each would believe it grows almost alone.
//! A count that cannot be read leaves the last one in force; a node never
//! believes fewer grow than one (itself) nor more than the node count.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::Client;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Ctx;

/// How long after its last grow a node still counts among the nodes that
/// grow: a node between two grows of one spell (its pods still arriving)
/// keeps its Lease instead of writing it twice. A node waiting for its
/// token to grow counts as growing all along (its plan holds the grow),
/// so this bridges pauses in demand; a node backing off after failed
/// steps for longer (the reconciler's back-off reaches 30 s, 60 s for a
/// full subnet) drops out of the count meanwhile, which makes no grow
/// calls, and its spell starts over. It is also part of how long the
/// count lags behind a node that is done (with [`PUBLISH_EVERY`] and the
/// count's re-read, up to 60 s): in the 2,000-node simulation, 60 s here
/// left the last nodes of a cold start a count several times too high
/// (1.13× the floor under prefix delegation, against 1.07× at 20 s).
pub const GROWS_WITHIN: Duration = Duration::from_secs(20);
/// How often a node looks whether it grows, to publish it.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(5);
/// How long a node must have grown without a pause of
/// [`GROWS_WITHIN`] before its grow calls take their share of the nodes
/// that grow ([`Spell`]).
pub const LONG_SPELL: Duration = Duration::from_secs(300);
/// The longest wait between two attempts to publish that failed.
const RETRY_AT_MOST: Duration = Duration::from_secs(300);
/// How long the Lease's delete at ipamd's stop may take.
const DELETE_WITHIN: Duration = Duration::from_secs(2);

/// The count of Leases in `namespace`: the nodes that grow.
pub async fn count(client: &Client, namespace: &str) -> Result<u32, String> {
    super::peers::count_of(Api::<Lease>::namespaced(client.clone(), namespace)).await
}

/// The Node object `node`'s uid (listed by name: the grant ipamd already
/// has), for the Lease's owner reference.
async fn node_uid(client: &Client, node: &str) -> Result<String, String> {
    let api = Api::<Node>::all(client.clone());
    let list = api
        .list(&ListParams::default().fields(&format!("metadata.name={node}")))
        .await
        .map_err(|e| super::describe(&e))?;
    list.items
        .into_iter()
        .find_map(|n| n.metadata.uid)
        .ok_or_else(|| format!("node {node} is not in the API server"))
}

/// Creates (`grows`) or deletes this node's Lease. Already there, or
/// already gone, is done. The Lease is owned by the node's Node object,
/// so the garbage collector deletes it with the Node (a node deleted
/// while its pool grew, its ipamd killed).
pub async fn publish(
    client: &Client,
    namespace: &str,
    node: &str,
    grows: bool,
) -> Result<(), String> {
    let api = Api::<Lease>::namespaced(client.clone(), namespace);
    let r = if grows {
        let uid = node_uid(client, node).await?;
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(node.to_string()),
                namespace: Some(namespace.to_string()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: node.to_string(),
                    uid,
                    ..Default::default()
                }]),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        super::REPORTER.to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.to_string()),
                // When this spell of growth began (for `kubectl get`).
                acquire_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                ..Default::default()
            }),
        };
        api.create(&PostParams::default(), &lease).await.map(|_| ())
    } else {
        api.delete(node, &DeleteParams::default()).await.map(|_| ())
    };
    match r {
        Ok(()) => Ok(()),
        Err(kube::Error::Api(s)) if (grows && s.code == 409) || (!grows && s.code == 404) => Ok(()),
        Err(e) => Err(super::describe(&e)),
    }
}

/// One node's spell of growth, and the growers count it applies.
///
/// The count applies only once the node has grown for [`LONG_SPELL`]:
/// the nodes still growing long after a cluster-wide cold start (the ones
/// the account's budget, freed by the nodes done, should go to). A short
/// spell (a pod replaced, pods scheduled cluster-wide after a quiet time)
/// keeps every node's share: when many nodes start to grow together, the
/// count read a moment before is far below the nodes that grow now, and
/// each would take a share many times its own. In the 2,000-node
/// simulation, applying the count at once throttled 7% of the churn's
/// Assign calls under WARM_IP_TARGET (none with every node's share).
#[derive(Debug, Default, Clone, Copy)]
pub struct Spell {
    since: Option<tokio::time::Instant>,
}

impl Spell {
    /// Whether the node grew at the last look.
    pub fn grows(&self) -> bool {
        self.since.is_some()
    }

    /// Looks at whether the node `grows` at `now`; `count` is the growers
    /// count last read. Returns what the grow calls' share is of
    /// ([`providers::CloudProvider::set_account_growers`]).
    pub fn look(
        &mut self,
        grows: bool,
        now: tokio::time::Instant,
        count: Option<u32>,
    ) -> Option<u32> {
        self.since = if grows {
            Some(self.since.unwrap_or(now))
        } else {
            None
        };
        self.since
            .filter(|t| now.saturating_duration_since(*t) >= LONG_SPELL)
            .and(count)
    }
}

/// Publishes whether this node grows until `stop`, then deletes its Lease.
pub(super) async fn run(cx: Ctx, namespace: String, mut stop: watch::Receiver<bool>) {
    let node = cx.s.node_name.clone();
    // Not known at start: the first look writes either way (a Lease left
    // by a run that was killed is deleted).
    let mut published: Option<bool> = None;
    let mut spell = Spell::default();
    // After a failure, the next attempt waits: PUBLISH_EVERY doubling to
    // RETRY_AT_MOST (a missing namespace or Role fails every time, and
    // 2,000 nodes retrying every 5 s would be 400 requests a second).
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let now = tokio::time::Instant::now();
        let grows = cx.ipam.reconciler.grows(cx.s.grows_within);
        let count = cx.status.lock().ok().and_then(|s| s.account_growers);
        let share = spell.look(grows, now, count);
        if published != Some(grows) && retry.is_none_or(|(at, _)| now >= at) {
            match publish(&cx.client, &namespace, &node, grows).await {
                Ok(()) => {
                    debug!(grows, "published whether this node's pool grows");
                    published = Some(grows);
                    retry = None;
                }
                Err(e) => {
                    let wait =
                        retry.map_or(cx.s.growers_every, |(_, w)| (w * 2).min(RETRY_AT_MOST));
                    if retry.is_none() {
                        // Said once per run of failures.
                        warn!(error = %e, namespace = %namespace, "cannot publish whether this node's pool grows; its grow calls keep every node's share");
                    } else {
                        debug!(error = %e, retry_in_s = wait.as_secs(), "cannot publish whether this node's pool grows");
                    }
                    retry = Some((now + providers::jitter::about(wait), wait));
                }
            }
        }
        // Only a node counted itself (its Lease in place) takes the
        // count's share.
        let share = share.filter(|_| published == Some(true));
        cx.ipam.reconciler.provider().set_account_growers(share);
        tokio::select! {
            biased;
            _ = tokio::time::sleep(cx.s.growers_every) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if published != Some(false) {
        match tokio::time::timeout(DELETE_WITHIN, publish(&cx.client, &namespace, &node, false))
            .await
        {
            Ok(Ok(())) => info!("this node's growers Lease deleted"),
            Ok(Err(e)) => info!(error = %e, "cannot delete this node's growers Lease"),
            Err(_) => info!("cannot delete this node's growers Lease: no answer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_count_applies_after_a_long_spell_and_a_pause_starts_over() {
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut spell = Spell::default();
        assert_eq!(spell.look(false, at(0), Some(20)), None);
        assert!(!spell.grows());
        // Growing: every node's share until the spell is long.
        assert_eq!(spell.look(true, at(5), Some(20)), None);
        assert!(spell.grows());
        assert_eq!(spell.look(true, at(304), Some(20)), None);
        assert_eq!(spell.look(true, at(305), Some(20)), Some(20));
        // No count read yet: nothing to apply.
        assert_eq!(spell.look(true, at(310), None), None);
        // A pause: the next spell starts from nothing.
        assert_eq!(spell.look(false, at(315), Some(20)), None);
        assert_eq!(spell.look(true, at(320), Some(20)), None);
        assert_eq!(spell.look(true, at(619), Some(20)), None);
        assert_eq!(spell.look(true, at(620), Some(7)), Some(7));
    }
}
