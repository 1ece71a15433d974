//! The cluster's node count, given to the provider as the number of nodes
//! that share the cloud account's request budget (see
//! [`providers::bucket::Buckets`]: each node's client-side buckets take
//! their share of the account's documented rate, so 2,000 nodes joining
//! together spread their calls instead of being throttled).
//!
//! One LIST of nodes with `limit=1` at start, again after 10, 20 and 40
//! seconds and then every [`PEERS_EVERY`] (jittered): the API server answers with one node and
//! `metadata.remainingItemCount`, the items left ("Retrieving large results
//! sets in chunks", Kubernetes API concepts), so the count costs one item
//! however large the cluster. At 2,000 nodes that is about 33 small LISTs a
//! second across the cluster, more while a wave of nodes starts, and as
//! many again for the growers count while every node grows
//! ([`super::growers`]).

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::Client;
use tokio::sync::watch;
use tracing::{debug, info};

use super::Ctx;

/// How often the node count is read again, once a node has run a while.
pub const PEERS_EVERY: Duration = Duration::from_secs(60);
/// The first re-read after start. Nodes join in waves (an autoscaler adds
/// hundreds at once): the first to start see only part of the wave, so
/// the count is read again after 10 s, then 20 s, 40 s, and from then on
/// every [`PEERS_EVERY`].
const FIRST_REREAD: Duration = Duration::from_secs(10);

/// The wait before the `n`th re-read of the count (0: the first after
/// start), jittered by a fifth.
pub fn reread_after(n: u32) -> Duration {
    let d = FIRST_REREAD.saturating_mul(1 << n.min(8)).min(PEERS_EVERY);
    providers::jitter::about(d)
}
/// The largest count believed (a cluster of more nodes than any
/// Kubernetes supports is a wrong answer, and would stop this node's calls
/// for good).
pub const MAX_PEERS: u32 = 100_000;
/// How long the count read before the pool's start may take.
const PRIME_WITHIN: Duration = Duration::from_secs(5);

/// The cluster's node count: the one node listed plus
/// `remainingItemCount`, at most [`MAX_PEERS`]. An error when the API
/// server says there are more nodes without saying how many.
pub async fn count(client: &Client) -> Result<u32, String> {
    count_of(Api::<Node>::all(client.clone())).await
}

/// The objects `api` lists: one listed plus `remainingItemCount`, at most
/// [`MAX_PEERS`]; at least 1 (the node counting is one of them). An error
/// when the API server says there are more without saying how many.
pub async fn count_of<K>(api: Api<K>) -> Result<u32, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let list = api
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| super::describe(&e))?;
    let more = list
        .metadata
        .continue_
        .as_deref()
        .is_some_and(|c| !c.is_empty());
    let rest = match list.metadata.remaining_item_count {
        Some(n) => n.max(0),
        // More nodes, but not how many: not a count (reading it as none
        // would make this node believe it is alone).
        None if more => return Err("the API server gave no remainingItemCount".into()),
        None => 0,
    };
    Ok((list.items.len() as i64 + rest).clamp(1, i64::from(MAX_PEERS)) as u32)
}

/// Reads the count once, within a few seconds, for the provider's first
/// calls (`None` on failure: the provider assumes it is alone, halving on
/// throttling still applies, until [`run`] succeeds).
pub async fn prime(client: &Client) -> Option<u32> {
    match tokio::time::timeout(PRIME_WITHIN, count(client)).await {
        Ok(Ok(n)) => {
            info!(
                nodes = n,
                "the cloud account's request budget is shared with the cluster's nodes"
            );
            Some(n)
        }
        Ok(Err(e)) => {
            info!(error = %e, "cannot count the cluster's nodes yet");
            None
        }
        Err(_) => {
            info!("cannot count the cluster's nodes yet: no answer");
            None
        }
    }
}

/// Reads the count again ([`reread_after`]) until `stop`, and with a
/// growers namespace the count of nodes that grow ([`super::growers`]).
pub(super) async fn run(cx: Ctx, mut stop: watch::Receiver<bool>) {
    let growers = cx.s.growers_namespace.clone();
    for n in 0.. {
        tokio::select! {
            biased;
            _ = tokio::time::sleep(reread_after(n)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match count(&cx.client).await {
            Ok(n) => {
                cx.ipam.reconciler.provider().set_account_peers(n);
                if let Ok(mut st) = cx.status.lock() {
                    st.account_peers = Some(n);
                }
            }
            Err(e) => debug!(error = %e, "cannot count the cluster's nodes"),
        }
        // Only a node that grows uses the count (after a long spell):
        // the others do not read it.
        let grows = cx.ipam.reconciler.grows(cx.s.grows_within);
        if let Some(ns) = growers.as_ref().filter(|_| grows) {
            match super::growers::count(&cx.client, ns).await {
                // Applied by the publisher ([`super::growers::Spell`]).
                Ok(n) => {
                    if let Ok(mut st) = cx.status.lock() {
                        st.account_growers = Some(n);
                    }
                }
                Err(e) => debug!(error = %e, "cannot count the nodes that grow"),
            }
        }
    }
}
