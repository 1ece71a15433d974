//! The pods on this node: an address whose pod has left the API (or
//! finished) without its DEL reaching ipamd is released after a grace
//! period.
//!
//! The judgement is made only on a pod watch that has been in sync for the
//! whole grace period: a watch that failed (API server down, 410 Gone and a
//! re-list) may miss pods created meanwhile, and their addresses must not be
//! taken from under them. A watch can also be silently stale (its
//! connection cut and the client still retrying), so before an address is
//! released the API server is asked for the pod itself: only a 404, a
//! finished pod or a pod on another node confirms it.

/// Longest the confirming GET may take; no answer keeps the address.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{KubeSettings, KubeStatus};
use crate::datastore::PodName;
use crate::ipam::Ipam;

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// How often held addresses are compared with the pods on the node.
const CHECK_EVERY: Duration = Duration::from_secs(2);

fn finished(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// Decides which pods are gone for good. Pure: the caller gives what the
/// pool holds, what the API shows and the time.
#[derive(Debug, Default)]
pub struct GoneTracker {
    missing_since: HashMap<PodName, Instant>,
}

impl GoneTracker {
    /// The pods among `held` that have been missing from the API for
    /// `grace`, while the watch was in sync (since `in_sync_since`) for at
    /// least as long. A pod seen again starts over.
    pub fn judge(
        &mut self,
        held: &HashSet<PodName>,
        present: impl Fn(&PodName) -> bool,
        in_sync_since: Option<Instant>,
        grace: Duration,
        now: Instant,
    ) -> Vec<PodName> {
        self.missing_since.retain(|p, _| held.contains(p));
        let Some(synced) = in_sync_since else {
            // Nothing can be judged on a watch that is not in sync; the
            // clock starts again once it is.
            self.missing_since.clear();
            return vec![];
        };
        let mut gone = vec![];
        for p in held {
            if present(p) {
                self.missing_since.remove(p);
                continue;
            }
            let since = *self.missing_since.entry(p.clone()).or_insert(now);
            let missing = now.duration_since(since);
            if missing >= grace && now.duration_since(synced) >= grace {
                gone.push(p.clone());
            }
        }
        gone.sort();
        gone
    }

    pub fn forget(&mut self, p: &PodName) {
        self.missing_since.remove(p);
    }
}

/// What the cache keeps of a pod: its name and phase.
fn strip(p: &mut Pod) {
    let m = &mut p.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
    m.owner_references = None;
    p.spec = None;
    p.status = p.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..Default::default()
    });
}

pub(super) struct PodTask {
    client: Client,
    ipam: Arc<Ipam>,
    s: KubeSettings,
    status: Arc<Mutex<KubeStatus>>,
}

impl PodTask {
    pub(super) fn new(cx: super::Ctx) -> Self {
        let super::Ctx {
            client,
            ipam,
            s,
            status,
        } = cx;
        Self {
            client,
            ipam,
            s,
            status,
        }
    }

    /// Whether the API server itself says `pod` is gone from this node.
    async fn confirm_gone(&self, pod: &PodName) -> bool {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        match tokio::time::timeout(CONFIRM_TIMEOUT, api.get_opt(&pod.name)).await {
            Ok(Ok(None)) => true,
            Ok(Ok(Some(p))) => {
                let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                let gone = finished(&p) || node != Some(self.s.node_name.as_str());
                if !gone {
                    warn!(%pod, "the pod watch missed a pod that is on this node (a stale watch); its address is kept");
                }
                gone
            }
            Ok(Err(e)) => {
                warn!(%pod, error = %super::describe(&e), "cannot confirm that a pod is gone; its address is kept for now");
                false
            }
            Err(_) => {
                warn!(%pod, "the API server did not answer whether a pod is gone; its address is kept for now");
                false
            }
        }
    }

