//! The pool of one node: assignments answered from the datastore, made
//! durable in the journal, and a reconciler that keeps the pool at its
//! targets through the cloud provider.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use providers::{
    AssignRequest, Assigned, Capabilities, CloudProvider, CreateInterface, Instance, ProviderError,
};
use rand::Rng;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::Settings;
use crate::datastore::{route_table, Datastore, IfaceEntry, Placement, PodKey, Slot};
use crate::journal::{self, Journal, JournalError, Record, Replayed};
use crate::netns::{NetnsRef, Verdict};
use crate::policy::{self, Action, Blocked};

/// Journal records appended between two compactions.
const COMPACT_AFTER: u64 = 20_000;
/// How often the pool is compared with what the cloud reports.
const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// How often the reconciler looks at the pool when nothing wakes it.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// An unattached interface of ours younger than this may still be on its
/// way to being attached; older ones are leaked.
const LEAKED_MIN_AGE: Duration = Duration::from_secs(300);

/// `d` give or take a fifth, so nodes of one account do not call together.
fn jittered(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(ms * 4 / 5..=ms * 6 / 5 + 1))
}

/// How often pods' network namespaces are checked (when enabled).
const RECLAIM_EVERY: Duration = Duration::from_secs(10);
/// How long the reconciler lets wake-ups gather when no ADD is waiting.
const WAKE_DEBOUNCE: Duration = Duration::from_millis(20);

use providers::tags::{
    CLUSTER as TAG_CLUSTER, CREATED as TAG_CREATED, INSTANCE as TAG_INSTANCE, OWNER as TAG_OWNER,
    OWNER_VALUE, SUBNET_ROLE as TAG_SUBNET_ROLE,
};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no address available after waiting {}s: {reason}", waited.as_secs_f32())]
    Exhausted { waited: Duration, reason: String },
    #[error("could not record the assignment durably: {0}")]
    Journal(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the attachment was deleted (DEL) while its ADD was in flight; no address was kept")]
    Cancelled,
}

/// ADDs of one attachment in flight, and how many DELs came meanwhile.
#[derive(Debug, Default)]
struct InFlight {
    adds: u32,
    dels: u64,
    /// One of them answered with the address: a caller holds it, so another
    /// one's caller leaving does not release it.
    answered: bool,
}

/// One ADD's claim on its attachment: counts it in flight and waiting, and
/// when the ADD ends without answering (its future dropped because the
/// caller left), gives back what was assigned for it.
struct AddGuard<'a> {
    ipam: &'a Ipam,
    key: PodKey,
    /// DELs of this attachment seen when the ADD began.
    dels: u64,
    waiting: bool,
    /// Assigned for this ADD but not yet answered.
    pending: Option<Ipv4Addr>,
}

impl<'a> AddGuard<'a> {
    fn enter(ipam: &'a Ipam, key: &PodKey) -> Self {
        let mut st = ipam.lock();
        let f = st.inflight.entry(key.clone()).or_default();
        f.adds += 1;
        let dels = f.dels;
        Self {
            ipam,
            key: key.clone(),
            dels,
            waiting: false,
            pending: None,
        }
    }
}

impl Drop for AddGuard<'_> {
    fn drop(&mut self) {
        if self.waiting {
            self.ipam.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        let mut st = self.ipam.lock();
        let answered = st.inflight.get(&self.key).is_some_and(|f| f.answered);
        if let Some(f) = st.inflight.get_mut(&self.key) {
            f.adds -= 1;
            if f.adds == 0 {
                st.inflight.remove(&self.key);
            }
        }
        let Some(ip) = self.pending else { return };
        if answered || st.ds.lookup(&self.key).map(|p| p.ip) != Some(ip) {
            return;
        }
        warn!(pod = %self.key, %ip, "the caller of ADD went away before its answer; releasing the address");
        st.ds.release(&self.key, Instant::now());
        st.netns.remove(&self.key);
        // Queued behind the Assign; the next commit makes it durable.
        let _ = self.ipam.append(
            &mut st,
            vec![Record::Release {
                key: self.key.clone(),
                ip,
                at_ms: now_ms(),
            }],
        );
        drop(st);
        self.ipam.wake.notify_one();
    }
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

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cloud provider: {0}")]
    Provider(#[from] ProviderError),
    #[error("{0}")]
    Config(String),
}

/// What the reconciler last saw, for error messages and introspection.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub blocked: Option<Blocked>,
    pub last_error: Option<String>,
    pub last_error_kind: Option<&'static str>,
    pub consecutive_errors: u32,
    pub actions_done: u64,
    /// Assignments whose address the cloud's last answer lacked (held
    /// until seen again; see `State::unconfirmed`).
    pub unconfirmed_assignments: u64,
}

