//! The pool: the datastore of addresses and who holds them, made durable
//! in the journal, and the ADD/DEL/GC path the CNI plugin calls.
//!
//! It knows no cloud and no netlink: the reconciler ([`crate::reconciler`])
//! feeds it interfaces and addresses through the methods under "for the
//! reconciler", and tests build it from a journal and a list of interfaces.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use providers::Interface;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::Settings;
use crate::datastore::{route_table, Datastore, Placement, PodKey, PodName};
use crate::explain::{Facts, GrowStatus};
use crate::journal::{self, Journal, JournalError, Record, Replayed};
use crate::netns::{NetnsRef, Verdict};

/// Journal records appended between two compactions.
const COMPACT_AFTER: u64 = 20_000;
/// Longest a waiting ADD sleeps between two looks at the pool when nothing
/// is published.
const MAX_NAP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// Worded after the messages operators search for (aws-node's "failed
    /// to assign an IP address to container", "not enough IPs available"),
    /// and pointing at `ipamctl explain`.
    #[error(
        "failed to assign an IP address to container: not enough IPs available after waiting {}s: {reason} (run `ipamctl explain NAMESPACE/POD` on the node for the data behind this)",
        waited.as_secs_f32()
    )]
    Exhausted { waited: Duration, reason: String },
    #[error("could not record the assignment durably: {0}")]
    Journal(#[source] JournalError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the attachment was deleted (DEL) while its ADD was in flight; no address was kept")]
    Cancelled,
}

/// Refuses an attachment key the plugin would have refused (see
/// [`ipamd_api::names`]): other clients of the socket get the same rules.
pub fn check_key(key: &PodKey) -> Result<(), IpamError> {
    let bad = ipamd_api::names::check_attachment(&key.network, &key.container_id, &key.ifname);
    if bad.is_empty() {
        return Ok(());
    }
    Err(IpamError::Invalid(
        bad.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    ))
}

/// Everything the CNI needs to wire a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wiring {
    pub ip: Ipv4Addr,
    pub interface_id: String,
    pub mac: String,
    pub device_index: u32,
    pub route_table: u32,
    pub subnet_cidr: ipnet::Ipv4Net,
    pub gateway: Ipv4Addr,
}

/// The pool's state, under one lock.
struct State {
    ds: Datastore,
    /// Pods' network namespaces, for reclaiming addresses of pods that are
    /// gone without a DEL.
    netns: HashMap<PodKey, NetnsRef>,
    /// The Kubernetes pod of each assignment whose ADD named one.
    pods: HashMap<PodKey, PodName>,
    /// Interfaces whose delete is journaled but not finished.
    pending_deletes: BTreeSet<String>,
    /// ADDs in flight per attachment (see [`Pool::add_in`]).
    inflight: HashMap<PodKey, InFlight>,
    /// Acknowledged assignments whose address the cloud's last answer
    /// lacked: held (in the journal too) until the address is seen again or
    /// the pod is deleted, never given to another pod on one answer. A key
    /// is never both here and in the datastore: a new assignment of it
    /// removes it here, and a restore moves it there.
    unconfirmed: BTreeMap<PodKey, Ipv4Addr>,
    appends_since_compact: u64,
}

/// What [`Pool::restore`] starts from.
pub struct Restore {
    pub replayed: Replayed,
    /// The interfaces the pool manages, as the cloud describes them now.
    pub interfaces: Vec<Interface>,
    /// Of those, the ones that take no new assignments (frozen).
    pub draining: BTreeSet<String>,
}

/// Where the journal is kept.
pub enum JournalAt<'a> {
    File(&'a std::path::Path),
    Memory(journal::MemStore),
}

/// The window over which the pods' arrival and departure rates are
/// measured.
pub const ARRIVAL_WINDOW: Duration = Duration::from_secs(300);

/// Drops the times (arrivals, departures) older than [`ARRIVAL_WINDOW`]
/// as of `now`.
fn forget_before(a: &mut std::collections::VecDeque<Instant>, now: Instant) {
    while a
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) > ARRIVAL_WINDOW)
    {
        a.pop_front();
    }
}

