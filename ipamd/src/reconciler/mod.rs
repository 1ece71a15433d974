//! The reconciler: keeps the pool at its targets through the cloud
//! provider. Each step finishes pending deletes, compares the pool with the
//! cloud now and then, asks the policy for a plan and carries it out, with
//! backoff after failures.
//!
//! It owns what it learned from the cloud that the pool does not need:
//! interfaces ipamd does not manage ([`crate::ownership`]), the reconciler's
//! status, and its timers. Tests drive it with a scripted provider.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

#[cfg(test)]
use providers::AssignRequest;
use providers::{Capabilities, CloudProvider, Instance, Interface, ProviderError};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::journal::JournalError;
use crate::node::NodeTracker;
use crate::policy::{self, Blocked};
use crate::pool::Pool;

mod actions;
#[cfg(test)]
use actions::fewer;

/// How often the pool is compared with what the cloud reports.
const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// The refill latency assumed before a grow was measured: about an
/// interface attach (EC2's attach takes seconds).
const FIRST_REFILL_SECS: f64 = 2.0;
/// The weight of the newest grow in the refill latency's moving average.
const REFILL_WEIGHT: f64 = 0.5;
/// Longest a resync waits for the cloud's Describe. The call layer retries
/// a throttled Describe for minutes (20 answers, delays up to 10 s); a
/// resync runs inside the step, so past this it gives up for now and the
/// pool goes on growing with what it knows (at 2,000 nodes the account's
/// Describe budget is spent, and ADDs waited behind resyncs).
const RESYNC_BUDGET: Duration = Duration::from_secs(5);
/// How often the reconciler looks at the pool when nothing wakes it.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// An unattached interface of ours younger than this may still be on its
/// way to being attached; older ones are leaked.
const LEAKED_MIN_AGE: Duration = Duration::from_secs(300);
/// How often pods' network namespaces are checked (when enabled).
const RECLAIM_EVERY: Duration = Duration::from_secs(10);
/// How long the reconciler lets wake-ups gather when no ADD is waiting.
const WAKE_DEBOUNCE: Duration = Duration::from_millis(20);

use providers::tags::{
    CLUSTER as TAG_CLUSTER, CREATED as TAG_CREATED, INSTANCE as TAG_INSTANCE, OWNER as TAG_OWNER,
    SUBNET_ROLE as TAG_SUBNET_ROLE,
};

/// `d` give or take a fifth, so nodes of one account do not call together.
pub(crate) fn jittered(d: Duration) -> Duration {
    providers::jitter::about(d)
}

/// Why a step failed: the cloud, or the journal (which is neither
/// reported nor backed off as a cloud error).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Cloud(#[from] ProviderError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl StepError {
    /// A low-cardinality label for metrics and `/v1/pool`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Cloud(e) => e.metric_label(),
            Self::Journal(_) => "journal",
        }
    }

    /// Where the failure counts: `journal` for the journal, else `site`.
    pub fn site(&self, site: &'static str) -> &'static str {
        match self {
            Self::Cloud(_) => site,
            Self::Journal(_) => "journal",
        }
    }
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
    /// until seen again).
    pub unconfirmed_assignments: u64,
    /// Pool actions carried out, by [`crate::policy::Action::kind`].
    pub actions_by_kind: BTreeMap<&'static str, u64>,
    /// Failures, by where they happened: an action's kind, `resync`,
    /// `node_setup`, `snat` or `journal`.
    pub errors_by_site: BTreeMap<&'static str, u64>,
    /// When the run loop tries again after `last_error`.
    #[serde(skip)]
    pub retry_at: Option<Instant>,
    /// Interfaces the pool may have and addresses each holds for pods, as
    /// the last plan saw them (MAX_ENI, unmanaged interfaces and prefix
    /// delegation counted).
    #[serde(skip)]
    pub capacity: Option<(u32, u32)>,
    /// The adaptive warm target the last plan used (ADAPTIVE_WARM_TARGET),
    /// from the pods' arrival rate and [`Status::refill_secs`].
    pub adaptive_warm: Option<u32>,
    /// Seconds a grow (assign, or create with addresses) took lately, the
    /// client-side bucket's wait included: a moving average.
    pub refill_secs: f64,
}

