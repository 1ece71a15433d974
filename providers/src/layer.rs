//! The one throttle/retry layer every provider's cloud calls go through:
//! a client-side token bucket per API, jittered exponential retries of
//! transient failures, and per-API figures.
//!
//! It sits at the granularity of one cloud API call, not one
//! [`crate::CloudProvider`] method: a method such as `create_interface` is
//! several calls (Create, Attach, Modify) and is not idempotent as a whole,
//! so retrying it would create a second interface after the first one's
//! Attach was throttled. Every provider (AWS, the simulated VPC, Azure)
//! routes each of its calls through [`CallLayer::call`], so the simulator's
//! throttling and 5xx exercise the same code that runs against EC2.
//!
//! What is retried: a throttled call was not carried out, so it is always
//! retried, except an Assign or Unassign inside [`nobody_waits`], which is
//! handed back to be put off. A 5xx, a timeout or a broken connection is ambiguous (the cloud
//! may have done it), so it is retried only for calls that are safe to
//! repeat ([`safe_to_repeat`]: reads, deletes, detaches, setting an
//! attribute), or that the caller made idempotent
//! ([`Repeat::Always`], e.g. a Create with a client token).
//! Repeating an Assign or an Unassign that took effect would take more
//! addresses, or fail and make ipamd think released addresses are free.
//!
//! Clock: tokio's, so a simulation under a paused clock is deterministic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tracing::debug;

use crate::bucket::{BucketSpec, Buckets};
use crate::error::{ProviderError, Result};