struct State {
    /// Interfaces whose node side is not set up yet.
    host_pending: BTreeSet<String>,
    snat_done: bool,
    ds: Datastore,
    /// Pods' network namespaces, for reclaiming addresses of pods that are
    /// gone without a DEL.
    netns: std::collections::HashMap<PodKey, NetnsRef>,
    last_reclaim: Instant,
    next_leak_gc: Instant,
    status: Status,
    pending_deletes: BTreeSet<String>,
    /// ADDs in flight per attachment (see [`Ipam::add_in`]).
    inflight: std::collections::HashMap<PodKey, InFlight>,
    /// Attached interfaces ipamd does not manage (see [`crate::ownership`]).
    foreign: BTreeMap<String, providers::Interface>,
    /// Interfaces no longer ipamd's that still hold pods' addresses: kept
    /// (draining, never deleted) until their last pod goes.
    frozen: BTreeSet<String>,
    /// Acknowledged assignments whose address the cloud's last answer
    /// lacked: held (in the journal too) until the address is seen again or
    /// the pod is deleted, never given to another pod on one answer. A key
    /// is never both here and in the datastore: a new assignment of it
    /// removes it here, and a restore moves it there.
    unconfirmed: BTreeMap<PodKey, Ipv4Addr>,
    appends_since_compact: u64,
    last_resync: Instant,
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

pub struct Ipam {
    provider: Arc<dyn CloudProvider>,
    settings: Settings,
    instance: Instance,
    caps: Capabilities,
    state: Mutex<State>,
    journal: Journal,
    wake: Notify,
    changed: watch::Sender<u64>,
    waiting: AtomicU32,
    /// Time spent answering AddNetwork / DelNetwork, transport excluded.
    pub add_latency: crate::latency::Recorder,
    pub del_latency: crate::latency::Recorder,
    /// The node's side of the datapath, when ipamd configures it.
    host: std::sync::OnceLock<crate::hostnet::HostNet>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Ipam {
    /// Replays the journal, reads the instance and its interfaces, restores
    /// every assignment, and compacts the journal.
    pub async fn start(
        provider: Arc<dyn CloudProvider>,
        settings: Settings,
        journal_path: &Path,
    ) -> Result<Arc<Self>, StartError> {
        let replayed = journal::replay(journal_path)?;
        if replayed.truncated > 0 {
            warn!(
                bytes = replayed.truncated,
                "cut a torn record off the end of the journal"
            );
        }
        let instance = provider.describe_instance().await?;
        let caps = provider.capabilities();
        if settings.pool.prefix_delegation && !(caps.prefixes && instance.limits.prefix_delegation)
        {
            return Err(StartError::Config(format!(
                "ENABLE_PREFIX_DELEGATION=true but instance type {} on {} does not support prefix delegation",
                instance.instance_type,
                provider.name()
            )));
        }
        let now = Instant::now();
        let mut ds = Datastore::new(settings.cooldown);
        let held: BTreeSet<Ipv4Addr> = replayed.assignments.values().copied().collect();
        let mut frozen = BTreeSet::new();
        let all = provider.describe_interfaces().await?;
        // A failure is logged; the next resync tries again.
        complete_half_made(&*provider, &instance.id, &all).await;
        let (pool, foreign) =
            crate::ownership::split(all, &instance.id, |i| holds_any(i, &held), &mut frozen);
        crate::ownership::log_new_foreign(&foreign, &BTreeMap::new());
        for i in pool {
            ds.add_interface(i, now);
        }
        for id in &frozen {
            ds.set_draining(id);
        }
        for id in &replayed.pending_deletes {
            ds.set_draining(id);
        }
        let mut status = Status::default();
        let mut unconfirmed = BTreeMap::new();
        for (key, ip) in &replayed.assignments {
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
        status.unconfirmed_assignments = unconfirmed.len() as u64;
        let restored = ds.assignments().count();
        let state = State {
            host_pending: BTreeSet::new(),
            snat_done: false,
            ds,
            netns: replayed
                .netns
                .iter()
                .map(|(k, n)| (k.clone(), n.clone()))
                .collect(),
            // The first pass looks at once: pods may have gone while ipamd
            // was down, their DEL never reaching it.
            last_reclaim: now.checked_sub(RECLAIM_EVERY).unwrap_or(now),
            next_leak_gc: now + jittered(settings.leaked_gc_interval),
            status,
            pending_deletes: replayed.pending_deletes.clone(),
            inflight: Default::default(),
            foreign,
            frozen,
            unconfirmed,
            appends_since_compact: 0,
            last_resync: now,
        };
        let snapshot = snapshot(&state, &settings, now);
        let journal = Journal::open(journal_path, snapshot)?;
        info!(
            instance = %instance.id,
            instance_type = %instance.instance_type,
            restored,
            replayed_records = replayed.records,
            "pool state restored"
        );
        Ok(Arc::new(Self {
            provider,
            settings,
            instance,
            caps,
            state: Mutex::new(state),
            journal,
            wake: Notify::new(),
            changed: watch::channel(0).0,
            waiting: AtomicU32::new(0),
            add_latency: Default::default(),
            del_latency: Default::default(),
            host: std::sync::OnceLock::new(),
        }))
    }

    /// Makes ipamd keep the node's side of the datapath: every interface is
    /// held back from assignments until its link, table and rule are set up.
    pub fn configure_host(&self, host: crate::hostnet::HostNet) {
        let mut st = self.lock();
        let ids: Vec<String> = st.ds.interfaces().map(|e| e.info.id.clone()).collect();
        for id in ids {
            st.ds.set_ready(&id, false);
            st.host_pending.insert(id);
        }
        st.snat_done = false;
        drop(st);
        self.host.set(host).ok();
    }

    fn snat_config(&self) -> crate::hostnet::SnatConfig {
        let mut no_snat = self.instance.vpc_cidrs.clone();
        no_snat.extend(self.settings.exclude_snat_cidrs.iter().copied());
        crate::hostnet::SnatConfig {
            external: self.settings.external_snat,
            node_ip: self.instance.primary_ip,
            no_snat,
            veth_prefix: self.settings.veth_prefix.clone(),
        }
    }

    /// Sets up what is pending on the node's side; what cannot be done yet
    /// (the link has not appeared) is tried again on the next step.
    async fn host_step(&self) {
        let Some(host) = self.host.get() else { return };
        let (pending, snat_done) = {
            let st = self.lock();
            let p: Vec<providers::Interface> = st
                .host_pending
                .iter()
                .filter_map(|id| st.ds.interface(id).map(|e| e.info.clone()))
                .collect();
            (p, st.snat_done)
        };
        let mut changed = false;
        for iface in pending {
            match host.setup_interface(&iface).await {
                Ok(()) => {
                    let mut st = self.lock();
                    st.ds.set_ready(&iface.id, true);
                    st.host_pending.remove(&iface.id);
                    changed = true;
                }
                Err(e @ crate::hostnet::HostError::NoLink { .. }) => {
                    debug!(error = %e, "waiting for the link")
                }
                Err(e) => {
                    warn!(interface = %iface.id, error = %e, "cannot set up the interface on the node");
                    self.lock().status.last_error =
                        Some(format!("node setup of {}: {e}", iface.id));
                }
            }
        }
        if !snat_done {
            let primary = self
                .lock()
                .ds
                .interfaces()
                .find(|e| e.info.device_index == 0)
                .map(|e| e.info.clone());
            if let Some(primary) = primary {
                match host.setup_snat(&self.snat_config(), &primary).await {
                    Ok(()) => self.lock().snat_done = true,
                    Err(e) => {
                        warn!(error = %e, "cannot set up SNAT");
                        self.lock().status.last_error = Some(format!("SNAT: {e}"));
                    }
                }
            }
        }
        if changed {
            self.publish();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("pool state lock poisoned")
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn publish(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
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

    /// Subscribes to pool changes (tests, readiness).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn wiring(&self, st: &State, p: &Placement) -> Wiring {
        let e = st.ds.interface(&p.interface_id);
        let (mac, device_index, subnet_cidr, gateway) = e.map_or_else(
            || {
                (
                    String::new(),
                    0,
                    ipnet::Ipv4Net::default(),
                    Ipv4Addr::UNSPECIFIED,
                )
            },
            |e: &IfaceEntry| {
                (
                    e.info.mac.clone(),
                    e.info.device_index,
                    e.info.subnet_cidr,
                    e.info.gateway(),
                )
            },
        );
        Wiring {
            ip: p.ip,
            interface_id: p.interface_id.clone(),
            mac,
            device_index,
            route_table: route_table(device_index),
            subnet_cidr,
            gateway,
        }
    }

    /// Queues records under the state lock so the journal's order is the
    /// state's order; compacts now and then.
    fn append(&self, st: &mut State, records: Vec<Record>) -> journal::Durable {
        if self.journal.needs_rewrite() {
            // After a failed write (a full disk) the file may end torn: the
            // state so far, this change included, goes out as a snapshot.
            st.appends_since_compact = 0;
            return self
                .journal
                .compact(snapshot(st, &self.settings, Instant::now()));
        }
        st.appends_since_compact += records.len() as u64;
        let durable = self.journal.append(records);
        if st.appends_since_compact >= COMPACT_AFTER {
            st.appends_since_compact = 0;
            let done = self
                .journal
                .compact(snapshot(st, &self.settings, Instant::now()));
            tokio::spawn(async move {
                if let Err(e) = done.wait().await {
                    error!(error = %e, "journal compaction failed");
                }
            });
        }
        durable
    }

    /// Gives the attachment an address, waiting (bounded) for the pool to
    /// grow if none is free. Answers only once the assignment is durable.
    pub async fn add(&self, key: PodKey) -> Result<Wiring, IpamError> {
        self.add_in(key, None).await
    }

    /// [`Ipam::add`] for a pod whose network namespace is `netns`.
    ///
    /// Operations on one attachment are ordered: a DEL that comes while
    /// this ADD waits cancels it ([`IpamError::Cancelled`]), and one that
    /// releases the address before this ADD answers makes it fail rather
    /// than hand out a released address. If the caller goes away (the
    /// future is dropped, as tonic does when the client resets the call),
    /// an address assigned for it is released again.
    pub async fn add_in(&self, key: PodKey, netns: Option<NetnsRef>) -> Result<Wiring, IpamError> {
        check_key(&key)?;
        let started = Instant::now();
        let deadline = started + self.settings.add_wait;
        let mut changes = self.changed.subscribe();
        let mut guard = AddGuard::enter(self, &key);
        let outcome = loop {
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
                            vec![Record::Assign {
                                key: key.clone(),
                                ip: p.ip,
                                netns: netns.as_ref().map(|n| n.path.clone()),
                                netns_id: netns
                                    .as_ref()
                                    .filter(|n| (n.dev, n.ino) != (0, 0))
                                    .map(|n| (n.dev, n.ino)),
                            }]
                        } else {
                            // Same answer as before; still wait until what
                            // was queued before us is on disk.
                            vec![]
                        };
                        Some((self.wiring(&st, &p), new, self.append(&mut st, record)))
                    }
                    None => None,
                }
            };
            if let Some((wiring, new, durable)) = attempt {
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
                debug!(pod = %key, "pool empty, waiting for it to grow");
            }
            self.wake.notify_one();
            if now >= deadline {
                break Err(IpamError::Exhausted {
                    waited: now - started,
                    reason: self.exhaustion_reason(),
                });
            }
            // Woken by pool changes; also look again now and then, since a
            // cooldown ending changes nothing the reconciler publishes.
            let nap = (deadline - now).min(Duration::from_millis(100));
            tokio::time::timeout(nap, changes.changed()).await.ok();
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
            match st.ds.release(&key, Instant::now()) {
                Some(p) => {
                    st.netns.remove(&key);
                    let w = self.wiring(&st, &p);
                    let d = self.append(
                        &mut st,
                        vec![Record::Release {
                            key: key.clone(),
                            ip: p.ip,
                            at_ms: now_ms(),
                        }],
                    );
                    (Some(w), d)
                }
                None => match st.unconfirmed.remove(&key) {
                    Some(ip) => {
                        st.netns.remove(&key);
                        let d = self.append(
                            &mut st,
                            vec![Record::Release {
                                key: key.clone(),
                                ip,
                                at_ms: now_ms(),
                            }],
                        );
                        (None, d)
                    }
                    None => (None, self.append(&mut st, vec![])),
                },
            }
        };
        durable.wait().await.map_err(IpamError::Journal)?;
        if found.is_some() {
            self.wake.notify_one();
        }
        Ok(found)
    }