/// The reconciler's own state.
struct State {
    status: Status,
    /// Attached interfaces ipamd does not manage (see [`crate::ownership`]).
    foreign: BTreeMap<String, Interface>,
    /// Interfaces no longer ipamd's that still hold pods' addresses: kept
    /// (draining, never deleted) until their last pod goes.
    frozen: BTreeSet<String>,
    last_resync: Instant,
    /// The cloud may hold what the pool does not know (a call whose outcome
    /// is unknown, an interface fuller than the pool thought): resync at the
    /// next step instead of planning on stale counts.
    resync_now: bool,
    /// The last resync was cut short for an ADD that came to wait: the
    /// next one is not (ADDs that keep waiting, at the instance's limit,
    /// would otherwise put resyncs off for ever).
    resync_yielded: bool,
    /// This node's resync interval: [`RESYNC_EVERY`] give or take a fifth,
    /// so the nodes of an account do not describe together.
    resync_every: Duration,
    next_leak_gc: Instant,
    last_reclaim: Instant,
    /// Until when the subnet counts as nearly exhausted (the scaler's
    /// batch drops to 1) after the cloud said it could not give more.
    subnet_low_until: Option<Instant>,
    /// Seconds a grow took lately ([`Status::refill_secs`]).
    refill_secs: f64,
    /// When a plan last held a grow (made or put off), and whether one is
    /// being made (its call may wait long for its token): see
    /// [`Reconciler::grows`].
    grew_at: Option<Instant>,
    growing: bool,
    /// Subnets that said they cannot give more, until when they are not
    /// asked again for addresses on their interfaces.
    full_subnets: BTreeMap<String, Instant>,
    /// The subnets the last interface create found to choose from (with
    /// subnet discovery).
    listed_subnets: Vec<String>,
}

impl State {
    /// Whether `subnet` said it is full and its mark has not lapsed.
    fn marked_full(&self, subnet: &str, now: Instant) -> bool {
        self.full_subnets
            .get(subnet)
            .is_some_and(|until| now < *until)
    }
}

/// How long a subnet counts as nearly exhausted after the cloud said so.
const SUBNET_LOW_FOR: Duration = Duration::from_secs(300);

/// What [`Reconciler::new`] starts from.
pub struct Start {
    pub provider: Arc<dyn CloudProvider>,
    pub instance: Instance,
    pub caps: Capabilities,
    pub foreign: BTreeMap<String, Interface>,
    pub frozen: BTreeSet<String>,
    pub node: Arc<NodeTracker>,
}

/// See the module documentation.
pub struct Reconciler {
    pool: Arc<Pool>,
    provider: Arc<dyn CloudProvider>,
    instance: Instance,
    caps: Capabilities,
    settings: Settings,
    node: Arc<NodeTracker>,
    state: Mutex<State>,
    /// Interfaces are neither created nor deleted while set (a cordoned
    /// node, see [`Reconciler::hold_interfaces`]).
    interfaces_held: std::sync::atomic::AtomicBool,
    /// Custom networking: where new interfaces go (the node's ENIConfig),
    /// or why that is not known.
    target: Mutex<Result<InterfaceTarget, String>>,
}

/// Where new interfaces go under custom networking: an ENIConfig's subnet
/// and security groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterfaceTarget {
    /// The ENIConfig's name.
    pub eni_config: String,
    pub subnet_id: String,
    /// Empty: the node's own groups.
    pub security_groups: Vec<String>,
}