    pub(super) async fn run(self, mut stop: watch::Receiver<bool>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let (reader, writer) = reflector::store::<Pod>();
        // Small pages: a list is parsed into whole Pod objects before the
        // cache strips them, and the allocator keeps its peak (500, kube's
        // default, cost ipamd ~10 MiB of RSS on a 250-pod node).
        let cfg = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", self.s.node_name))
            .page_size(50);
        let stream = reflector::reflector(writer, watcher(api, cfg).modify(strip));
        let mut stream = Box::pin(stream);
        let mut tracker = GoneTracker::default();
        // Since when the cache has been trusted: from the first full list;
        // every watch error starts the clock again (a watch that resumes
        // from its resource version after an error misses nothing, and
        // says nothing when it has resumed; one that cannot resume lists
        // again).
        let mut in_sync_since: Option<Instant> = None;
        let mut listed = false;
        let mut backoff = super::WatchBackoff::default();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                ev = stream.next(), if backoff.ready() => {
                    match ev {
                        Some(Ok(watcher::Event::InitDone)) => {
                            backoff.progressed();
                            listed = true;
                            in_sync_since.get_or_insert_with(Instant::now);
                        }
                        Some(Ok(watcher::Event::Init)) => {}
                        Some(Ok(_)) => backoff.progressed(),
                        Some(Err(e)) => {
                            backoff.failed();
                            self.status.lock().expect("lock").watch_failures += 1;
                            warn!(error = %e, grace_s = self.s.pod_gone_grace.as_secs(), "pod watch failed; gone pods are judged again once it has held for the grace");
                            in_sync_since = listed.then(Instant::now);
                            self.status.lock().expect("lock").last_error = Some(format!("pod watch: {e}"));
                        }
                        None => return,
                    }
                    continue;
                }
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            {
                let mut st = self.status.lock().expect("lock");
                st.pods_in_sync = in_sync_since.is_some();
                st.pods_on_node = reader.len();
            }
            let held: Vec<(crate::datastore::PodKey, PodName)> = self
                .ipam
                .pool
                .read(|r| r.pods.iter().map(|(k, n)| (k.clone(), n.clone())).collect());
            let names: HashSet<PodName> = held.iter().map(|(_, n)| n.clone()).collect();
            let present = |p: &PodName| {
                reader
                    .get(&ObjectRef::new(&p.name).within(&p.namespace))
                    .is_some_and(|pod| !finished(&pod))
            };
            let gone = tracker.judge(
                &names,
                present,
                in_sync_since,
                self.s.pod_gone_grace,
                Instant::now(),
            );
            for pod in gone {
                tracker.forget(&pod);
                if !self.confirm_gone(&pod).await {
                    continue;
                }
                for (key, _) in held.iter().filter(|(_, n)| *n == pod) {
                    warn!(%pod, attachment = %key, grace_s = self.s.pod_gone_grace.as_secs(), "pod is gone from the API (or finished) without a DEL; releasing its address");
                    match self.ipam.del(key.clone()).await {
                        Ok(Some(_)) => {
                            self.status.lock().expect("lock").released_gone_pods += 1;
                            info!(%pod, "address of a gone pod released");
                        }
                        Ok(None) => {}
                        Err(e) => {
                            error!(%pod, error = %e, "could not release the address of a gone pod")
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(n: &str) -> PodName {
        PodName {
            namespace: "default".into(),
            name: n.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_is_gone_after_the_grace_on_a_watch_in_sync_all_along() {
        let grace = Duration::from_secs(60);
        let mut t = GoneTracker::default();
        let held: HashSet<PodName> = [pod("a"), pod("b")].into();
        let synced = Instant::now();
        let only_a = |p: &PodName| p.name == "a";
        assert!(t
            .judge(&held, only_a, Some(synced), grace, Instant::now())
            .is_empty());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(t
            .judge(&held, only_a, Some(synced), grace, Instant::now())
            .is_empty());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            t.judge(&held, only_a, Some(synced), grace, Instant::now()),
            [pod("b")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_out_of_sync_or_a_pod_seen_again_starts_the_clock_over() {
        let grace = Duration::from_secs(60);
        let mut t = GoneTracker::default();
        let held: HashSet<PodName> = [pod("b")].into();
        let none = |_: &PodName| false;
        let synced = Instant::now();
        t.judge(&held, none, Some(synced), grace, Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        // The watch fails: nothing judged, and the clock is reset.
        assert!(t.judge(&held, none, None, grace, Instant::now()).is_empty());
        let resynced = Instant::now();
        tokio::time::advance(Duration::from_secs(40)).await;
        assert!(
            t.judge(&held, none, Some(resynced), grace, Instant::now())
                .is_empty(),
            "missing for 40 s only since the watch came back"
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        // Seen again just before the grace ends: starts over.
        assert!(t
            .judge(&held, |_| true, Some(resynced), grace, Instant::now())
            .is_empty());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(t
            .judge(&held, none, Some(resynced), grace, Instant::now())
            .is_empty());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            t.judge(&held, none, Some(resynced), grace, Instant::now()),
            [pod("b")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_in_sync_for_less_than_the_grace_judges_nothing() {
        let grace = Duration::from_secs(60);
        let mut t = GoneTracker::default();
        let held: HashSet<PodName> = [pod("b")].into();
        let none = |_: &PodName| false;
        tokio::time::advance(Duration::from_secs(100)).await;
        let synced = Instant::now();
        // Missing since before: still the watch must have been in sync
        // for the whole grace.
        t.judge(&held, none, Some(synced), grace, Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(t
            .judge(&held, none, Some(synced), grace, Instant::now())
            .is_empty());
    }
}