/// See the module documentation.
pub struct Pool {
    settings: Settings,
    state: Mutex<State>,
    journal: Journal,
    /// Wakes the reconciler (an ADD waits, an address was used or freed).
    wake: Notify,
    changed: watch::Sender<u64>,
    /// Wakes waiting ADDs when the pool changed. A `Notify` rather than a
    /// receiver of `changed` each: tokio's watch channel wakes its
    /// receivers in a random order, so which waiting ADD took a freed
    /// address varied, and a seeded simulation did not run the same twice.
    add_waiters: Notify,
    waiting: AtomicU32,
    /// What the reconciler last said about growing the pool.
    grow: Mutex<GrowStatus>,
    /// When the ADDs of the last [`ARRIVAL_WINDOW`] came (the adaptive
    /// warm target's arrival rate).
    arrivals: Mutex<std::collections::VecDeque<Instant>>,
    /// When the DELs that released an address in the last
    /// [`ARRIVAL_WINDOW`] came (the adaptive target's departure rate).
    departures: Mutex<std::collections::VecDeque<Instant>>,
    /// Whether an ADD has ever come (the adaptive target's prior holds
    /// until then), and when the pool was made.
    arrived: std::sync::atomic::AtomicBool,
    born: Instant,
    /// Time spent answering AddNetwork / DelNetwork, transport excluded.
    pub add_latency: crate::latency::Recorder,
    pub del_latency: crate::latency::Recorder,
    /// Counters and histograms of calls, for `/metrics`.
    pub events: crate::metrics::Events,
}

mod feed;
mod inflight;
mod journaling;

use inflight::{AddGuard, InFlight};
use journaling::snapshot;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A read-only look at the pool, for introspection and readiness.
pub struct PoolRead<'a> {
    pub ds: &'a Datastore,
    pub unconfirmed: &'a BTreeMap<PodKey, Ipv4Addr>,
    pub pending_deletes: &'a BTreeSet<String>,
    pub waiting: u32,
    /// The Kubernetes pod of each assignment whose ADD named one.
    pub pods: &'a HashMap<PodKey, PodName>,
}