impl Reconciler {
    pub fn new(pool: Arc<Pool>, start: Start) -> Self {
        let now = Instant::now();
        let settings = pool.settings().clone();
        let r = Self {
            provider: start.provider,
            instance: start.instance,
            caps: start.caps,
            node: start.node,
            state: Mutex::new(State {
                status: Status::default(),
                foreign: start.foreign,
                frozen: start.frozen,
                last_resync: now,
                resync_now: false,
                resync_yielded: false,
                resync_every: jittered(RESYNC_EVERY),
                next_leak_gc: now + jittered(settings.leaked_gc_interval),
                // The first pass looks at once: pods may have gone while
                // ipamd was down, their DEL never reaching it.
                last_reclaim: now.checked_sub(RECLAIM_EVERY).unwrap_or(now),
                subnet_low_until: None,
                grew_at: None,
                growing: false,
                refill_secs: FIRST_REFILL_SECS,
                full_subnets: BTreeMap::new(),
                listed_subnets: Vec::new(),
            }),
            settings,
            pool,
            interfaces_held: Default::default(),
            target: Mutex::new(Err(
                "the node's ENIConfig is not known yet (Kubernetes has not answered)".into(),
            )),
        };
        // Every interface waits for its node side, when there is one.
        for id in r.pool.interface_ids() {
            if r.node.hold(&id) {
                r.pool.set_ready(&id, false);
            }
        }
        r.lock().status.unconfirmed_assignments = r.pool.unconfirmed() as u64;
        r
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("reconciler lock poisoned")
    }

    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    pub fn provider(&self) -> &dyn CloudProvider {
        &*self.provider
    }

    pub fn node(&self) -> &NodeTracker {
        &self.node
    }

    pub fn status(&self) -> Status {
        self.lock().status.clone()
    }

    pub fn foreign(&self) -> Vec<String> {
        self.lock().foreign.keys().cloned().collect()
    }

    pub fn frozen(&self) -> BTreeSet<String> {
        self.lock().frozen.clone()
    }

    /// Holds (or lets go of) interface creates and deletes: aws-node's
    /// AWS_MANAGE_ENIS_NON_SCHEDULABLE=false on a cordoned node. Addresses
    /// on attached interfaces are still assigned and released.
    pub fn hold_interfaces(&self, held: bool) {
        self.interfaces_held
            .store(held, std::sync::atomic::Ordering::SeqCst);
        self.pool.publish();
    }

    /// Custom networking: where new interfaces go from now on, or why no
    /// interface may be created (no ENIConfig for this node).
    pub fn set_interface_target(&self, target: Result<InterfaceTarget, String>) {
        let changed = {
            let mut t = self.target.lock().expect("lock");
            let changed = *t != target;
            *t = target.clone();
            changed
        };
        if changed {
            // What explain says follows at once; the reconciler plans again.
            self.update(|s| {
                if let Some(Blocked::NoEniConfig { why }) = &mut s.blocked {
                    match &target {
                        Ok(_) => s.blocked = None,
                        Err(w) => *why = w.clone(),
                    }
                }
            });
            self.pool.publish();
            self.pool.wake();
        }
    }

    /// The custom-networking target, when one is known.
    pub fn interface_target(&self) -> Option<InterfaceTarget> {
        self.target.lock().expect("lock").clone().ok()
    }

    /// Under custom networking without an ENIConfig: why no interface may
    /// be created; `None` otherwise.
    pub fn target_missing(&self) -> Option<String> {
        if !self.settings.custom_networking {
            return None;
        }
        self.target.lock().expect("lock").clone().err()
    }

    /// Whether a grow (assign, or create an interface) is being made, or
    /// a plan held one (made or put off) within the last `within`: this
    /// node counts among the account's nodes that grow (see
    /// [`crate::k8s::growers`]).
    pub fn grows(&self, within: Duration) -> bool {
        let st = self.lock();
        st.growing || st.grew_at.is_some_and(|t| t.elapsed() < within)
    }