    /// The attachment's address, without assigning one.
    pub fn lookup(&self, key: &PodKey) -> Option<Wiring> {
        let st = self.lock();
        st.ds.lookup(key).map(|p| self.wiring(&st, &p.clone()))
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
        valid: &std::collections::HashSet<(String, String)>,
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
    async fn reclaim_gone(&self) {
        let watched: Vec<(PodKey, NetnsRef)> = {
            let mut st = self.lock();
            st.last_reclaim = Instant::now();
            st.netns
                .iter()
                .map(|(k, n)| (k.clone(), n.clone()))
                .collect()
        };
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

    fn exhaustion_reason(&self) -> String {
        let st = self.lock();
        if let Some(b) = &st.status.blocked {
            return b.to_string();
        }
        if let Some(e) = &st.status.last_error {
            return format!("the pool cannot grow: {e}");
        }
        if st.ds.counts(Instant::now()).cooling > 0 {
            return "every address is in use or cooling down after a release".into();
        }
        "the pool is still growing (the cloud has not answered yet)".into()
    }

    /// The reconciler: runs until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::default();
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.step().await {
                Ok(0) => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                        _ = shutdown.changed() => return,
                    }
                    // Every ADD and DEL wakes us; under a burst, look once
                    // per debounce instead of once per call. An ADD that is
                    // waiting for an address is served at once.
                    if self.waiting.load(Ordering::SeqCst) == 0 {
                        tokio::select! {
                            _ = tokio::time::sleep(WAKE_DEBOUNCE) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
                Ok(_) => backoff.reset(),
                Err(e) => {
                    let delay = backoff.next(&e);
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "pool change failed");
                    {
                        let mut st = self.lock();
                        st.status.last_error = Some(e.to_string());
                        st.status.last_error_kind = Some(e.metric_label());
                        st.status.consecutive_errors += 1;
                    }
                    self.publish();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// One pass: finish pending deletes, resync now and then, plan, act.
    /// Returns how many actions were carried out.
    pub async fn step(&self) -> Result<usize, ProviderError> {
        if self.journal.needs_rewrite() {
            // Try to record again (the disk may have room now) without
            // waiting for the next ADD or DEL.
            let durable = {
                let mut st = self.lock();
                self.append(&mut st, vec![])
            };
            if let Err(e) = durable.wait().await {
                debug!(error = %e, "journal still cannot be written");
            }
        }
        self.host_step().await;
        let pending: Vec<String> = self.lock().pending_deletes.iter().cloned().collect();
        for id in &pending {
            self.finish_delete(id).await?;
        }
        let resync_due = self.lock().last_resync.elapsed() >= RESYNC_EVERY;
        if resync_due {
            self.resync().await?;
        }
        let gc_due = Instant::now() >= self.lock().next_leak_gc;
        if gc_due {
            self.lock().next_leak_gc = Instant::now() + jittered(self.settings.leaked_gc_interval);
            match self.provider.collect_leaked(LEAKED_MIN_AGE).await {
                Ok(gone) if !gone.is_empty() => {
                    info!(interfaces = ?gone, "leaked interfaces deleted")
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "leaked-interface collection failed"),
            }
        }
        let reclaim_due =
            self.settings.reclaim_gone_netns && self.lock().last_reclaim.elapsed() >= RECLAIM_EVERY;
        if reclaim_due {
            self.reclaim_gone().await;
        }
        let plan = {
            let mut st = self.lock();
            let now = Instant::now();
            // Interfaces ipamd does not manage still take attachment slots.
            let mut limits = self.instance.limits;
            limits.max_interfaces = limits
                .max_interfaces
                .saturating_sub((st.foreign.len() + st.frozen.len()) as u32);
            let view = st.ds.view(
                limits,
                self.caps.hot_attach,
                self.waiting.load(Ordering::SeqCst),
                now,
            );
            let plan = policy::plan(&view, &self.settings.pool, now);
            st.status.blocked = plan.blocked.clone();
            plan
        };
        let mut done = 0;
        for action in plan.actions {
            debug!(?action, "pool action");
            self.execute(action).await?;
            done += 1;
            let mut st = self.lock();
            st.status.actions_done += 1;
            st.status.last_error = None;
            st.status.last_error_kind = None;
            st.status.consecutive_errors = 0;
            drop(st);
            self.publish();
        }
        Ok(done)
    }

    /// Compares the pool with the cloud's view of the instance.
    pub async fn resync(&self) -> Result<(), ProviderError> {
        let all = self.provider.describe_interfaces().await?;
        if let Some(e) = complete_half_made(&*self.provider, &self.instance.id, &all).await {
            self.lock().status.last_error = Some(e);
        }
        {
            let mut st = self.lock();
            st.last_resync = Instant::now();
            let known: BTreeSet<String> = st.ds.interfaces().map(|e| e.info.id.clone()).collect();
            // One it managed until now (tagged no_manage since) is frozen
            // for the pods it holds.
            let (cloud, foreign) = crate::ownership::split(
                all,
                &self.instance.id,
                |i| known.contains(&i.id),
                &mut st.frozen,
            );
            crate::ownership::log_new_foreign(&foreign, &st.foreign);
            st.foreign = foreign;
            let vanished = st.ds.resync(&cloud, Instant::now());
            let frozen: Vec<String> = st.frozen.iter().cloned().collect();
            for id in frozen {
                let holds = st
                    .ds
                    .interface(&id)
                    .is_some_and(|e| e.addrs.values().any(|s| matches!(s, Slot::Assigned(_))));
                if holds {
                    st.ds.set_draining(&id);
                } else {
                    // Its last pod is gone: it is no longer ipamd's at all.
                    if let Some(e) = st.ds.interface(&id) {
                        let info = e.info.clone();
                        st.foreign.insert(id.clone(), info);
                    }
                    st.ds.remove_interface(&id);
                    st.frozen.remove(&id);
                }
            }
            // An address missing from one answer is not proof it is gone.
            for (key, ip) in vanished {
                warn!(pod = %key, %ip, "the cloud's answer lacks this pod's address; holding the assignment until it is seen again");
                st.unconfirmed.insert(key, ip);
            }
            confirm_seen(&mut st);
            if self.host.get().is_some() {
                // Interfaces found only now wait for their node side, and the
                // SNAT table is re-applied in case something removed it.
                for c in &cloud {
                    if !known.contains(&c.id) {
                        st.ds.set_ready(&c.id, false);
                        st.host_pending.insert(c.id.clone());
                    }
                }
                st.snat_done = false;
            }
            let pending: Vec<String> = st.pending_deletes.iter().cloned().collect();
            for id in pending {
                st.ds.set_draining(&id);
            }
            st.status.unconfirmed_assignments = st.unconfirmed.len() as u64;
        }
        self.publish();
        Ok(())
    }

    async fn execute(&self, action: Action) -> Result<(), ProviderError> {
        match action {
            Action::AssignIps {
                interface_id,
                count,
            } => self.grow(&interface_id, AssignRequest::Ips(count)).await,
            Action::AssignPrefixes {
                interface_id,
                count,
            } => {
                match self
                    .grow(&interface_id, AssignRequest::Prefixes(count))
                    .await
                {
                    Err(ProviderError::InsufficientCidrBlocks { subnet }) => {
                        warn!(%subnet, "no free /28 left in the subnet (fragmented); adding single addresses instead");
                        self.grow(&interface_id, AssignRequest::Ips(count)).await
                    }
                    other => other,
                }
            }
            Action::CreateInterface { initial } => self.create_interface(initial).await,
            Action::ReleaseIps { interface_id, ips } => {
                self.shrink(
                    &interface_id,
                    Assigned {
                        ips,
                        prefixes: vec![],
                    },
                )
                .await
            }
            Action::ReleasePrefixes {
                interface_id,
                prefixes,
            } => {
                self.shrink(
                    &interface_id,
                    Assigned {
                        ips: vec![],
                        prefixes,
                    },
                )
                .await
            }
            Action::DeleteInterface { interface_id } => self.delete_interface(&interface_id).await,
        }
    }

    async fn grow(&self, interface_id: &str, req: AssignRequest) -> Result<(), ProviderError> {
        let mut req = req;
        let got = loop {
            match self.provider.assign(interface_id, req).await {
                Ok(got) => break got,
                // A nearly full subnet: ask for what it may still give.
                Err(e @ ProviderError::SubnetExhausted { .. }) => match fewer(req) {
                    Some(less) => {
                        warn!(interface = interface_id, error = %e, asked = ?req, now = ?less, "subnet nearly full; asking for fewer addresses");
                        req = less;
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        };
        info!(
            interface = interface_id,
            ips = got.ips.len(),
            prefixes = got.prefixes.len(),
            "pool grew"
        );
        let mut st = self.lock();
        st.ds.add_addresses(interface_id, &got);
        // The cloud may give back an address a pod still holds unconfirmed.
        confirm_seen(&mut st);
        Ok(())
    }

    async fn shrink(&self, interface_id: &str, want: Assigned) -> Result<(), ProviderError> {
        let claimed = self
            .lock()
            .ds
            .claim_for_release(interface_id, &want, Instant::now());
        if claimed.ips.is_empty() && claimed.prefixes.is_empty() {
            return Ok(());
        }
        match self.provider.release(interface_id, &claimed).await {
            Ok(()) => {
                info!(
                    interface = interface_id,
                    ips = claimed.ips.len(),
                    prefixes = claimed.prefixes.len(),
                    "pool shrank"
                );
                self.lock().ds.forget(interface_id, &claimed);
                Ok(())
            }
            Err(e) => {
                self.lock().ds.unclaim(interface_id, &claimed);
                Err(e)
            }
        }
    }

    /// Subnets a new interface may go in: the node's own and same-zone ones
    /// tagged for the CNI, most free addresses first; a tag of "0" excludes.
    async fn candidate_subnets(&self) -> Vec<String> {
        match self.provider.list_subnets().await {
            Ok(subnets) => {
                let mut c: Vec<_> = subnets
                    .into_iter()
                    .filter(|s| match s.tags.get(TAG_SUBNET_ROLE) {
                        Some(v) => v != "0",
                        None => s.id == self.instance.subnet_id,
                    })
                    .collect();
                c.sort_by(|a, b| {
                    b.free_addresses
                        .cmp(&a.free_addresses)
                        .then(a.id.cmp(&b.id))
                });
                c.into_iter().map(|s| s.id).collect()
            }
            Err(e) => {
                warn!(error = %e, "cannot list subnets; using the node's subnet");
                vec![self.instance.subnet_id.clone()]
            }
        }
    }

    async fn create_interface(&self, initial: AssignRequest) -> Result<(), ProviderError> {
        let mut tags = BTreeMap::new();
        tags.insert(TAG_OWNER.to_string(), OWNER_VALUE.to_string());
        tags.insert(TAG_INSTANCE.to_string(), self.instance.id.clone());
        tags.insert(TAG_CLUSTER.to_string(), self.settings.cluster_name.clone());
        tags.insert(TAG_CREATED.to_string(), (now_ms() / 1000).to_string());
        let mut last = ProviderError::SubnetExhausted {
            subnet: self.instance.subnet_id.clone(),
        };
        for subnet_id in self.candidate_subnets().await {
            let mut spec = CreateInterface {
                subnet_id: subnet_id.clone(),
                // The node's groups, read by the provider as they are now.
                security_groups: vec![],
                tags: tags.clone(),
                initial,
            };
            let mut result = self.provider.create_interface(&spec).await;
            if let (Err(ProviderError::InsufficientCidrBlocks { .. }), AssignRequest::Prefixes(n)) =
                (&result, initial)
            {
                warn!(subnet = %subnet_id, "no free /28 for a new interface; creating it with single addresses");
                spec.initial = AssignRequest::Ips(n);
                result = self.provider.create_interface(&spec).await;
            }
            // A nearly full subnet: ask for what it may still give.
            while let Err(ProviderError::SubnetExhausted { .. }) = &result {
                let Some(less) = fewer(spec.initial) else {
                    break;
                };
                warn!(subnet = %subnet_id, asked = ?spec.initial, now = ?less, "subnet nearly full; creating the interface with fewer addresses");
                spec.initial = less;
                result = self.provider.create_interface(&spec).await;
            }
            match result {
                Ok(iface) => {
                    info!(interface = %iface.id, device_index = iface.device_index, subnet = %subnet_id, "interface attached");
                    {
                        let mut st = self.lock();
                        let id = iface.id.clone();
                        st.ds.add_interface(iface, Instant::now());
                        confirm_seen(&mut st);
                        if self.host.get().is_some() {
                            st.ds.set_ready(&id, false);
                            st.host_pending.insert(id);
                        }
                    }
                    self.host_step().await;
                    return Ok(());
                }
                Err(e @ ProviderError::SubnetExhausted { .. })
                | Err(e @ ProviderError::InsufficientCidrBlocks { .. }) => {
                    warn!(subnet = %subnet_id, error = %e, "subnet full, trying the next one");
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn delete_interface(&self, interface_id: &str) -> Result<(), ProviderError> {
        let durable = {
            let mut st = self.lock();
            if !st.ds.start_draining(interface_id, Instant::now()) {
                return Ok(()); // taken into use since the plan
            }
            st.pending_deletes.insert(interface_id.to_string());
            self.append(
                &mut st,
                vec![Record::PendingDelete {
                    interface_id: interface_id.to_string(),
                }],
            )
        };
        if durable.wait().await.is_err() {
            // Without the intent on disk a crash could leak the interface:
            // do not start.
            let mut st = self.lock();
            st.pending_deletes.remove(interface_id);
            st.ds.stop_draining(interface_id);
            return Err(ProviderError::Server(
                "journal write failed; interface delete not started".into(),
            ));
        }
        self.finish_delete(interface_id).await
    }

    async fn finish_delete(&self, interface_id: &str) -> Result<(), ProviderError> {
        let info = self
            .lock()
            .ds
            .interface(interface_id)
            .map(|e| e.info.clone());
        if let (Some(host), Some(info)) = (self.host.get(), info) {
            if let Err(e) = host.teardown_interface(&info).await {
                warn!(interface = interface_id, error = %e, "could not remove the interface's rule");
            }
        }
        self.provider.detach_interface(interface_id).await?;
        self.provider.delete_interface(interface_id).await?;
        let durable = {
            let mut st = self.lock();
            st.ds.remove_interface(interface_id);
            st.pending_deletes.remove(interface_id);
            self.append(
                &mut st,
                vec![Record::Deleted {
                    interface_id: interface_id.to_string(),
                }],
            )
        };
        if let Err(e) = durable.wait().await {
            // The interface is gone; replaying the intent later finds it
            // gone and records the end then.
            warn!(interface = interface_id, error = %e, "could not journal the finished delete");
        }
        info!(interface = interface_id, "interface detached and deleted");
        Ok(())
    }

    /// Pool figures and reconciler status, for introspection.
    pub fn summary(&self) -> serde_json::Value {
        let st = self.lock();
        let now = Instant::now();
        serde_json::json!({
            "instance": {
                "id": self.instance.id,
                "type": self.instance.instance_type,
                "zone": self.instance.zone,
                "primary_ip": self.instance.primary_ip,
                "max_interfaces": self.instance.limits.max_interfaces,
                "ipv4_per_interface": self.instance.limits.ipv4_per_interface,
            },
            "provider": self.provider.name(),
            "provider_api": self.provider.api_stats(),
            "counts": st.ds.counts(now),
            "waiting": self.waiting.load(Ordering::SeqCst),
            "pending_deletes": st.pending_deletes,
            "foreign_interfaces": st.foreign.keys().collect::<Vec<_>>(),
            "frozen_interfaces": st.frozen,
            "unconfirmed_assignments": st.unconfirmed.len(),
            "status": st.status,
            "config": self.settings,
        })
    }

    /// Interfaces with every address and its state, for introspection.
    pub fn interfaces(&self) -> serde_json::Value {
        let st = self.lock();
        let now = Instant::now();
        let list: Vec<serde_json::Value> = st
            .ds
            .interfaces()
            .map(|e| {
                let addrs: Vec<serde_json::Value> = e
                    .addrs
                    .iter()
                    .map(|(ip, s)| {
                        let (state, pod) = match s {
                            Slot::Free => ("free", None),
                            Slot::Assigned(k) => ("assigned", Some(k.to_string())),
                            Slot::Cooling { until } if *until > now => ("cooling", None),
                            Slot::Cooling { .. } => ("free", None),
                            Slot::Releasing => ("releasing", None),
                        };
                        serde_json::json!({"ip": ip, "state": state, "pod": pod})
                    })
                    .collect();
                serde_json::json!({
                    "id": e.info.id,
                    "mac": e.info.mac,
                    "device_index": e.info.device_index,
                    "route_table": route_table(e.info.device_index),
                    "subnet_id": e.info.subnet_id,
                    "subnet_cidr": e.info.subnet_cidr,
                    "primary_ip": e.info.primary_ip,
                    "draining": e.draining,
                    "prefixes": e.prefixes,
                    "addresses": addrs,
                })
            })
            .collect();
        serde_json::Value::Array(list)
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

/// Sets DeleteOnTermination on interfaces of ours that lack it (a create
/// cut short between its Attach and the flag, by a crash or by a rollback
/// that failed), so none outlives the instance. Returns the last failure;
/// the caller tries again at its next resync.
async fn complete_half_made(
    provider: &dyn CloudProvider,
    instance_id: &str,
    all: &[providers::Interface],
) -> Option<String> {
    let mut failed = None;
    let half_made = all.iter().filter(|i| {
        !i.is_primary()
            && i.delete_on_termination == Some(false)
            && crate::ownership::managed(i, instance_id)
    });
    for i in half_made {
        match provider.ensure_delete_on_termination(&i.id).await {
            Ok(()) => {
                info!(interface = %i.id, "set DeleteOnTermination on an interface whose create was cut short")
            }
            Err(e) => {
                warn!(interface = %i.id, error = %e, "interface would outlive the instance: cannot set DeleteOnTermination");
                failed = Some(format!("DeleteOnTermination of {}: {e}", i.id));
            }
        }
    }
    failed
}

/// Restores every unconfirmed assignment whose address the pool holds now
/// (seen again at a resync, or given back by an Assign or a Create), before
/// anything else can hand that address out: call under the same lock that
/// added the addresses.
fn confirm_seen(st: &mut State) {
    let pending: Vec<(PodKey, Ipv4Addr)> = st
        .unconfirmed
        .iter()
        .map(|(k, ip)| (k.clone(), *ip))
        .collect();
    for (key, ip) in pending {
        if st.ds.restore(&key, ip) {
            info!(pod = %key, %ip, "the pod's address is seen again; assignment confirmed");
            st.unconfirmed.remove(&key);
        }
    }
}

/// Half of a request for several single addresses (down to one), for a
/// subnet that cannot give them all; `None` when there is nothing smaller.
fn fewer(req: AssignRequest) -> Option<AssignRequest> {
    match req {
        AssignRequest::Ips(n) if n > 1 => Some(AssignRequest::Ips(n / 2)),
        _ => None,
    }
}

/// Whether `i` holds any of `ips`.
fn holds_any(i: &providers::Interface, ips: &BTreeSet<Ipv4Addr>) -> bool {
    i.secondary_ips.iter().any(|ip| ips.contains(ip))
        || i.prefixes
            .iter()
            .any(|p| ips.iter().any(|ip| p.contains(ip)))
}

/// The journal's view of the current state: what compaction writes.
fn snapshot(st: &State, settings: &Settings, now: Instant) -> Vec<Record> {
    let wall = now_ms();
    let released_at = st
        .ds
        .cooling(now)
        .into_iter()
        .map(|(ip, until)| {
            let left = until.saturating_duration_since(now);
            let age = settings.cooldown.saturating_sub(left);
            (ip, wall.saturating_sub(age.as_millis() as u64))
        })
        .collect();
    Replayed {
        netns: st
            .netns
            .iter()
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect(),
        assignments: st
            .ds
            .assignments()
            .map(|(k, p)| (k.clone(), p.ip))
            .chain(st.unconfirmed.iter().map(|(k, ip)| (k.clone(), *ip)))
            .collect(),
        released_at,
        pending_deletes: st.pending_deletes.clone(),
        records: 0,
        truncated: 0,
    }
    .to_records()
}

/// Jittered exponential backoff, longer for a full subnet.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn reset(&mut self) {
        self.failures = 0;
    }

    fn next(&mut self, e: &ProviderError) -> Duration {
        self.failures = (self.failures + 1).min(16);
        let (base, cap) = match e {
            ProviderError::SubnetExhausted { .. }
            | ProviderError::InsufficientCidrBlocks { .. } => {
                (Duration::from_secs(5), Duration::from_secs(60))
            }
            ProviderError::LimitExceeded(_) => (Duration::from_secs(5), Duration::from_secs(60)),
            _ => (Duration::from_millis(250), Duration::from_secs(30)),
        };
        let exp = base
            .saturating_mul(1 << (self.failures - 1).min(10))
            .min(cap);
        // Full jitter over the upper half keeps nodes of one account apart.
        let ms = exp.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
    }
}