impl Pool {
    /// Restores every assignment of `from.replayed` onto `from.interfaces`
    /// (those whose address the interfaces lack are held unconfirmed), and
    /// opens the journal at `at`, compacted to the restored state.
    pub fn restore(
        settings: Settings,
        from: Restore,
        at: JournalAt<'_>,
    ) -> Result<Self, JournalError> {
        let Restore {
            replayed,
            interfaces,
            draining,
        } = from;
        let now = Instant::now();
        let mut ds = Datastore::new(settings.cooldown);
        // An interface's own address is never a pod's (a damaged or
        // imported journal could say so): such an assignment is dropped,
        // never held, so no DEL can take that address's rules.
        let primaries: HashSet<Ipv4Addr> = interfaces.iter().map(|i| i.primary_ip).collect();
        for i in interfaces {
            ds.add_interface(i, now);
        }
        for id in draining.iter().chain(&replayed.pending_deletes) {
            ds.set_draining(id);
        }
        let mut unconfirmed = BTreeMap::new();
        for (key, ip) in &replayed.assignments {
            if primaries.contains(ip) {
                error!(pod = %key, %ip, "the journal gives a pod an interface's own address; dropping that assignment");
                continue;
            }
            if !ds.restore(key, *ip) {
                // One Describe answer is not proof (EC2's are eventually
                // consistent): the address stays the pod's until seen again.
                warn!(pod = %key, %ip, "the cloud's answer lacks this pod's address; holding the assignment until it is seen again");
                unconfirmed.insert(key.clone(), *ip);
            }
        }
        let wall = now_ms();
        for (ip, at) in &replayed.released_at {
            let age = Duration::from_millis(wall.saturating_sub(*at));
            if age < settings.cooldown {
                ds.restore_cooling(*ip, now + (settings.cooldown - age));
            }
        }
        let state = State {
            ds,
            netns: replayed.netns.clone().into_iter().collect(),
            pods: replayed.pods.clone().into_iter().collect(),
            pending_deletes: replayed.pending_deletes.clone(),
            inflight: HashMap::new(),
            unconfirmed,
            appends_since_compact: 0,
        };
        let snapshot = snapshot(&state, &settings, now);
        let journal = match at {
            JournalAt::File(path) => Journal::open(path, snapshot)?,
            JournalAt::Memory(store) => Journal::in_memory(store, snapshot),
        };
        info!(
            restored = state.ds.assignments().count(),
            unconfirmed = state.unconfirmed.len(),
            replayed_records = replayed.records,
            "pool state restored"
        );
        Ok(Self {
            settings,
            state: Mutex::new(state),
            journal,
            wake: Notify::new(),
            changed: watch::channel(0).0,
            add_waiters: Notify::new(),
            waiting: AtomicU32::new(0),
            grow: Mutex::new(GrowStatus::default()),
            arrivals: Mutex::default(),
            departures: Mutex::default(),
            arrived: std::sync::atomic::AtomicBool::new(false),
            born: Instant::now(),
            add_latency: Default::default(),
            del_latency: Default::default(),
            events: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pool state lock poisoned")
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Tells watchers (waiting ADDs, tests) that the pool changed.
    pub fn publish(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
        self.add_waiters.notify_waiters();
    }

    /// Subscribes to pool changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Resolves when an ADD, DEL or release wants the reconciler to look.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Wakes the reconciler (something it plans on changed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The journal's length in bytes as last written.
    pub fn journal_size_bytes(&self) -> u64 {
        self.journal.size_bytes()
    }

    /// The journal's write-and-sync durations (see [`Journal::sync_seconds`]).
    pub fn journal_sync_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.journal.sync_seconds()
    }

    /// Whether any ADD has come since the pool was made.
    pub fn any_arrival(&self) -> bool {
        self.arrived.load(Ordering::Relaxed)
    }

    /// ADDs a second over the last [`ARRIVAL_WINDOW`] (or since the pool
    /// was made, when that is shorter), as of `now`; kept only under
    /// `ADAPTIVE_WARM_TARGET`.
    pub fn arrival_rate(&self, now: Instant) -> f64 {
        self.rate_of(&self.arrivals, now)
    }

    /// DELs that released an address, a second, over the same window as
    /// [`Pool::arrival_rate`].
    pub fn departure_rate(&self, now: Instant) -> f64 {
        self.rate_of(&self.departures, now)
    }

    fn rate_of(&self, times: &Mutex<std::collections::VecDeque<Instant>>, now: Instant) -> f64 {
        let mut a = times.lock().expect("rate lock");
        forget_before(&mut a, now);
        let window = now
            .saturating_duration_since(self.born)
            .clamp(Duration::from_secs(1), ARRIVAL_WINDOW);
        a.len() as f64 / window.as_secs_f64()
    }

    fn note_arrival(&self, at: Instant) {
        if !self.settings.pool.adaptive {
            return;
        }
        self.arrived.store(true, Ordering::Relaxed);
        Self::note(&self.arrivals, at);
    }

    fn note(times: &Mutex<std::collections::VecDeque<Instant>>, at: Instant) {
        let mut a = times.lock().expect("rate lock");
        forget_before(&mut a, at);
        a.push_back(at);
    }

    /// ADDs waiting for an address now.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Liveness: `Err` with the reason while ipamd cannot record
    /// assignments (every ADD and DEL would fail). It recovers by itself
    /// once a write succeeds again (the next call rewrites the journal).
    pub fn health(&self) -> Result<(), String> {
        if self.journal.needs_rewrite() {
            return Err(format!(
                "journal {} cannot be written (disk full?); ADD and DEL fail until a write succeeds",
                self.journal.path().display()
            ));
        }
        Ok(())
    }

    /// Test hook: see [`Journal::fail_next_writes`].
    #[doc(hidden)]
    pub fn fail_next_journal_writes(&self, n: u32) {
        self.journal.fail_next_writes(n);
    }

    /// A read-only look at the pool under its lock.
    pub fn read<R>(&self, f: impl FnOnce(&PoolRead<'_>) -> R) -> R {
        let st = self.lock();
        f(&PoolRead {
            ds: &st.ds,
            unconfirmed: &st.unconfirmed,
            pending_deletes: &st.pending_deletes,
            waiting: self.waiting(),
            pods: &st.pods,
        })
    }

    fn wiring(st: &State, p: &Placement) -> Wiring {
        let e = st.ds.interface(&p.interface_id);
        Wiring {
            ip: p.ip,
            interface_id: p.interface_id.clone(),
            mac: e.map(|e| e.info.mac.clone()).unwrap_or_default(),
            device_index: e.map_or(0, |e| e.info.device_index),
            route_table: route_table(e.map_or(0, |e| e.info.device_index)),
            subnet_cidr: e.map(|e| e.info.subnet_cidr).unwrap_or_default(),
            gateway: e.map_or(Ipv4Addr::UNSPECIFIED, |e| e.info.gateway()),
        }
    }

    /// Gives the attachment an address, waiting (bounded) for the pool to
    /// grow if none is free. Answers only once the assignment is durable.
    pub async fn add(&self, key: PodKey) -> Result<Wiring, IpamError> {
        self.add_in(key, None, None).await
    }

    /// [`Pool::add`] for a pod whose network namespace is `netns`.
    ///
    /// Operations on one attachment are ordered: a DEL that comes while
    /// this ADD waits cancels it ([`IpamError::Cancelled`]), and one that
    /// releases the address before this ADD answers makes it fail rather
    /// than hand out a released address. If the caller goes away (the
    /// future is dropped, as tonic does when the client resets the call),
    /// an address assigned for it is released again.
    pub async fn add_in(
        &self,
        key: PodKey,
        netns: Option<NetnsRef>,
        pod: Option<PodName>,
    ) -> Result<Wiring, IpamError> {
        check_key(&key)?;
        let started = Instant::now();
        self.note_arrival(started);
        let deadline = started + self.settings.add_wait;
        let mut guard = AddGuard::enter(self, &key);
        let outcome = loop {
            // Listening before the pool is looked at: a change published
            // meanwhile still wakes us.
            let changed = self.add_waiters.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let attempt = {
                let mut st = self.lock();
                if st.inflight.get(&key).map(|f| f.dels) != Some(guard.dels) {
                    break Err(IpamError::Cancelled);
                }
                match st.ds.assign(&key, now) {
                    Some((p, new)) => {
                        let record = if new {
                            guard.pending = Some(p.ip);
                            // Supersedes an assignment held unconfirmed.
                            st.unconfirmed.remove(&key);
                            if let Some(n) = &netns {
                                st.netns.insert(key.clone(), n.clone());
                            }
                            if let Some(p) = &pod {
                                st.pods.insert(key.clone(), p.clone());
                            }
                            vec![Record::Assign {
                                key: key.clone(),
                                ip: p.ip,
                                netns: netns.as_ref().map(|n| n.path.clone()),
                                netns_id: netns
                                    .as_ref()
                                    .filter(|n| (n.dev, n.ino) != (0, 0))
                                    .map(|n| (n.dev, n.ino)),
                                pod: pod.clone(),
                            }]
                        } else {
                            // Same answer as before; still wait until what
                            // was queued before us is on disk.
                            vec![]
                        };
                        Some((Self::wiring(&st, &p), new, self.append(&mut st, record)))
                    }
                    None => None,
                }
            };
            if let Some((wiring, new, durable)) = attempt {
                // It has its address: no longer demand the pool must grow
                // for while its journal record is written (a burst counted
                // twice overshot the targets).
                if guard.waiting {
                    guard.waiting = false;
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                }
                let failure = match durable.wait().await {
                    Ok(()) => {
                        // A DEL may have released it while we waited.
                        let mut st = self.lock();
                        guard.pending = None;
                        if st.ds.lookup(&key).map(|p| p.ip) != Some(wiring.ip) {
                            break Err(IpamError::Cancelled);
                        }
                        if let Some(f) = st.inflight.get_mut(&key) {
                            f.answered = true;
                        }
                        break Ok(wiring);
                    }
                    Err(e) => e,
                };
                if new {
                    let mut st = self.lock();
                    st.ds.unassign(&key);
                    st.netns.remove(&key);
                    st.pods.remove(&key);
                    guard.pending = None;
                    // A snapshot written meanwhile may hold the assignment:
                    // say it is gone (a snapshot itself while still broken).
                    let _ = self.append(
                        &mut st,
                        vec![Record::Release {
                            key: key.clone(),
                            ip: wiring.ip,
                            at_ms: now_ms(),
                        }],
                    );
                }
                break Err(IpamError::Journal(failure));
            }
            if !guard.waiting {
                guard.waiting = true;
                self.waiting.fetch_add(1, Ordering::SeqCst);
                self.events.add_waits.inc();
                debug!(pod = %key, "pool empty, waiting for it to grow");
            }
            self.wake.notify_one();
            if now >= deadline {
                self.events.no_available.inc();
                break Err(IpamError::Exhausted {
                    waited: now - started,
                    reason: self.exhaustion_reason(),
                });
            }
            // Woken by pool changes (the reconciler's, a release), and at
            // the end of the next cooldown, which nobody publishes; a
            // second at most, in case a change goes unpublished.
            let next_free = self.lock().ds.next_cooldown_expiry(now);
            let until = next_free.map_or(deadline, |t| t.min(deadline));
            let nap = until
                .saturating_duration_since(now)
                .clamp(Duration::from_millis(1), MAX_NAP);
            tokio::time::timeout(nap, changed).await.ok();
        };
        drop(guard);
        // Using an address may take the pool below its warm target.
        self.wake.notify_one();
        outcome
    }

    /// Releases the attachment's address. Unknown attachments are not an
    /// error: DEL must be idempotent.
    pub async fn del(&self, key: PodKey) -> Result<Option<Wiring>, IpamError> {
        let (found, durable) = {
            let mut st = self.lock();
            // An ADD of this attachment still in flight is cancelled.
            let cancelled = st.inflight.get_mut(&key).map(|f| f.dels += 1).is_some();
            if cancelled {
                info!(pod = %key, "DEL while its ADD is in flight: the ADD is cancelled");
                self.publish();
            }
            let released = match st.ds.release(&key, Instant::now()) {
                Some(p) => Some((Some(Self::wiring(&st, &p)), p.ip)),
                None => st.unconfirmed.remove(&key).map(|ip| (None, ip)),
            };
            match released {
                Some((w, ip)) => {
                    st.netns.remove(&key);
                    st.pods.remove(&key);
                    let d = self.append(
                        &mut st,
                        vec![Record::Release {
                            key: key.clone(),
                            ip,
                            at_ms: now_ms(),
                        }],
                    );
                    (w, d)
                }
                None => (None, self.append(&mut st, vec![])),
            }
        };
        durable.wait().await.map_err(IpamError::Journal)?;
        if found.is_some() {
            if self.settings.pool.adaptive {
                Self::note(&self.departures, Instant::now());
            }
            self.wake.notify_one();
            // A waiting ADD may take it (after its cooldown).
            self.publish();
        }
        Ok(found)
    }

    /// The attachment's address, without assigning one.
    pub fn lookup(&self, key: &PodKey) -> Option<Wiring> {
        let st = self.lock();
        st.ds.lookup(key).map(|p| Self::wiring(&st, &p.clone()))
    }

    /// The attachment that holds `ip` now, if any.
    pub fn holder_of(&self, ip: Ipv4Addr) -> Option<PodKey> {
        let st = self.lock();
        let holder = st
            .ds
            .assignments()
            .find(|(_, p)| p.ip == ip)
            .map(|(k, _)| k.clone());
        holder.or_else(|| {
            st.unconfirmed
                .iter()
                .find(|(_, held)| **held == ip)
                .map(|(k, _)| k.clone())
        })
    }

    /// Releases every attachment of `network` not in `valid` (CNI GC):
    /// `valid` must be the runtime's complete list of valid attachments.
    pub async fn gc(
        &self,
        network: &str,
        valid: &HashSet<(String, String)>,
    ) -> Result<Vec<(PodKey, Wiring)>, IpamError> {
        let stale: Vec<PodKey> = {
            let st = self.lock();
            st.ds
                .assignments()
                .map(|(k, _)| k)
                .chain(st.unconfirmed.keys())
                .filter(|k| {
                    k.network == network
                        && !valid.contains(&(k.container_id.clone(), k.ifname.clone()))
                })
                .cloned()
                .collect()
        };
        let mut released = vec![];
        for key in stale {
            info!(pod = %key, "garbage-collecting an attachment the runtime no longer has");
            if let Some(w) = self.del(key.clone()).await? {
                released.push((key, w));
            }
        }
        Ok(released)
    }

    /// Releases addresses of pods whose network namespace is gone (judged
    /// by its identity, see [`crate::netns`]): the DEL never reached us
    /// (ipamd was down) and the runtime has moved on.
    pub async fn reclaim_gone(&self) {
        let watched: Vec<(PodKey, NetnsRef)> = self
            .lock()
            .netns
            .iter()
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect();
        // stat(2) outside the lock: a hung mount must not stall ADDs.
        let gone: Vec<(PodKey, NetnsRef)> = watched
            .into_iter()
            .filter(|(_, n)| n.judge() == Verdict::Gone)
            .collect();
        for (key, ns) in gone {
            // Only if it is still the same assignment we looked at.
            if self.lock().netns.get(&key) != Some(&ns) {
                continue;
            }
            warn!(pod = %key, netns = %ns.path, "pod network namespace is gone without a DEL; releasing its address");
            if let Err(e) = self.del(key).await {
                error!(error = %e, "could not release the address of a gone pod");
            }
        }
    }

    /// Records what the reconciler last said about growing the pool, for
    /// the message of an ADD that waited in vain and for explain.
    pub fn set_grow_status(&self, status: GrowStatus) {
        *self.grow.lock().expect("lock") = status;
    }

    /// The facts an explanation rests on, readiness aside (see
    /// [`crate::explain`]).
    pub fn facts(&self) -> Facts {
        let now = Instant::now();
        let grow = self.grow.lock().expect("lock").clone();
        let (c, next) = {
            let st = self.lock();
            (st.ds.counts(now), st.ds.next_cooldown_expiry(now))
        };
        let in_s = |t: Instant| t.saturating_duration_since(now).as_secs_f64();
        Facts {
            interfaces: c.interfaces,
            total: c.total,
            max_interfaces: grow.capacity.map(|c| c.0),
            per_interface: grow.capacity.map(|c| c.1),
            max_pods: self.settings.pool.max_pods,
            assigned: c.assigned,
            cooling: c.cooling,
            assignable: c.assignable,
            free_not_ready: c.available - c.assignable,
            next_free_in_s: next.map(in_s),
            cooldown_s: self.settings.cooldown.as_secs(),
            add_wait_s: self.settings.add_wait.as_secs(),
            waiting: self.waiting(),
            blocked: grow.blocked,
            last_error: grow.last_error,
            last_error_kind: grow.last_error_kind,
            retry_in_s: grow.retry_at.map(in_s),
            not_ready_because: vec![],
        }
    }

    /// Why an ADD finds no address now (see [`crate::explain`]): assigned
    /// and cooling addresses counted apart, and when the next is free,
    /// which an ADD waits for when that falls within its wait
    /// (IPAMD_ADD_WAIT_SECONDS).
    pub fn exhaustion_reason(&self) -> String {
        crate::explain::exhausted_reason(&self.facts())
    }

    /// Every assignment: pod key -> address.
    pub fn assignments(&self) -> Vec<(PodKey, Ipv4Addr)> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .ds
            .assignments()
            .map(|(k, p)| (k.clone(), p.ip))
            .collect();
        v.sort();
        v
    }
}