    pub fn interfaces_held(&self) -> bool {
        self.interfaces_held
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Updates the status under its lock and tells the pool why it cannot
    /// grow (for the message of an ADD that waited in vain).
    fn update(&self, f: impl FnOnce(&mut Status)) {
        let grow = {
            let mut st = self.lock();
            f(&mut st.status);
            let s = &st.status;
            crate::explain::GrowStatus {
                blocked: s.blocked.clone(),
                last_error: s.last_error.clone(),
                last_error_kind: s.last_error_kind,
                retry_at: s.retry_at,
                capacity: s.capacity,
            }
        };
        self.pool.set_grow_status(grow);
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::default();
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.step().await {
                Ok(0) => {
                    // `biased`: branches polled in order, not at random,
                    // so that a seeded simulation runs the same twice
                    // (tokio's random order decided whether a stored
                    // wake-up was taken now or on the next pass).
                    // A change put off is looked at again on the next
                    // pass: up to RECONCILE_EVERY late, which spreads the
                    // nodes' calls further (waking exactly when each token
                    // came made more of them collide: in one 2,000-node
                    // run the cold start's last pod came 200 s later).
                    tokio::select! {
                        biased;
                        _ = self.pool.woken() => {}
                        _ = tokio::time::sleep(RECONCILE_EVERY) => {}
                        _ = shutdown.changed() => return,
                    }
                    // Every ADD and DEL wakes us; under a burst, look once
                    // per debounce instead of once per call. An ADD that is
                    // waiting for an address is served at once.
                    if self.pool.waiting() == 0 {
                        tokio::select! {
                            biased;
                            _ = tokio::time::sleep(WAKE_DEBOUNCE) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
                Ok(_) => backoff.reset(),
                Err(e) => {
                    let delay = backoff.next(&e);
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "pool change failed");
                    self.update(|s| {
                        s.last_error = Some(e.to_string());
                        s.last_error_kind = Some(e.label());
                        s.consecutive_errors += 1;
                        s.retry_at = Some(Instant::now() + delay);
                    });
                    self.pool.publish();
                    tokio::select! {
                        biased;
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// One pass: finish pending deletes, resync now and then, plan, act.
    /// Returns how many actions were carried out.
    pub async fn step(&self) -> Result<usize, StepError> {
        let errors_before = self.errors_total();
        self.pool.heal_journal().await;
        self.node_step().await;
        for id in self.pool.pending_deletes() {
            if let Err(e) = self.finish_delete(&id).await {
                self.count_error("delete_interface");
                return Err(e.into());
            }
        }
        let resync_due = {
            let st = self.lock();
            st.resync_now || st.last_resync.elapsed() >= st.resync_every
        };
        if resync_due {
            // A throttled or failed Describe must not stop the pool from
            // growing (it did at 2,000 nodes, whose resyncs alone exceed
            // the account's Describe budget): say so and look again at the
            // next resync.
            // Only a periodic resync gives way to an ADD: one asked for
            // because the pool's counts may be stale (an Assign that timed
            // out, an interface fuller than thought) comes before the
            // next grow, which would be planned on them.
            let may_yield = {
                let mut st = self.lock();
                !std::mem::take(&mut st.resync_yielded) && !st.resync_now
            };
            let outcome = self.resync_within(may_yield).await;
            if let Ok(None) = outcome {
                let mut st = self.lock();
                if st.resync_yielded {
                    // Still due: at the next step, after this one grows.
                    debug!("resync cut short: an ADD waits for an address");
                    st.resync_now = true;
                } else {
                    // Not a failure: at thousands of nodes a node's share
                    // of the Describe budget comes about once a resync
                    // interval.
                    debug!("resync deferred: no Describe within its budget");
                    st.last_resync = Instant::now();
                    st.resync_now = false;
                }
            }
            if let Err(e) = outcome {
                self.count_error("resync");
                if !e.is_transient() {
                    return Err(e.into());
                }
                warn!(error = %e, "resync failed; the pool goes on with what it knows");
                {
                    let mut st = self.lock();
                    st.last_resync = Instant::now();
                    st.resync_now = false;
                }
                self.update(|s| {
                    s.last_error = Some(format!("resync: {e}"));
                    s.last_error_kind = Some(e.metric_label());
                });
            }
        }
        let gc_due = self.settings.leaked_gc && Instant::now() >= self.lock().next_leak_gc;
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
            self.lock().last_reclaim = Instant::now();
            self.pool.reclaim_gone().await;
        }
        let (plan, urgent) = {
            let now = Instant::now();
            // The limits as the provider knows them now (a cap the cloud
            // taught); interfaces ipamd does not manage still take slots.
            let mut limits = self
                .provider
                .current_limits()
                .unwrap_or(self.instance.limits);
            let unmanaged = {
                let st = self.lock();
                (st.foreign.len() + st.frozen.len()) as u32
            };
            limits.max_interfaces = limits.max_interfaces.saturating_sub(unmanaged);
            let mut view = self.pool.policy_view(limits, self.caps.hot_attach, now);
            {
                let mut st = self.lock();
                view.subnet_low = st.subnet_low_until.is_some_and(|t| now < t);
                // Only the adaptive mode reads it.
                view.adaptive_warm = if !self.settings.pool.adaptive {
                    0
                } else if self.pool.any_arrival() {
                    policy::adaptive_warm(
                        self.pool.arrival_rate(now),
                        self.pool.departure_rate(now),
                        st.refill_secs,
                        self.settings.cooldown.as_secs_f64(),
                    )
                } else if self.settings.pool.prefix_delegation {
                    // Before the first pod: what the default targets keep,
                    // one prefix, or one interface's worth (a new node is
                    // usually given pods at once).
                    policy::PREFIX_SIZE
                } else {
                    limits.slots_per_interface()
                };
                st.full_subnets.retain(|_, until| now < *until);
                for i in &mut view.interfaces {
                    i.subnet_full = st.full_subnets.contains_key(&i.subnet_id);
                }
            }
            let plan = policy::plan(&view, &self.settings.pool, now);
            let cfg = &self.settings.pool;
            let interfaces = cfg
                .max_eni
                .map_or(limits.max_interfaces, |m| m.min(limits.max_interfaces));
            let unit = if cfg.prefix_delegation {
                policy::PREFIX_SIZE
            } else {
                1
            };
            let capacity = (interfaces, limits.slots_per_interface() * unit);
            let refill = self.lock().refill_secs;
            self.update(|s| {
                s.blocked = plan.blocked.clone();
                s.capacity = Some(capacity);
                s.adaptive_warm = cfg.adaptive.then_some(view.adaptive_warm);
                s.refill_secs = refill;
            });
            (plan, view.waiting > 0)
        };
        let mut done = 0;
        let held = self.interfaces_held();
        let no_target = self.target_missing();
        // The grows of a step that ADDs wait for may take their grow
        // buckets' reserves, each bucket's once in the step; only those
        // for the ADDs, not those the plan adds for the warm target.
        let reserves = providers::layer::ReservesTaken::default();
        let mut for_adds = plan.for_adds;
        for action in plan.actions {
            if held
                && matches!(
                    action,
                    policy::Action::CreateInterface { .. } | policy::Action::DeleteInterface { .. }
                )
            {
                debug!(?action, "held: the node is cordoned");
                continue;
            }
            if let (Some(why), policy::Action::CreateInterface { .. }) = (&no_target, &action) {
                debug!(?action, %why, "held: custom networking without an ENIConfig");
                self.update(|s| s.blocked = Some(Blocked::NoEniConfig { why: why.clone() }));
                continue;
            }
            debug!(?action, "pool action");
            let kind = action.kind();
            let grows = matches!(
                action,
                policy::Action::AssignIps { .. }
                    | policy::Action::AssignPrefixes { .. }
                    | policy::Action::CreateInterface { .. }
            );
            if grows {
                self.lock().grew_at = Some(Instant::now());
            }
            // A change no ADD waits for is put off until its bucket has a
            // token (it would wait inside the call and hold up a grow an
            // ADD does wait for), and spread over the nodes of the account
            // when their buckets sat full; the next step plans again.
            if !urgent {
                if let Some(wait) = self.provider.put_off(action.change()) {
                    debug!(
                        ?action,
                        wait_ms = wait.as_millis() as u64,
                        "put off: no ADD waits for it"
                    );
                    continue;
                }
            }
            let began = Instant::now();
            self.lock().growing = grows;
            // Nobody waits for a release: a throttle puts it off again
            // rather than holding the reconciler inside the call while an
            // ADD may come to wait (see `providers::layer::nobody_waits`).
            // A grow is not: after a throttle, an ADD's grow would wait
            // for the same bucket's token.
            let for_an_add = urgent && grows && for_adds > 0;
            let deferrable = action.change() == providers::Change::Release;
            let (outcome, handed_back) = if deferrable {
                providers::layer::nobody_waits(self.execute(action)).await
            } else if for_an_add {
                (
                    providers::layer::for_an_add(&reserves, self.execute(action)).await,
                    false,
                )
            } else {
                (self.execute(action).await, false)
            };
            {
                let mut st = self.lock();
                st.growing = false;
                if grows {
                    st.grew_at = Some(Instant::now());
                }
            }
            if handed_back
                && matches!(
                    outcome,
                    Err(StepError::Cloud(ProviderError::Throttled { .. }))
                )
            {
                debug!(kind, "put off: the release was throttled");
                // Its addresses are the pool's again: an ADD waiting
                // meanwhile may take one now, not at its next look.
                self.pool.publish();
                continue;
            }
            // What the grow made free, not what the plan asked: a prefix
            // sent as single addresses (a full subnet) leaves the ADDs'
            // other grows in scope.
            if let Ok(added) = outcome {
                for_adds = for_adds.saturating_sub(added);
            }
            if let Err(e) = outcome {
                self.count_error(e.site(kind));
                // The subnet said it cannot give more: the scaler's batch
                // drops to one, and a full subnet is not asked again.
                let now = Instant::now();
                let until = now + SUBNET_LOW_FOR;
                match &e {
                    StepError::Cloud(ProviderError::SubnetExhausted { subnet }) => {
                        let mut st = self.lock();
                        st.subnet_low_until = Some(until);
                        // A mark still running is not renewed: the error
                        // then came from the mark itself, not from a
                        // cloud answer, and the subnet is asked again when
                        // the mark lapses.
                        let mark = st.full_subnets.entry(subnet.clone()).or_insert(until);
                        if *mark <= now {
                            *mark = until;
                        }
                    }
                    StepError::Cloud(ProviderError::InsufficientCidrBlocks { .. }) => {
                        self.lock().subnet_low_until = Some(until);
                    }
                    _ => {}
                }
                return Err(e);
            }
            done += 1;
            if grows {
                let took = began.elapsed().as_secs_f64();
                let mut st = self.lock();
                st.refill_secs = (1.0 - REFILL_WEIGHT) * st.refill_secs + REFILL_WEIGHT * took;
            }
            self.update(|s| {
                s.actions_done += 1;
                *s.actions_by_kind.entry(kind).or_default() += 1;
                s.last_error = None;
                s.last_error_kind = None;
                s.consecutive_errors = 0;
                s.retry_at = None;
            });
            self.pool.publish();
        }
        // Nothing failed in this step: an earlier failure (one a later plan
        // no longer needed to retry) is not the pool's state any more.
        if self.errors_total() == errors_before && self.lock().status.last_error.is_some() {
            self.update(|s| {
                s.last_error = None;
                s.last_error_kind = None;
                s.consecutive_errors = 0;
                s.retry_at = None;
            });
        }
        Ok(done)
    }

    fn errors_total(&self) -> u64 {
        self.lock().status.errors_by_site.values().sum()
    }

    /// Sets up what is pending on the node's side; what cannot be done yet
    /// (the link has not appeared) is tried again on the next step.
    async fn node_step(&self) {
        if !self.node.active() {
            return;
        }
        let side = self.node.side();
        let mut changed = false;
        for id in self.node.pending() {
            let Some(iface) = self.pool.interface(&id) else {
                self.node.done(&id);
                continue;
            };
            match side.setup_interface(&iface).await {
                Ok(()) => {
                    self.pool.set_ready(&id, true);
                    self.node.done(&id);
                    changed = true;
                }
                Err(e @ crate::hostnet::HostError::NoLink { .. }) => {
                    debug!(error = %e, "waiting for the link")
                }
                Err(e) => {
                    warn!(interface = %id, error = %e, "cannot set up the interface on the node");
                    self.count_error("node_setup");
                    self.update(|s| s.last_error = Some(format!("node setup of {id}: {e}")));
                }
            }
        }
        if !self.node.snat_done() {
            // Under custom networking the primary is not the pool's: it is
            // among the interfaces ipamd leaves alone.
            let primary = self.pool.primary().or_else(|| {
                self.lock()
                    .foreign
                    .values()
                    .find(|i| i.is_primary())
                    .cloned()
            });
            if let Some(primary) = primary {
                match side.setup_snat(&self.snat_config(), &primary).await {
                    Ok(()) => {
                        self.node.set_snat_done();
                        changed = true;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot set up SNAT");
                        self.count_error("snat");
                        self.update(|s| s.last_error = Some(format!("SNAT: {e}")));
                    }
                }
            }
        }
        if changed {
            self.pool.publish();
        }
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

    /// Returns once an ADD waits for an address (at once if one does).
    /// Takes the pool's wake-ups meanwhile: the step that awaits this plans
    /// afterwards on what they announced.
    async fn an_add_waits(&self) {
        while self.pool.waiting() == 0 {
            self.pool.woken().await;
        }
    }

    /// Resync at the next step (see `State::resync_now`).
    fn resync_soon(&self) {
        self.lock().resync_now = true;
    }

    fn count_error(&self, site: &'static str) {
        self.update(|s| *s.errors_by_site.entry(site).or_default() += 1);
    }

    /// Compares the pool with the cloud's view of the instance.
    pub async fn resync(&self) -> Result<(), ProviderError> {
        match self.resync_within(false).await? {
            Some(()) => Ok(()),
            None => Err(ProviderError::Timeout {
                api: format!(
                    "DescribeNetworkInterfaces: the resync gave up after {} s",
                    RESYNC_BUDGET.as_secs()
                ),
            }),
        }
    }

    /// [`Reconciler::resync`]; `None` when the Describe did not come back
    /// within [`RESYNC_BUDGET`] (the node's share of the account's
    /// Describe budget not there yet, or throttling), or, when
    /// `may_yield`, when an ADD waits for an address before it came back
    /// or before it was sent (`State::resync_yielded` set): the step then
    /// grows for the ADD at once instead of after the Describe's token
    /// (up to the budget; in the 2,000-node simulation's churn, ADDs
    /// waited 5 s behind it).
    async fn resync_within(&self, may_yield: bool) -> Result<Option<()>, ProviderError> {
        if may_yield && self.pool.waiting() > 0 {
            // Before the Describe takes a token and is sent for nothing.
            self.lock().resync_yielded = true;
            return Ok(None);
        }
        // A read: dropping it half-way changes nothing.
        let describe = tokio::time::timeout(RESYNC_BUDGET, self.provider.describe_interfaces());
        let described = if may_yield {
            tokio::select! {
                biased;
                r = describe => r,
                () = self.an_add_waits() => {
                    self.lock().resync_yielded = true;
                    return Ok(None);
                }
            }
        } else {
            describe.await
        };
        let Ok(all) = described else {
            return Ok(None);
        };
        let all = all?;
        if let Some(e) = complete_half_made(&*self.provider, &self.instance.id, &all).await {
            self.count_error("resync");
            self.update(|s| s.last_error = Some(e));
        }
        let known = self.pool.interface_ids();
        let (cloud, frozen) = {
            let mut st = self.lock();
            st.last_resync = Instant::now();
            st.resync_now = false;
            // One it managed until now (tagged no_manage since) is frozen
            // for the pods it holds.
            let (cloud, foreign) = crate::ownership::split(
                all,
                &self.instance.id,
                !self.settings.custom_networking,
                |i| known.contains(&i.id),
                &mut st.frozen,
            );
            crate::ownership::log_new_foreign(&foreign, &st.foreign);
            st.foreign = foreign;
            (cloud, st.frozen.clone())
        };
        // Interfaces found only now wait for their node side: marked here,
        // and added not ready by the pool under its lock.
        let hold: BTreeSet<String> = cloud
            .iter()
            .filter(|c| !known.contains(&c.id) && self.node.hold(&c.id))
            .map(|c| c.id.clone())
            .collect();
        let unfreeze = self.pool.apply_cloud(&cloud, &hold, &frozen);
        {
            // Their last pod is gone (or they are): no longer ipamd's at all.
            let mut st = self.lock();
            for (id, info) in unfreeze {
                st.frozen.remove(&id);
                if let Some(i) = info {
                    st.foreign.insert(id, i);
                }
            }
        }
        // SNAT is re-applied in case something removed it.
        self.node.redo_snat();
        let unconfirmed = self.pool.unconfirmed() as u64;
        self.update(|s| s.unconfirmed_assignments = unconfirmed);
        self.pool.publish();
        Ok(Some(()))
    }
}

/// Sets DeleteOnTermination on interfaces of ours that lack it (a create
/// cut short between its Attach and the flag, by a crash or by a rollback
/// that failed), so none outlives the instance. Returns the last failure;
/// the caller tries again at its next resync.
pub(crate) async fn complete_half_made(
    provider: &dyn CloudProvider,
    instance_id: &str,
    all: &[Interface],
) -> Option<String> {
    let mut failed = None;
    // Never the primary, so whether it is the pool's does not matter here.
    let half_made = all.iter().filter(|i| {
        !i.is_primary()
            && i.delete_on_termination == Some(false)
            && crate::ownership::managed(i, instance_id, true)
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

/// Jittered exponential backoff, longer for a full subnet or a limit.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn reset(&mut self) {
        self.failures = 0;
    }

    fn next(&mut self, e: &StepError) -> Duration {
        self.failures = (self.failures + 1).min(16);
        let (base, cap) = match e {
            StepError::Cloud(
                ProviderError::SubnetExhausted { .. }
                | ProviderError::InsufficientCidrBlocks { .. }
                | ProviderError::LimitExceeded(_),
            ) => (Duration::from_secs(5), Duration::from_secs(60)),
            // A full disk does not empty itself in milliseconds.
            StepError::Journal(_) => (Duration::from_secs(1), Duration::from_secs(30)),
            StepError::Cloud(_) => (Duration::from_millis(250), Duration::from_secs(30)),
        };
        let exp = base
            .saturating_mul(1 << (self.failures - 1).min(10))
            .min(cap);
        // Full jitter over the upper half keeps nodes of one account apart.
        providers::jitter::upper_half(exp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_failure_is_not_backed_off_as_a_cloud_error() {
        let journal = StepError::Journal(JournalError::Write {
            path: "/x".into(),
            reason: "No space left on device".into(),
        });
        assert_eq!(journal.label(), "journal");
        let mut b = Backoff::default();
        let first = b.next(&journal);
        assert!(first >= Duration::from_millis(500), "{first:?}");
        let cloud = StepError::Cloud(ProviderError::Server("500".into()));
        assert_eq!(cloud.label(), "server");
        let mut b = Backoff::default();
        assert!(b.next(&cloud) <= Duration::from_millis(250));
    }

    #[test]
    fn fewer_halves_down_to_one() {
        assert_eq!(fewer(AssignRequest::Ips(3)), Some(AssignRequest::Ips(1)));
        assert_eq!(fewer(AssignRequest::Ips(1)), None);
        assert_eq!(fewer(AssignRequest::Prefixes(2)), None);
    }
}