/// How transient failures (throttling, 5xx, timeouts, transport) are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Throttled answers a call may get before it gives up: more than
    /// `max_attempts`, since a throttled call was not carried out and
    /// giving up only moves the wait elsewhere (a rolled-back interface, a
    /// reconciler backoff) at the cost of more calls.
    pub max_throttled: u32,
    /// Delay cap before the second attempt; doubles per attempt.
    pub base: Duration,
    /// Upper bound of one delay.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// Six attempts, 200 ms doubling to at most 10 s (about 20 s in all):
    /// long enough to ride out a burst of RequestLimitExceeded, short enough
    /// that the reconciler's own backoff takes over for a longer outage.
    fn default() -> Self {
        Self {
            max_attempts: 6,
            max_throttled: 20,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`: full jitter over the upper
    /// half of `base * 2^(attempt-1)` (capped), so nodes that failed
    /// together do not retry together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.cap);
        crate::jitter::upper_half(exp)
    }
}

/// Whether a call to `api` draws on the cloud account's request budget
/// (the client-side buckets). Not IMDS (`IMDS_*`: the instance's own
/// metadata service, limited per instance, not per account), nor the
/// simulator's `LaunchInstance`, which stands for the instance having been
/// launched (by an autoscaler, not by ipamd).
pub fn from_account_budget(api: &str) -> bool {
    !(api.starts_with("IMDS") || api == "LaunchInstance")
}

tokio::task_local! {
    /// Set while a change no ADD waits for runs ([`nobody_waits`]): whether
    /// a throttled call in it was handed back unretried.
    static NOBODY_WAITS: std::cell::Cell<bool>;
    /// Set while a grow ADDs wait for runs ([`for_an_add`]).
    static FOR_AN_ADD: ReservesTaken;
}

/// The buckets whose reserve ([`crate::bucket::GROW_RESERVE`]) the grows
/// of one reconciler step that ADDs wait for took ([`for_an_add`]): each
/// at most once per step. Clones share the set.
#[derive(Clone, Debug, Default)]
pub struct ReservesTaken(Arc<Mutex<std::collections::HashSet<String>>>);

impl ReservesTaken {
    /// Takes `key`'s reserve from `buckets` unless this step already did:
    /// whether it took one.
    fn take(&self, buckets: &mut Buckets, key: &str, now: Instant) -> bool {
        let mut taken = self.0.lock().expect("reserves lock");
        if taken.contains(key) || !buckets.take_reserve(key, now) {
            return false;
        }
        taken.insert(key.to_string());
        true
    }
}

/// Runs `grow`, a pool change that ADDs wait for: a call of it that finds
/// its grow bucket empty may take the bucket's reserve
/// ([`crate::bucket::GROW_RESERVE`]), which no other call takes, unless
/// a grow under the same `taken` (the same step) took it already. The
/// reconciler runs the grows of a step that serve waiting ADDs under it
/// (not those the plan adds for the warm target), with one `taken` per
/// step.
pub async fn for_an_add<F: std::future::Future>(taken: &ReservesTaken, grow: F) -> F::Output {
    FOR_AN_ADD.scope(taken.clone(), grow).await
}

/// Runs `change`, a pool change no ADD waits for (the reconciler runs its
/// releases so). In it, a call that EC2 throttles and that is one whole
/// change by itself ([`whole_change`]: Assign, Unassign) returns
/// [`ProviderError::Throttled`] at once instead of being retried inside
/// the call; the second value then says so (`true`: the change was not
/// made, and its caller may put it off; a `Throttled` from elsewhere, such
/// as ARM's write retried to the end, is not that). After a throttle the
/// node's bucket is halved and emptied, so the retry would wait for one
/// refill period of the node's share (800 s at 2,000 nodes), and the
/// reconciler, busy in the call, could not serve an ADD that starts to
/// wait meanwhile. Its caller puts the change off instead
/// ([`CallLayer::put_off`]), free to grow for the ADD. In the 2,000-node
/// simulation's churn, a release retried inside its call held the
/// reconciler for 265 s and an ADD on that node waited 24.8 s.
pub async fn nobody_waits<F: std::future::Future>(change: F) -> (F::Output, bool) {
    NOBODY_WAITS
        .scope(std::cell::Cell::new(false), async {
            let out = change.await;
            (out, NOBODY_WAITS.with(std::cell::Cell::get))
        })
        .await
}

/// Whether `api` is a change that a throttle leaves undone as a whole: a
/// single synchronous call, not a step of a chain (Create, Attach, Modify)
/// whose undone rest would leave a half-made interface, nor a write whose
/// long-running operation goes on after the call (ARM). EC2 API names.
pub fn whole_change(api: &str) -> bool {
    matches!(
        api,
        "AssignPrivateIpAddresses"
            | "AssignIpv6Addresses"
            | "UnassignPrivateIpAddresses"
            | "UnassignIpv6Addresses"
    )
}

/// Whether repeating `api` after an ambiguous failure (5xx, timeout,
/// transport) is harmless: reads, and changes whose repetition ends in the
/// same state (a delete or detach, which providers treat as done when the
/// thing is already gone; setting an attribute or tags). EC2 API names; the
/// simulated VPC uses the same.
pub fn safe_to_repeat(api: &str) -> bool {
    api.starts_with("Describe")
        // ARM's reads, named by their operation ids (NetworkInterfaces_Get,
        // VirtualNetworks_ListUsage, ...), and IMDS.
        || api.ends_with("_Get")
        || api.contains("_List")
        || api == "IMDS_Instance"
        || matches!(
            api,
            "DetachNetworkInterface"
                | "DeleteNetworkInterface"
                | "ModifyNetworkInterfaceAttribute"
                | "CreateTags"
                | "DeleteTags"
                // The simulator's find-or-launch by node name.
                | "LaunchInstance"
        )
}

/// Whether a call may be repeated after an ambiguous failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// When [`safe_to_repeat`] says so for its API.
    IfSafe,
    /// Always: the caller made the call idempotent (EC2's `ClientToken`,
    /// the same on every attempt).
    Always,
}

/// Figures of one API, as `/v1/pool`'s `provider_api` shows them.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ApiStats {
    /// Attempts sent to the cloud (retries included).
    pub calls: u64,
    /// Attempts that were retries of a transient failure.
    pub retries: u64,
    /// Attempts the cloud throttled (EC2 RequestLimitExceeded, ARM 429).
    pub throttles: u64,
    /// Attempts that failed otherwise.
    pub errors: u64,
    /// Times a call waited for the client-side bucket instead of being sent.
    pub bucket_waits: u64,
    /// The client-side bucket's refill rate now, per second (lower than
    /// the documented rate after throttling, see [`crate::bucket::Buckets`]).
    pub client_rate_per_sec: f64,
    /// Sum of the attempts' latencies, milliseconds.
    pub latency_ms_total: f64,
    /// Attempts by latency: entry `i` counts those that took at most
    /// [`LATENCY_BOUNDS_MS`]`[i]` ms and more than the bound before it
    /// (not cumulative); the last entry counts the slower rest.
    pub latency_ms_buckets: [u64; LATENCY_BOUNDS_MS.len() + 1],
    /// Failed attempts (throttles included) by
    /// [`ProviderError::metric_label`] (`throttled`, `server`, ...).
    pub errors_by_kind: BTreeMap<String, u64>,
}

/// Upper bounds, in milliseconds, of [`ApiStats::latency_ms_buckets`]:
/// from a fast IMDS answer to a throttled EC2 call's retry delays.
pub const LATENCY_BOUNDS_MS: [f64; 10] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

/// See the module documentation.
#[derive(Debug)]
pub struct CallLayer {
    policy: RetryPolicy,
    /// Client-side buckets; `None` sends every call at once.
    buckets: Option<Mutex<Buckets>>,
    /// The bucket an API draws from, when APIs share buckets (ARM's reads
    /// and writes); `None`: one bucket per API (EC2).
    bucket_of: Option<fn(&str) -> &'static str>,
    stats: Mutex<BTreeMap<String, ApiStats>>,
}

impl CallLayer {
    /// A layer with `policy`, and client-side buckets sized by `spec`
    /// (e.g. [`crate::bucket::ec2_bucket`]) when given.
    pub fn new(policy: RetryPolicy, spec: Option<fn(&str) -> BucketSpec>) -> Self {
        Self {
            policy,
            buckets: spec.map(|s| Mutex::new(Buckets::with_spec(s))),
            bucket_of: None,
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    /// This layer with `policy` instead of its own (a test's quicker
    /// retries).
    pub fn with_policy(self, policy: RetryPolicy) -> Self {
        Self { policy, ..self }
    }

    /// The layer for Azure Resource Manager: the default policy under
    /// ARM's per-subscription read and write buckets
    /// ([`crate::bucket::arm_bucket`]), adapting to 429s as
    /// [`CallLayer::ec2`] does. An API whose name ends in `_Get`, contains
    /// `_List` draws from the read bucket; IMDS from none
    /// ([`from_account_budget`]); any other
    /// from the write bucket.
    pub fn arm() -> Self {
        Self {
            buckets: Some(Mutex::new(Buckets::adaptive(crate::bucket::arm_bucket))),
            bucket_of: Some(|api: &str| {
                if safe_to_repeat(api) {
                    crate::bucket::ARM_READS
                } else {
                    crate::bucket::ARM_WRITES
                }
            }),
            ..Self::new(RetryPolicy::default(), None)
        }
    }

    fn bucket_key<'a>(&self, api: &'a str) -> &'a str {
        match self.bucket_of {
            Some(f) => f(api),
            None => api,
        }
    }

    /// The layer for EC2 (and EC2-shaped clouds such as the simulator):
    /// the default policy under AWS's documented per-API buckets, adapting
    /// to throttling so the nodes of one account share its budget.
    pub fn ec2() -> Self {
        Self {
            buckets: Some(Mutex::new(Buckets::adaptive(crate::bucket::ec2_bucket))),
            ..Self::new(RetryPolicy::default(), None)
        }
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// `nodes` share the account whose buckets the client-side ones
    /// mirror (the cluster's node count): each node's buckets become its
    /// share, see [`Buckets::set_peers`]. Nothing without adaptive buckets.
    pub fn set_peers(&self, nodes: u32) {
        if let Some(b) = &self.buckets {
            b.lock()
                .expect("bucket lock")
                .set_peers(nodes, Instant::now());
        }
    }

    /// `nodes` of the account's nodes grow their pools now (`None`: not
    /// known), see [`Buckets::set_growers`]. Nothing without adaptive
    /// buckets.
    pub fn set_growers(&self, nodes: Option<u32>) {
        if let Some(b) = &self.buckets {
            b.lock()
                .expect("bucket lock")
                .set_growers(nodes, Instant::now());
        }
    }

    /// How long to put off a call to `api` that nobody waits for, see
    /// [`Buckets::put_off`]; `None` (make it now) without client-side
    /// buckets.
    pub fn put_off(&self, api: &str) -> Option<Duration> {
        let key = self.bucket_key(api);
        self.buckets
            .as_ref()
            .and_then(|b| b.lock().expect("bucket lock").put_off(key, Instant::now()))
    }

    /// Runs one cloud call `f` (a fresh attempt per invocation) under the
    /// bucket for `api`, retrying throttling, and the other transient
    /// failures when [`safe_to_repeat`] says so, per the policy. Returns the
    /// last attempt's result.
    pub async fn call<T, F, Fut>(&self, api: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.call_with(api, Repeat::IfSafe, f).await
    }

    /// [`CallLayer::call`] with the caller's word on whether repeating the
    /// call after an ambiguous failure is safe.
    pub async fn call_with<T, F, Fut>(&self, api: &str, repeat: Repeat, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let repeatable = match repeat {
            Repeat::IfSafe => safe_to_repeat(api),
            Repeat::Always => true,
        };
        let (mut attempt, mut throttled) = (0u32, 0u32);
        loop {
            attempt += 1;
            self.take_token(api).await;
            let started = Instant::now();
            let r = f().await;
            self.record(api, attempt, started.elapsed(), r.as_ref().err());
            if let Some(b) = self.buckets.as_ref().filter(|_| from_account_budget(api)) {
                let mut b = b.lock().expect("bucket lock");
                let now = Instant::now();
                let key = self.bucket_key(api);
                if matches!(r, Err(ProviderError::Throttled { .. })) {
                    b.throttled(key, now);
                }
                let rate = b.rate(key, now);
                drop(b);
                self.entry(api, |s| s.client_rate_per_sec = rate);
            }
            let again = match &r {
                Err(ProviderError::Throttled { .. }) => {
                    throttled += 1;
                    // Handed back unretried inside `nobody_waits`.
                    let back = whole_change(api) && NOBODY_WAITS.try_with(|b| b.set(true)).is_ok();
                    !back && throttled < self.policy.max_throttled
                }
                Err(e) => {
                    repeatable && e.is_transient() && attempt - throttled < self.policy.max_attempts
                }
                Ok(_) => false,
            };
            match r {
                Err(e) if again => {
                    // The cloud's own word on when to come back (ARM's
                    // Retry-After) is a floor under the jittered delay.
                    let asked = match &e {
                        ProviderError::Throttled {
                            retry_after_ms: Some(ms),
                            ..
                        } => Duration::from_millis(*ms),
                        _ => Duration::ZERO,
                    };
                    let delay = self.policy.delay(attempt).max(asked);
                    debug!(api, attempt, error = %e, delay_ms = delay.as_millis() as u64, "retrying");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    async fn take_token(&self, api: &str) {
        let Some(buckets) = &self.buckets else { return };
        if !from_account_budget(api) {
            return;
        }
        let mut waited = false;
        let for_add = FOR_AN_ADD.try_with(Clone::clone).ok();
        loop {
            let wait = {
                let mut b = buckets.lock().expect("bucket lock");
                let (key, now) = (self.bucket_key(api), Instant::now());
                match b.take_or_wait(key, now) {
                    Some(_) if for_add.as_ref().is_some_and(|t| t.take(&mut b, key, now)) => None,
                    wait => wait,
                }
            };
            match wait {
                None => break,
                Some(d) => {
                    waited = true;
                    tokio::time::sleep(d).await
                }
            }
        }
        if waited {
            self.entry(api, |s| s.bucket_waits += 1);
        }
    }

    fn entry(&self, api: &str, f: impl FnOnce(&mut ApiStats)) {
        let mut st = self.stats.lock().expect("stats lock");
        match st.get_mut(api) {
            Some(s) => f(s),
            None => f(st.entry(api.to_string()).or_default()),
        }
    }

    fn record(&self, api: &str, attempt: u32, took: Duration, err: Option<&ProviderError>) {
        self.entry(api, |s| {
            s.calls += 1;
            if attempt > 1 {
                s.retries += 1;
            }
            let ms = took.as_secs_f64() * 1e3;
            s.latency_ms_total += ms;
            let i = LATENCY_BOUNDS_MS.partition_point(|b| *b < ms);
            s.latency_ms_buckets[i] += 1;
            match err {
                Some(ProviderError::Throttled { .. }) => s.throttles += 1,
                Some(_) => s.errors += 1,
                None => {}
            }
            if let Some(e) = err {
                *s.errors_by_kind
                    .entry(e.metric_label().to_string())
                    .or_default() += 1;
            }
        });
    }

    /// Figures per API so far.
    pub fn stats(&self) -> BTreeMap<String, ApiStats> {
        self.stats.lock().expect("stats lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(max_attempts: u32) -> CallLayer {
        CallLayer::new(
            RetryPolicy {
                max_attempts,
                max_throttled: max_attempts,
                base: Duration::from_millis(100),
                cap: Duration::from_secs(1),
            },
            None,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_counted() {
        let layer = quick(6);
        let n = AtomicU32::new(0);
        let r = layer
            .call("DescribeNetworkInterfaces", || async {
                match n.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(ProviderError::throttled("x")),
                    2 => Err(ProviderError::Server("503".into())),
                    _ => Ok(7),
                }
            })
            .await;
        assert_eq!(r, Ok(7));
        let s = &layer.stats()["DescribeNetworkInterfaces"];
        assert_eq!((s.calls, s.retries, s.throttles, s.errors), (4, 3, 2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_change_nobody_waits_for_is_not_retried_in_the_call() {
        let layer = quick(6);
        for (api, scoped, attempts) in [
            // A whole change by itself: handed back at once for its caller
            // to put off.
            ("UnassignPrivateIpAddresses", true, 1),
            ("AssignPrivateIpAddresses", true, 1),
            // A step of a chain: its caller has done the steps before.
            ("AttachNetworkInterface", true, 6),
            ("CreateNetworkInterface", true, 6),
            // Outside the scope, as every throttle: retried.
            ("UnassignPrivateIpAddresses", false, 6),
        ] {
            let n = AtomicU32::new(0);
            let f = || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(ProviderError::throttled(api))
            };
            let (r, back) = if scoped {
                nobody_waits(layer.call(api, f)).await
            } else {
                (layer.call(api, f).await, false)
            };
            assert!(matches!(r, Err(ProviderError::Throttled { .. })), "{r:?}");
            assert_eq!(n.load(Ordering::SeqCst), attempts, "{api} {scoped}");
            // Said handed back only where it was: a chain's step
            // throttled to the end is not.
            assert_eq!(back, attempts == 1, "{api} {scoped}");
        }
        // A change that succeeds in the scope is unaffected.
        let r = nobody_waits(layer.call("UnassignPrivateIpAddresses", || async { Ok(3) })).await;
        assert_eq!(r, (Ok(3), false));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ambiguous_failure_is_repeated_only_where_that_is_safe() {
        let layer = quick(6);
        for (api, idempotent, attempts) in [
            // A timeout may have assigned or released: not repeated.
            ("AssignPrivateIpAddresses", false, 1),
            ("UnassignPrivateIpAddresses", false, 1),
            ("CreateNetworkInterface", false, 1),
            // Unless the caller made it idempotent (a client token).
            ("CreateNetworkInterface", true, 6),
            // Reads and deletes end in the same state when repeated.
            ("DescribeInstances", false, 6),
            ("DeleteNetworkInterface", false, 6),
        ] {
            let n = AtomicU32::new(0);
            let f = || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(ProviderError::Timeout { api: api.into() })
            };
            let repeat = if idempotent {
                Repeat::Always
            } else {
                Repeat::IfSafe
            };
            let r = layer.call_with(api, repeat, f).await;
            assert!(matches!(r, Err(ProviderError::Timeout { .. })));
            assert_eq!(n.load(Ordering::SeqCst), attempts, "{api} {idempotent}");
        }
        let n = AtomicU32::new(0);
        let r = layer
            .call("AssignPrivateIpAddresses", || async {
                match n.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(ProviderError::throttled("x")),
                    _ => Ok(()),
                }
            })
            .await;
        assert_eq!(
            r,
            Ok(()),
            "a throttled Assign (never carried out) is retried"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_and_the_last_attempt_are_returned() {
        let layer = quick(3);
        let n = AtomicU32::new(0);
        let r: Result<()> = layer
            .call("CreateNetworkInterface", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(ProviderError::SubnetExhausted {
                    subnet: "subnet-1".into(),
                })
            })
            .await;
        assert!(matches!(r, Err(ProviderError::SubnetExhausted { .. })));
        assert_eq!(n.load(Ordering::SeqCst), 1, "a full subnet is not retried");
        let r: Result<()> = layer
            .call("DescribeInstances", || async {
                Err(ProviderError::throttled("x"))
            })
            .await;
        assert!(matches!(r, Err(ProviderError::Throttled { .. })));
        assert_eq!(layer.stats()["DescribeInstances"].calls, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_is_waited_out_before_the_next_attempt() {
        let layer = quick(6);
        let n = AtomicU32::new(0);
        let t0 = Instant::now();
        let r = layer
            .call("NetworkInterfaces_Get", || async {
                match n.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(ProviderError::Throttled {
                        api: "NetworkInterfaces_Get".into(),
                        retry_after_ms: Some(7_000),
                    }),
                    _ => Ok(()),
                }
            })
            .await;
        assert_eq!(r, Ok(()));
        // The policy alone would wait at most 100 ms here.
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_secs(7) && waited < Duration::from_secs(8),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_and_stay_under_the_cap() {
        let p = RetryPolicy::default();
        for attempt in 1..20 {
            let d = p.delay(attempt);
            let full = p.base.saturating_mul(1 << (attempt - 1).min(16)).min(p.cap);
            assert!(d <= full && d >= full / 2, "attempt {attempt}: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_grow_for_an_add_takes_a_grow_buckets_reserve_once_a_step() {
        // 2,000 nodes: one Assign and one Create per 400 s. After an idle
        // hour each bucket holds its call and, beyond it, one in reserve.
        let layer = CallLayer::ec2();
        layer.set_peers(2000);
        let (assign, create) = ("AssignPrivateIpAddresses", "CreateNetworkInterface");
        let ok = || async { Ok(()) };
        layer.call(assign, ok).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let took = |t: Instant| t.elapsed();
        let at_once = Duration::from_secs(1);
        // The buckets' calls, at once.
        let t = Instant::now();
        layer.call(assign, ok).await.unwrap();
        layer.call(create, ok).await.unwrap();
        assert!(took(t) < at_once, "{:?}", took(t));
        // A call not for an ADD would wait for the bucket's next call.
        let outside = tokio::time::timeout(at_once, layer.call(assign, ok)).await;
        assert!(outside.is_err(), "not for an ADD");
        // The grows of one step ADDs wait for: the first takes its
        // bucket's reserve at once, and so does a second grow on another
        // bucket; a second call on the same bucket waits.
        let step = ReservesTaken::default();
        let t = Instant::now();
        for_an_add(&step, layer.call(assign, ok)).await.unwrap();
        for_an_add(&step, layer.call(create, ok)).await.unwrap();
        assert!(took(t) < at_once, "{:?}", took(t));
        let t = Instant::now();
        for_an_add(&step, layer.call(assign, ok)).await.unwrap();
        assert!(took(t) >= Duration::from_secs(399), "{:?}", took(t));
        // Idle again until Create's bucket is full and its reserve too:
        // within the same step its reserve is not taken again, in the
        // next step it is.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let t = Instant::now();
        for_an_add(&step, layer.call(create, ok)).await.unwrap();
        assert!(took(t) < at_once, "the bucket's own call");
        let again = tokio::time::timeout(at_once, for_an_add(&step, layer.call(create, ok))).await;
        assert!(again.is_err(), "the step took Create's reserve already");
        let next = ReservesTaken::default();
        let t = Instant::now();
        for_an_add(&next, layer.call(create, ok)).await.unwrap();
        assert!(took(t) < at_once, "{:?}", took(t));
    }

    #[tokio::test(start_paused = true)]
    async fn the_client_bucket_makes_a_burst_wait_instead_of_failing() {
        let layer = CallLayer::ec2();
        let t0 = Instant::now();
        for _ in 0..60 {
            layer
                .call("AttachNetworkInterface", || async { Ok(()) })
                .await
                .unwrap();
        }
        // Burst 50, refill 5/s: the last 10 waited about 2 s in all.
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
            "{took:?}"
        );
        let s = &layer.stats()["AttachNetworkInterface"];
        assert_eq!((s.calls, s.bucket_waits), (60, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn imds_calls_take_nothing_from_the_account_budget() {
        let layer = CallLayer::ec2();
        layer.set_peers(2000);
        let t0 = Instant::now();
        for _ in 0..100 {
            layer
                .call("IMDS_Instance", || async { Ok(()) })
                .await
                .unwrap();
        }
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(layer.stats()["IMDS_Instance"].bucket_waits, 0);
        // Two EC2 calls at a 2,000th share: the second waits a refill
        // period (400 s at 5/s), asking again every MAX_WAIT.
        for _ in 0..2 {
            layer
                .call("AttachNetworkInterface", || async { Ok(()) })
                .await
                .unwrap();
        }
        assert!(
            t0.elapsed() >= Duration::from_secs(399),
            "{:?}",
            t0.elapsed()
        );
        assert!(layer.stats()["AttachNetworkInterface"].bucket_waits >= 1);
    }
}
