//! EC2's per-API token buckets, on tokio's clock so that simulations under a
//! paused clock are deterministic.

use std::collections::HashMap;

use tokio::time::Instant;

/// Burst and refill per second of one API's bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketSpec {
    pub burst: f64,
    pub refill_per_sec: f64,
}

/// AWS's documented bucket for an EC2 API ("Request throttling for the Amazon
/// EC2 API").
pub fn ec2_bucket(api: &str) -> BucketSpec {
    let (burst, refill_per_sec) = match api {
        "AssignPrivateIpAddresses"
        | "AssignIpv6Addresses"
        | "CreateNetworkInterface"
        | "DeleteNetworkInterface"
        | "ModifyNetworkInterfaceAttribute" => (100.0, 5.0),
        "CreateTags" | "DeleteTags" => (100.0, 10.0),
        // Filtered or paginated non-mutating calls, which is all we make.
        a if a.starts_with("Describe") => (100.0, 20.0),
        // Other mutating actions: Attach/Detach/Unassign, ...
        _ => (50.0, 5.0),
    };
    BucketSpec {
        burst,
        refill_per_sec,
    }
}

/// Azure Resource Manager's per-subscription buckets, keyed by
/// [`ARM_READS`] and [`ARM_WRITES`] ("Understand how Azure Resource Manager
/// throttles requests": a token bucket per subscription and region, reads
/// 250 burst refilled at 25 per second, writes 200 refilled at 10 per
/// second). Any other key is counted as a read.
pub fn arm_bucket(api: &str) -> BucketSpec {
    let (burst, refill_per_sec) = if api == ARM_WRITES {
        (200.0, 10.0)
    } else {
        (250.0, 25.0)
    };
    BucketSpec {
        burst,
        refill_per_sec,
    }
}

/// The key of ARM's read bucket (GET) in [`arm_bucket`].
pub const ARM_READS: &str = "reads";
/// The key of ARM's write bucket (PUT, PATCH, DELETE) in [`arm_bucket`].
pub const ARM_WRITES: &str = "writes";

#[derive(Debug)]
struct Bucket {
    spec: BucketSpec,
    tokens: f64,
    at: Instant,
    /// Refill and burst in force: the spec's, or less after throttling
    /// (adaptive buckets only).
    rate: f64,
    burst: f64,
    /// A share under one call sat full (more refilled than it holds):
    /// the node's phase is lost, and every node idle alike would call at
    /// once. The next call draws a new phase ([`Buckets::try_take`]).
    idle: bool,
    /// When a share under one call last became full (more refilled than
    /// it holds); `None` while it is not full. A change put off
    /// ([`Buckets::put_off`]) to a bucket full for a while draws a phase.
    full_since: Option<Instant>,
    /// Until when a change nobody waits for is put off
    /// ([`Buckets::put_off`]).
    not_before: Option<Instant>,
    /// A call that grows a pool ([`is_grow`]): its share is of the nodes
    /// that grow ([`Buckets::set_growers`]).
    grow: bool,
    /// Calls refilled beyond the full bucket and kept for a grow an ADD
    /// waits for, up to [`GROW_RESERVE`] ([`Buckets::reserve_of`]).
    reserve: f64,
}

/// A random part of one call, in thousandths (seeded in simulations).
fn random_part() -> f64 {
    crate::jitter::between(0, 1000) as f64 / 1000.0
}

/// Calls refilled beyond a full bucket after which a share under one call
/// counts as idle ([`Bucket::idle`]): a caller woken as its token came
/// finds the bucket just full, not idle.
const IDLE_SLACK: f64 = 0.01;

/// Calls that give back what the pool no longer needs: never urgent, so a
/// node's saved token does not send them at once (see [`Bucket::idle`]).
fn is_release(api: &str) -> bool {
    matches!(
        api,
        "UnassignPrivateIpAddresses"
            | "UnassignIpv6Addresses"
            | "DetachNetworkInterface"
            | "DeleteNetworkInterface"
    )
}

/// Calls that grow a pool (and the chain that follows a create): only
/// the nodes that grow make them, so their share is of those nodes
/// ([`Buckets::set_growers`]).
pub fn is_grow(api: &str) -> bool {
    matches!(
        api,
        "AssignPrivateIpAddresses"
            | "AssignIpv6Addresses"
            | "CreateNetworkInterface"
            | "AttachNetworkInterface"
            | "ModifyNetworkInterfaceAttribute"
            | "CreateTags"
    )
}

/// `s` seconds (non-negative, finite).
fn secs(s: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(s.clamp(0.0, 1e9))
}

/// `s` seconds before `now` (`now` itself where that would be before the
/// clock's start).
fn before(now: Instant, s: f64) -> Instant {
    now.checked_sub(secs(s)).unwrap_or(now)
}

/// The shortest wait [`Buckets::take_or_wait`] asks for.
const MIN_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
/// The longest wait [`Buckets::take_or_wait`] asks for.
pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Seconds an adaptive bucket takes to climb back from its floor to its
/// share of the documented rate when nothing is throttled (additive
/// increase).
pub const RECOVER_SECS: f64 = 300.0;
/// The lowest fraction of its share of the documented rate an adaptive
/// bucket goes down to.
pub const MIN_SHARE: f64 = 1.0 / 2000.0;

/// A node that grows takes 1 / this of its equal share of the nodes that
/// grow ([`Buckets::set_growers`]): the rest is headroom for a count that
/// lags the nodes that start or stop growing and for the nodes' random
/// phases. In the 2,000-node simulation, a node's whole equal share
/// throttled 2.6-3.7% of the cold start's calls and half of it 1.1-1.7%,
/// with the cold start no longer (1.19-1.25× the floor); at 5,000 nodes
/// under prefix delegation 7% and 3% of the Assign calls. (Those runs
/// climbed to a larger share over [`RECOVER_SECS`].) With it applied at
/// once, a headroom of 1 while the count falls (when it lags above the
/// nodes that grow) took prefix delegation's cold start from 1.07-1.09×
/// to 1.03-1.04× but throttled 6-7% of the calls instead of 2.1%, and
/// 1.5 gave 1.08-1.09× with 3.2-3.3%.
pub const GROWERS_HEADROOM: f64 = 2.0;

/// Calls an adaptive grow bucket ([`is_grow`]) whose share is under one
/// call keeps, beyond being full, for a grow an ADD waits for: what
/// refills while the bucket is full goes there, up to this. Only the
/// calls of grows ADDs wait for take it, when the bucket is empty
/// ([`Buckets::take_reserve`]; the reconciler runs every grow of a step
/// that ADDs wait for under `providers::layer::for_an_add`, up to the
/// addresses those ADDs need, which lets each bucket's reserve be taken
/// once in the step, by whichever of its calls, a chain's Attach or a
/// retry included, first finds the bucket empty): not a grow made ahead
/// of demand ([`Buckets::put_off`]), nor a grow of the same step that the
/// plan adds for the warm target, nor their chain calls or retries. Under
/// churn a node's grows are rare and mostly made ahead of demand (its
/// warm target rising with the arrivals it saw): without the reserve, a
/// grow made ahead took the one call the node's share had saved, and an
/// ADD that found nothing free a minute later waited for the next call's
/// token (one per 400 s at 2,000 nodes) or an address's cooldown. Every
/// node idle alike holds one call more. When they all call together, a
/// throttled call empties the reserve with the bucket, so the event costs
/// the account about the calls of the nodes it did not throttle. But when
/// idle nodes start to grow spread over one refill period (pods scheduled
/// across the cluster over a few minutes), their first grows go through
/// and the reserves add a second call each within the period, which the
/// account throttles: a review's model of 2,000 nodes put it at about
/// 1,100-1,350 throttled calls where there were 0-425 without the
/// reserve. No `cluster-sim` phase has that shape yet.
///
/// In the 2,000-node simulation (`cluster-sim`, seed 1) the longest ADD
/// wait under churn went from 15.6 s to 0 s in the adaptive mode and
/// from 2.0 s to 0 s under WARM_IP_TARGET, and the adaptive cold start
/// from 1.18× to 1.16× its floor. Also putting off a grow made ahead
/// until the reserve of a bucket that sat full had filled took the
/// adaptive cold start to 1.27× (a node whose reconciler came a few
/// seconds after its token waited 400 s more), so it was not kept.
pub const GROW_RESERVE: f64 = 1.0;

/// Refill periods of the share a node had before a throttle (one call's
/// time at that rate) within which a throttled grow bucket ([`is_grow`])
/// whose share is under one call makes its next call, at a random point:
/// the throttle halves the rate for the calls after it, not the wait for
/// this one. Such a throttle is a collision (nodes' phases that met, a
/// pile of calls the account's burst did not cover), and spreading the
/// throttled nodes over half a period parts them. Starting over at a
/// random part of one call at the halved rate, as reads and releases
/// still do, made a grow wait up to two periods (800 s at 2,000 nodes):
/// in the cold start, the nodes whose second interface was throttled in
/// the last pile of Creates made its tail, and an interface created but
/// throttled on its Attach sat unattached for minutes.
///
/// In the 2,000-node simulation (`cluster-sim`, seed 1), the cold start
/// as a ratio to its floor, with 2 periods (before) / 1 / 0.75 / 0.5
/// here: adaptive 1.16 / 1.11 / 1.09 / 1.07, the default 1.19 / 1.09 /
/// 1.09 / 1.07, prefix delegation 1.07 / 1.05 / 1.05 / 1.04; the cold
/// start's throttled calls went from 1.7-2.1% to at most 2.8% / 3.4% /
/// 4.8% (prefix delegation's); 0.25 throttled 6.6%. Seeds 2 and 3 gave
/// the adaptive mode 1.07-1.08× at 0.5. At 5,000 nodes under prefix
/// delegation the cold start went from 1.06× to 1.02×, and its throttled
/// calls from 10.8% to 15.2% (12.8% at 1). Reads keep the old start over:
/// with it for them too, the start-up Describes throttled 5,543 times
/// (3,672 at 1) instead of about 2,500 at 5,000 nodes.
pub const THROTTLED_RETRY_WITHIN: f64 = 0.5;

/// Buckets keyed by API name: an account's (the cloud's side), or one
/// node's client-side view of it.
///
/// A client-side bucket may be *adaptive*. Its share of the account is
/// the documented rate and burst divided by the nodes that share the
/// account ([`Buckets::set_peers`], the cluster's node count; 1 when
/// unknown), the burst never below one call. On a throttled answer the node
/// halves its rate and burst (multiplicative decrease) and empties the
/// bucket; without throttling the rate climbs back linearly, over
/// [`RECOVER_SECS`], to its share (additive increase). Nodes thus share the
/// account's budget without a central operator: the node count is the
/// prior that keeps 2,000 nodes joining together from each spending the
/// account's whole burst (where one throttle per node would already be
/// most of their calls), and halving covers what the count misses (other
/// callers of the account, a count not yet refreshed).
///
/// When a share's burst is under one call, a node's buckets start filled
/// to a random part of one call (one draw for all its APIs, so a chain
/// such as Create, Attach follows without a wait between), so that nodes
/// that join together spread their first calls over one refill period
/// instead of sending them at once; a throttled bucket starts over at a
/// new random part of its own, or a grow at a random point of half a
/// period of the share it had ([`THROTTLED_RETRY_WITHIN`]). A release
/// (Unassign, Detach, Delete) is never urgent: when its bucket has sat
/// full, the node's saved token is not spent on it at once (every node
/// idle alike would send its release in the same second after a
/// cluster-wide scale down); it goes at once with the chance of the
/// share's burst, else after a random part of one refill period. Grows
/// and reads keep the saved token. A change no ADD waits for is asked
/// about first ([`Buckets::put_off`]): it waits for a token outside the
/// call, and is spread the same way after an idle spell while the saved
/// token stays for a grow an ADD waits for. A grow bucket whose share is
/// under one call keeps, once full, one call more in reserve
/// ([`GROW_RESERVE`]) that only a grow an ADD waits for takes.
#[derive(Debug)]
pub struct Buckets {
    spec: fn(&str) -> BucketSpec,
    adaptive: bool,
    buckets: HashMap<String, Bucket>,
    /// Nodes sharing the account, at least 1.
    peers: f64,
    /// Nodes growing their pools ([`Buckets::set_growers`]), at least 1;
    /// `None`: not known, all [`Buckets::peers`] count.
    growers: Option<f64>,
    /// The start fill, in calls, of a bucket whose share's burst is under
    /// one call; drawn once.
    phase: f64,
    /// When the first bucket was made: tokens a later bucket would have
    /// gathered since are in its start fill.
    born: Option<Instant>,
    /// When idle releases last started over ([`Buckets::try_take`]): for
    /// two refill periods after, a release bucket is not idle, so that a
    /// chain (Detach, the Describe polls until it is detached, Delete)
    /// follows on the phase drawn for its first call.
    rephased_at: Option<Instant>,
}

impl Default for Buckets {
    /// EC2's buckets ([`ec2_bucket`]).
    fn default() -> Self {
        Self::with_spec(ec2_bucket)
    }
}

impl Buckets {
    /// Buckets sized per API by `spec`.
    pub fn with_spec(spec: fn(&str) -> BucketSpec) -> Self {
        Self {
            spec,
            adaptive: false,
            buckets: HashMap::new(),
            peers: 1.0,
            growers: None,
            phase: 1.0,
            born: None,
            rephased_at: None,
        }
    }

    /// The nodes a bucket's account budget is shared by: for a grow call
    /// ([`is_grow`]), [`GROWERS_HEADROOM`] × the nodes that grow when known
    /// (at most every node), else every node.
    fn divisor(&self, grow: bool) -> f64 {
        match self.growers {
            Some(g) if grow => (g * GROWERS_HEADROOM).min(self.peers),
            _ => self.peers,
        }
    }

    /// The reserve a bucket of `api`'s kind keeps beyond being full (see
    /// [`GROW_RESERVE`]), its share's burst being `share_burst`.
    fn reserve_of(&self, grow: bool, share_burst: f64) -> f64 {
        if self.adaptive && grow && share_burst < 1.0 {
            GROW_RESERVE
        } else {
            0.0
        }
    }

    /// The rate and burst of one node's share of `spec`.
    fn share(&self, spec: BucketSpec, grow: bool) -> (f64, f64) {
        let d = self.divisor(grow);
        (spec.refill_per_sec / d, (spec.burst / d).max(1.0))
    }

    /// `nodes` share the account (an adaptive bucket's prior, see the
    /// type's documentation; 0 counts as 1). Buckets already made are cut
    /// to the new share (a node halved by throttling below it stays
    /// there), or climb to a larger one as after a throttle.
    pub fn set_peers(&mut self, nodes: u32, now: Instant) {
        let n = f64::from(nodes.max(1));
        if !self.adaptive || n == self.peers {
            return;
        }
        self.reshare(now, false, |b| b.peers = n);
    }

    /// `nodes` of the account's nodes grow their pools now (`None`: not
    /// known): a grow call's share ([`is_grow`]) is of those, at most of
    /// every node ([`Buckets::set_peers`]). When the nodes still growing
    /// after a cluster-wide cold start are few, they get the account's
    /// budget that the nodes already done no longer use. The new share
    /// applies at once, both ways, at the fraction of its share the
    /// node's throttling left it (a node halved once gets half the new
    /// share, and climbs from there over [`RECOVER_SECS`]; a count that
    /// rises and falls back leaves it where it was): a count that falls
    /// lags above the nodes that still grow, so the larger share is, if
    /// anything, still too small.
    /// In the 2,000-node simulation (seed 1), climbing to it instead over
    /// [`RECOVER_SECS`] (longer than the tail) left the last nodes of a
    /// cold start part of the account's budget: prefix delegation's cold
    /// start took 1.19× its floor, 1.13× raised at once, and 1.07× with
    /// the count's lag cut too (`ipamd::k8s::growers::GROWS_WITHIN`);
    /// 1.7% of its calls were throttled before, 2.1% after.
    pub fn set_growers(&mut self, nodes: Option<u32>, now: Instant) {
        let g = nodes.map(|n| f64::from(n.max(1)));
        if !self.adaptive || g == self.growers {
            return;
        }
        self.reshare(now, true, |b| b.growers = g);
    }

    /// Brings every bucket up to `now`, applies `change` to the sharing,
    /// and cuts the buckets to their new share; with `scale`, each bucket
    /// keeps the fraction of its share it had (its rate, and its burst
    /// above one call, are that fraction of the new share's).
    fn reshare(&mut self, now: Instant, scale: bool, change: impl FnOnce(&mut Self)) {
        let apis: Vec<String> = self.buckets.keys().cloned().collect();
        for api in &apis {
            self.bucket(api, now);
        }
        let was: Vec<f64> = apis
            .iter()
            .map(|api| self.share(self.buckets[api].spec, self.buckets[api].grow).0)
            .collect();
        change(self);
        for (api, was_rate) in apis.into_iter().zip(was) {
            let (rate, burst) = self.share(self.buckets[&api].spec, self.buckets[&api].grow);
            let b = self.buckets.get_mut(&api).expect("listed");
            if scale && rate != was_rate && was_rate > 0.0 {
                // Throttling halves rate and burst alike: the rate's
                // fraction is the node's (a burst held at one call
                // hides it).
                let fraction = (b.rate / was_rate).min(1.0);
                b.rate = rate * fraction;
                b.burst = (burst * fraction).max(1.0);
            }
            b.rate = b.rate.min(rate);
            b.burst = b.burst.min(burst);
            b.tokens = b.tokens.min(b.burst);
            // A time drawn for a smaller share is not kept beyond one
            // period of the new one.
            let period = secs(1.0 / rate);
            b.not_before = b.not_before.map(|t| t.min(now + period));
        }
    }

    /// The nodes this one believes share the account.
    pub fn peers(&self) -> u32 {
        self.peers as u32
    }

    /// Client-side buckets sized by `spec` that adapt to throttling (see
    /// the type's documentation).
    pub fn adaptive(spec: fn(&str) -> BucketSpec) -> Self {
        Self {
            adaptive: true,
            phase: random_part(),
            ..Self::with_spec(spec)
        }
    }

    fn bucket(&mut self, api: &str, now: Instant) -> &mut Bucket {
        if !self.buckets.contains_key(api) {
            let spec = (self.spec)(api);
            let grow = is_grow(api);
            let (rate, burst) = self.share(spec, grow);
            let d = self.divisor(grow);
            let born = *self.born.get_or_insert(now);
            let filled = self.phase + now.saturating_duration_since(born).as_secs_f64() * rate;
            let tokens = if spec.burst / d >= 1.0 {
                burst
            } else {
                filled.min(burst)
            };
            let reserve = (filled - burst).clamp(0.0, self.reserve_of(grow, spec.burst / d));
            self.buckets.insert(
                api.to_string(),
                Bucket {
                    spec,
                    tokens,
                    at: now,
                    rate,
                    burst,
                    idle: self.may_idle(api, spec, rate, now) && filled > burst + IDLE_SLACK,
                    full_since: (spec.burst / d < 1.0 && filled >= burst)
                        .then(|| before(now, (filled - burst) / rate)),
                    not_before: None,
                    grow,
                    reserve,
                },
            );
        }
        let adaptive = self.adaptive;
        let (spec, grow) = (self.buckets[api].spec, self.buckets[api].grow);
        let (rate, burst) = self.share(spec, grow);
        let d = self.divisor(grow);
        let may_idle = self.may_idle(api, spec, rate, now);
        let reserve = self.reserve_of(grow, spec.burst / d);
        let b = self.buckets.get_mut(api).expect("just made");
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        if adaptive {
            b.rate = (b.rate + elapsed * rate / RECOVER_SECS).min(rate);
            b.burst = (b.burst + elapsed * burst / RECOVER_SECS).min(burst);
        }
        let filled = b.tokens + elapsed * b.rate;
        b.idle = may_idle && (b.idle || filled > b.burst + IDLE_SLACK);
        if filled < b.burst || b.spec.burst / d >= 1.0 {
            b.full_since = None;
        } else if b.full_since.is_none() {
            b.full_since = Some(before(now, (filled - b.burst) / b.rate));
        }
        b.reserve = (b.reserve + (filled - b.burst).max(0.0)).min(reserve);
        b.tokens = filled.min(b.burst);
        b.at = now;
        b
    }

    /// The cloud throttled a call to `api`: an adaptive bucket halves its
    /// rate and burst and empties; others do nothing.
    pub fn throttled(&mut self, api: &str, now: Instant) {
        if !self.adaptive {
            return;
        }
        let peers = self.peers;
        let d = self.divisor(is_grow(api));
        let b = self.bucket(api, now);
        let had = b.rate;
        b.rate = (b.rate / 2.0).max(b.spec.refill_per_sec / peers * MIN_SHARE);
        b.burst = (b.burst / 2.0).max(1.0);
        b.reserve = 0.0;
        b.tokens = if b.spec.burst / d >= 1.0 {
            b.tokens.min(0.0)
        } else {
            // A share under one call: nodes throttled together (all full
            // when a cluster-wide event came) would otherwise refill and
            // call together again; each starts over at a random part of
            // one call (a read or a release), or a grow at a random point
            // of THROTTLED_RETRY_WITHIN periods of the share it had (at
            // the halved rate, the missing part of one call takes that
            // long).
            if b.grow {
                // (A rate below its floor, left by a node count that
                // fell, is raised by the halving: at most one period.)
                1.0 - random_part() * THROTTLED_RETRY_WITHIN * (b.rate / had).min(1.0)
            } else {
                random_part()
            }
        };
    }

    /// Whether `api`'s bucket (share `rate`) can be idle now: a release
    /// whose share's burst is under one call, not within two refill
    /// periods of the last start over.
    fn may_idle(&self, api: &str, spec: BucketSpec, rate: f64, now: Instant) -> bool {
        is_release(api)
            && spec.burst / self.peers < 1.0
            && self
                .rephased_at
                .is_none_or(|t| now.saturating_duration_since(t).as_secs_f64() * rate >= 2.0)
    }

    /// A call came to an idle bucket (see [`Bucket::idle`]): the node
    /// takes it at once with the chance of the share's burst (so that the
    /// nodes idle alike send about the account's burst together), else
    /// starts over at a random part of one call. Its other idle buckets
    /// start over at the same part, so that a chain (Detach, Delete)
    /// follows without a second wait.
    fn rephase_idle(&mut self, api: &str, now: Instant) {
        let share_burst = self.buckets[api].spec.burst / self.divisor(self.buckets[api].grow);
        let start = (random_part() + share_burst).min(1.0);
        // Every bucket brought up to now first (which flags the idle
        // ones), then the start over, which stops flagging for a while.
        let apis: Vec<String> = self.buckets.keys().cloned().collect();
        for other in &apis {
            self.bucket(other, now);
        }
        self.rephased_at = Some(now);
        for b in self.buckets.values_mut().filter(|b| b.idle) {
            b.idle = false;
            b.tokens = start.min(b.burst);
        }
    }

    /// The refill rate in force for `api`, per second.
    pub fn rate(&mut self, api: &str, now: Instant) -> f64 {
        self.bucket(api, now).rate
    }

    /// Takes a token for `api` if there is one; otherwise says how long
    /// to wait before asking again (until there will be one at the rate in
    /// force, at most [`MAX_WAIT`]): a client waits instead of being
    /// throttled by the cloud.
    pub fn take_or_wait(&mut self, api: &str, now: Instant) -> Option<std::time::Duration> {
        if self.take(api, now) {
            return None;
        }
        let b = &self.buckets[api];
        let missing = 1.0 - b.tokens;
        // At least a millisecond: a wait rounded down to nothing would
        // spin without the clock moving. At most MAX_WAIT: an adaptive
        // bucket's rate climbs meanwhile, so the caller asks again.
        Some(std::time::Duration::from_secs_f64(missing / b.rate).clamp(MIN_WAIT, MAX_WAIT))
    }

    /// For a grow an ADD waits for, when `api`'s bucket has no token
    /// ([`Buckets::take_or_wait`] said to wait): takes a call from its
    /// reserve ([`GROW_RESERVE`]); false when it has none or the bucket
    /// has a token (which the caller takes instead).
    pub fn take_reserve(&mut self, api: &str, now: Instant) -> bool {
        let b = self.bucket(api, now);
        if b.tokens < 1.0 - 1e-9 && b.reserve >= 1.0 - 1e-9 {
            b.reserve = (b.reserve - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// Takes a token for `api`; false means the call is throttled.
    pub fn try_take(&mut self, api: &str, now: Instant) -> bool {
        self.take(api, now)
    }

    fn take(&mut self, api: &str, now: Instant) -> bool {
        if self.bucket(api, now).idle {
            self.rephase_idle(api, now);
        }
        let b = self.bucket(api, now);
        // A token refilled to within rounding of one is one.
        if b.tokens >= 1.0 - 1e-9 {
            b.tokens = (b.tokens - 1.0).max(0.0);
            b.full_since = None;
            b.not_before = None;
            true
        } else {
            false
        }
    }

    /// A call to `api` that nobody waits for (a pool change ahead of
    /// demand): how long to put it off, or `None` to make it now. Asked
    /// before the call, which then takes its token as any other.
    ///
    /// It is put off until the bucket has a token, instead of waiting for
    /// one in the call and holding up a change an ADD does wait for. When
    /// the node's share is under one call and the bucket has sat full
    /// (nodes idle alike after a cluster-wide event would all call in the
    /// same second), it goes at once only with the chance of the share's
    /// burst, otherwise at a random part of one refill period; unlike a
    /// release's start over ([`Buckets::try_take`]), the saved token stays,
    /// for a change an ADD waits for. A time drawn is kept until a token
    /// is taken, or until one period after it passed without a call (the
    /// change was no longer needed): a change put off does not lose its
    /// turn by being asked about again.
    pub fn put_off(&mut self, api: &str, now: Instant) -> Option<std::time::Duration> {
        if self.bucket(api, now).idle {
            // A release: its start over, now rather than inside the call.
            self.rephase_idle(api, now);
        }
        let share_burst = self.buckets[api].spec.burst / self.divisor(self.buckets[api].grow);
        let b = self.bucket(api, now);
        let drawn = match b.not_before {
            Some(t) if now < t => return Some(t - now),
            Some(t) => {
                b.not_before = None;
                now.saturating_duration_since(t).as_secs_f64() * b.rate < 1.0
            }
            None => false,
        };
        if b.tokens < 1.0 - 1e-9 {
            let wait = secs((1.0 - b.tokens) / b.rate).max(MIN_WAIT);
            b.not_before = Some(now + wait);
            return Some(wait);
        }
        let sat_full = b
            .full_since
            .is_some_and(|t| now.saturating_duration_since(t).as_secs_f64() * b.rate > IDLE_SLACK);
        // A release's idle bucket started over above.
        if drawn || !sat_full || is_release(api) {
            return None;
        }
        b.full_since = None;
        if random_part() < share_burst {
            return None;
        }
        let wait = secs(random_part() / b.rate).max(MIN_WAIT);
        b.not_before = Some(now + wait);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_rate() {
        let mut b = Buckets::default();
        let t0 = Instant::now();
        let taken = (0..150)
            .filter(|_| b.try_take("AttachNetworkInterface", t0))
            .count();
        assert_eq!(taken, 50, "attach burst is 50");
        // One second later five more tokens, not more.
        let t1 = t0 + Duration::from_secs(1);
        let taken = (0..20)
            .filter(|_| b.try_take("AttachNetworkInterface", t1))
            .count();
        assert_eq!(taken, 5);
        // Buckets are per API: assign still has its own burst of 100.
        let taken = (0..150)
            .filter(|_| b.try_take("AssignPrivateIpAddresses", t1))
            .count();
        assert_eq!(taken, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_bucket_halves_on_throttling_and_climbs_back() {
        let mut b = Buckets::adaptive(ec2_bucket);
        let t0 = Instant::now();
        let api = "CreateNetworkInterface"; // 100 burst, 5/s
        assert_eq!(b.rate(api, t0), 5.0);
        b.throttled(api, t0);
        b.throttled(api, t0);
        assert_eq!(b.rate(api, t0), 1.25, "halved twice");
        assert!(!b.try_take(api, t0), "emptied");
        // A token comes at the reduced rate: 1 / 1.25 s, give or take the
        // climb.
        let wait = b.take_or_wait(api, t0).unwrap();
        assert!(wait <= Duration::from_millis(800), "{wait:?}");
        // RECOVER_SECS without throttling: back to the documented rate.
        let t1 = t0 + Duration::from_secs(RECOVER_SECS as u64 + 1);
        assert_eq!(b.rate(api, t1), 5.0);
        // The floor: never below MIN_SHARE of the documented rate.
        for _ in 0..64 {
            b.throttled(api, t1);
        }
        assert_eq!(b.rate(api, t1), 5.0 * MIN_SHARE);
        // The account's own buckets do not adapt.
        let mut acct = Buckets::default();
        acct.throttled(api, t0);
        assert_eq!(acct.rate(api, t0), 5.0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_nodes_release_over_one_period_not_at_once() {
        // 2,000 nodes, idle for an hour (their buckets full), then each
        // wants to give addresses back (a cluster-wide scale down) and to
        // grow. Releases: about the account's burst (50) at once, the rest
        // spread over one refill period (400 s at 1/400 per second); a
        // grow still takes the node's saved token at once.
        let (release, grow) = ("UnassignPrivateIpAddresses", "AssignPrivateIpAddresses");
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        crate::jitter::seed_this_thread(11);
        let (mut at_once, mut first_half, mut grows) = (0, 0, 0);
        for node in 0..2000 {
            let mut b = Buckets::adaptive(ec2_bucket);
            b.set_peers(2000, t0);
            // Born at t0.
            b.try_take("DescribeInstances", t0);
            // A grow bucket made before the idle hour: its saved token
            // is not touched by the releases' start over.
            b.bucket(grow, t0);
            if node % 2 == 0 {
                // A release bucket used before, idle since.
                b.bucket(release, t0).tokens = 1.0;
                assert!(b.try_take(release, t0));
            }
            if b.try_take(release, later) {
                at_once += 1;
            } else {
                let mut now = later;
                while let Some(w) = b.take_or_wait(release, now) {
                    now += w;
                }
                let waited = now - later;
                assert!(waited <= Duration::from_secs(401), "{waited:?}");
                first_half += usize::from(waited < Duration::from_secs(200));
            }
            grows += usize::from(b.try_take(grow, later));
        }
        assert!((20..=100).contains(&at_once), "{at_once} released at once");
        assert!(
            (800..=1200).contains(&first_half),
            "{first_half} in the first half period"
        );
        assert_eq!(grows, 2000, "a grow keeps the saved token");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_put_off_keeps_its_token_and_idle_nodes_spread_theirs() {
        // 2,000 nodes, idle for an hour after a grow each (their Assign
        // buckets full), then each wants to grow ahead of demand (no ADD
        // waiting): about the share's burst chance (5%) goes at once, the
        // rest at a random point of one refill period (400 s); a node
        // whose grow is put off still takes its token at once for an ADD.
        let grow = "AssignPrivateIpAddresses";
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        crate::jitter::seed_this_thread(5);
        let (mut at_once, mut first_half) = (0, 0);
        for node in 0..2000 {
            let mut b = Buckets::adaptive(ec2_bucket);
            b.set_peers(2000, t0);
            b.bucket(grow, t0).tokens = 1.0;
            assert!(b.try_take(grow, t0));
            match b.put_off(grow, later) {
                None => at_once += 1,
                Some(w) => {
                    assert!(w <= Duration::from_secs(400), "{w:?}");
                    first_half += usize::from(w < Duration::from_secs(200));
                    // Asked again later, the same time: not a new draw.
                    let again = b.put_off(grow, later + Duration::from_millis(1500));
                    assert_eq!(
                        again.map(|a| a + Duration::from_millis(1500)),
                        Some(w).filter(|w| *w > Duration::from_millis(1500)),
                    );
                    if node % 2 == 0 {
                        // Its time comes: made then.
                        assert_eq!(b.put_off(grow, later + w), None);
                        assert!(b.try_take(grow, later + w));
                    } else {
                        // An ADD waits meanwhile: the saved token is there.
                        assert!(b.try_take(grow, later + w / 2), "token kept");
                    }
                }
            }
        }
        assert!((50..=160).contains(&at_once), "{at_once} at once");
        assert!(
            (800..=1100).contains(&first_half),
            "{first_half} in the first half period"
        );
        // A bucket without a token: put off until it has one, which it
        // then takes; a drawn time that passed unused goes stale.
        let mut b = Buckets::adaptive(ec2_bucket);
        b.set_peers(2000, t0);
        b.bucket(grow, t0).tokens = 1.0;
        assert!(b.try_take(grow, t0));
        let w = b.put_off(grow, t0).expect("no token");
        assert!(
            (Duration::from_secs(399)..=Duration::from_secs(400)).contains(&w),
            "{w:?}"
        );
        assert_eq!(b.put_off(grow, t0 + w), None);
        assert!(b.try_take(grow, t0 + w));
        // A time drawn for 2,000 nodes is cut to one period of the share
        // when the cluster shrinks to 10 (a call every 2 s).
        let mut shrinking = Buckets::adaptive(ec2_bucket);
        shrinking.set_peers(2000, t0);
        shrinking.bucket(grow, t0).tokens = 1.0;
        assert!(shrinking.try_take(grow, t0));
        assert!(shrinking.put_off(grow, later).is_some());
        shrinking.set_peers(10, later);
        let cut = shrinking.put_off(grow, later).expect("still drawn");
        assert!(cut <= Duration::from_secs(2), "{cut:?}");
        // One node, a full share of 100: never put off with tokens.
        let mut one = Buckets::adaptive(ec2_bucket);
        assert_eq!(one.put_off(grow, t0), None);
        assert_eq!(one.put_off(grow, later), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grow_an_add_waits_for_finds_the_reserve_that_a_grow_made_ahead_leaves() {
        // 2,000 nodes: a grow call's share is one call per 400 s, its
        // burst one call.
        let grow = "AssignPrivateIpAddresses";
        let t0 = Instant::now();
        let mut b = Buckets::adaptive(ec2_bucket);
        b.set_peers(2000, t0);
        b.bucket(grow, t0).tokens = 1.0;
        assert!(b.try_take(grow, t0));
        // Just full again: nothing reserved yet, one call.
        let full = t0 + Duration::from_secs(400);
        assert_eq!(b.put_off(grow, full), None);
        assert!(b.try_take(grow, full));
        assert!(b.take_or_wait(grow, full).is_some());
        assert!(!b.take_reserve(grow, full), "nothing refilled beyond full");
        // Full, then idle for an hour: one call reserved, not more.
        let idle = full + Duration::from_secs(400 + 3600);
        assert_eq!(b.bucket(grow, idle).reserve, GROW_RESERVE);
        // A grow made ahead of demand takes the bucket's token (as a
        // change put off does when its time comes) and the next one is
        // put off for a token of the bucket's own: the reserve stays.
        assert!(b.try_take(grow, idle));
        let w = b.put_off(grow, idle).expect("put off");
        assert!(w >= Duration::from_secs(399), "{w:?}");
        // A minute later: a call not for an ADD (such as the Attach or a
        // retry of a grow made ahead) finds nothing; an ADD's grow takes
        // the reserve at once, and the next waits for the bucket.
        let add = idle + Duration::from_secs(60);
        assert!(!b.try_take(grow, add), "not for an ADD");
        assert!(b.take_reserve(grow, add), "the reserve");
        assert!(!b.take_reserve(grow, add), "one call");
        assert_eq!(
            b.take_or_wait(grow, add),
            Some(Duration::from_secs(10)),
            "340 s to the bucket's token, asked again after MAX_WAIT"
        );
        // The bucket refills first; the reserve only after it is full.
        let refilled = idle + Duration::from_secs(400);
        assert!(b.try_take(grow, refilled));
        assert!(!b.take_reserve(grow, refilled + Duration::from_secs(1)));
        // A throttled call empties the reserve with the bucket.
        let mut throttled = Buckets::adaptive(ec2_bucket);
        throttled.set_peers(2000, t0);
        throttled.bucket(grow, t0);
        assert_eq!(throttled.bucket(grow, idle).reserve, GROW_RESERVE);
        throttled.throttled(grow, idle);
        assert_eq!(throttled.bucket(grow, idle).reserve, 0.0);
        // No reserve for reads and releases, for a share of one call or
        // more (ten nodes: ten calls), nor on the account's side (its
        // whole burst).
        let mut ten = Buckets::adaptive(ec2_bucket);
        ten.set_peers(10, t0);
        let mut account = Buckets::default();
        let reserved = |buckets: &mut Buckets, api: &str| {
            buckets.bucket(api, t0);
            buckets.bucket(api, idle).reserve
        };
        assert_eq!(reserved(&mut b, "DescribeNetworkInterfaces"), 0.0);
        assert_eq!(reserved(&mut b, "UnassignPrivateIpAddresses"), 0.0);
        assert_eq!(reserved(&mut ten, grow), 0.0);
        assert_eq!(reserved(&mut account, grow), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_chain_follows_its_first_call_and_a_large_share_is_never_idle() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        for seed in 0..20 {
            crate::jitter::seed_this_thread(seed);
            let mut b = Buckets::adaptive(ec2_bucket);
            b.set_peers(2000, t0);
            b.try_take("DescribeInstances", t0);
            // Detach after an idle hour: its own random wait, then Delete
            // 30 s later (the polls until detached) goes at once.
            let mut now = later;
            while let Some(w) = b.take_or_wait("DetachNetworkInterface", now) {
                now += w;
            }
            now += Duration::from_secs(30);
            assert!(
                b.try_take("DeleteNetworkInterface", now),
                "seed {seed}: Delete waited a second phase"
            );
            // Ten nodes: a share of 5 calls, nothing idle, released at once.
            let mut b = Buckets::adaptive(ec2_bucket);
            b.set_peers(10, t0);
            b.try_take("DescribeInstances", t0);
            assert!(b.try_take("UnassignPrivateIpAddresses", later));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_takes_its_share_of_the_account_and_joins_at_a_random_phase() {
        let api = "CreateNetworkInterface"; // 100 burst, 5/s
        let t0 = Instant::now();
        // Three nodes: a third of the rate and of the burst, which starts
        // full (three full bursts are the account's one).
        crate::jitter::seed_this_thread(3);
        let mut b = Buckets::adaptive(ec2_bucket);
        b.set_peers(3, t0);
        assert_eq!(b.peers(), 3);
        assert!((b.rate(api, t0) - 5.0 / 3.0).abs() < 1e-12);
        let taken = (0..100).filter(|_| b.try_take(api, t0)).count();
        assert_eq!(taken, 33);
        // 2,000 nodes: a share's burst is under one call, so each node
        // starts at a random part of one, and the first call waits for the
        // rest at 1/400 per second. Nodes drawn differently wait
        // differently: they do not call together.
        let mut waits = vec![];
        for seed in 0..20 {
            crate::jitter::seed_this_thread(seed);
            let mut b = Buckets::adaptive(ec2_bucket);
            b.set_peers(2000, t0);
            let w = b.take_or_wait(api, t0).expect("under one call at start");
            assert!(w <= MAX_WAIT, "{w:?}");
            // Asking again until a token comes: at most 400 s.
            let mut now = t0;
            while let Some(w) = b.take_or_wait(api, now) {
                now += w;
            }
            let waited = now - t0;
            assert!(waited <= Duration::from_secs(401), "{waited:?}");
            waits.push(waited.as_secs());
        }
        waits.sort();
        waits.dedup();
        assert!(waits.len() > 10, "phases not spread: {waits:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_share_under_one_call_calls_again_within_half_its_period() {
        // 200 of 2,000 nodes (a share of one Create per 400 s), each
        // throttled once: each calls again at a random point of the next
        // 200 s (half its period), not of the halved rate's 800 s, and
        // then waits for its next token as any other call.
        let api = "CreateNetworkInterface";
        let t0 = Instant::now();
        crate::jitter::seed_this_thread(5);
        let until_token = |b: &mut Buckets, mut now: Instant| {
            while let Some(w) = b.take_or_wait(api, now) {
                now += w;
            }
            now
        };
        let mut waits = vec![];
        for _ in 0..200 {
            let mut b = Buckets::adaptive(ec2_bucket);
            b.set_peers(2000, t0);
            b.throttled(api, t0);
            assert_eq!(b.rate(api, t0), 5.0 / 4000.0, "halved");
            let next = until_token(&mut b, t0);
            waits.push((next - t0).as_secs());
            let after = until_token(&mut b, next);
            assert!(
                after - next >= Duration::from_secs(250),
                "{:?}",
                after - next
            );
        }
        waits.sort();
        assert!(waits[199] <= 200, "within half a period: {waits:?}");
        // The rate climbs meanwhile (RECOVER_SECS): the last comes after
        // about 133 s.
        assert!(waits[0] <= 20 && waits[199] >= 120, "spread: {waits:?}");
        waits.dedup();
        assert!(waits.len() > 50, "spread: {waits:?}");
        // A read starts over at a random part of one call at the halved
        // rate: up to two periods of its share (100 s at 2,000 nodes).
        let read = "DescribeNetworkInterfaces";
        let longest = (0..200)
            .map(|_| {
                let mut b = Buckets::adaptive(ec2_bucket);
                b.set_peers(2000, t0);
                b.throttled(read, t0);
                let mut now = t0;
                while let Some(w) = b.take_or_wait(read, now) {
                    now += w;
                }
                now - t0
            })
            .max()
            .expect("200 nodes");
        assert!(longest > Duration::from_secs(120), "{longest:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_node_count_cuts_the_share_and_a_halved_node_stays_halved() {
        let api = "AssignPrivateIpAddresses";
        let t0 = Instant::now();
        let mut b = Buckets::adaptive(ec2_bucket);
        b.throttled(api, t0);
        assert_eq!(b.rate(api, t0), 2.5);
        // Ten nodes: a share of 0.5/s, below the halved 2.5/s.
        b.set_peers(10, t0);
        assert_eq!(b.rate(api, t0), 0.5);
        b.throttled(api, t0);
        assert_eq!(b.rate(api, t0), 0.25);
        // A count that grows again (a new node wave, 100 nodes) cuts it
        // further; one that falls lets it climb back over RECOVER_SECS.
        b.set_peers(100, t0);
        assert_eq!(b.rate(api, t0), 0.05);
        b.set_peers(5, t0);
        assert_eq!(b.rate(api, t0), 0.05);
        let later = t0 + Duration::from_secs(RECOVER_SECS as u64);
        assert_eq!(b.rate(api, later), 1.0, "back to a fifth of 5/s");
        // Non-adaptive buckets (the account's own) ignore the count.
        let mut acct = Buckets::default();
        acct.set_peers(100, t0);
        assert_eq!(acct.rate(api, t0), 5.0);
    }

    #[tokio::test(start_paused = true)]
    async fn grow_calls_take_their_share_of_the_nodes_that_grow_and_others_of_every_node() {
        let t0 = Instant::now();
        let mut b = Buckets::adaptive(ec2_bucket);
        b.set_peers(2000, t0);
        for api in [
            "CreateNetworkInterface",
            "DescribeNetworkInterfaces",
            "DeleteNetworkInterface",
        ] {
            b.bucket(api, t0);
        }
        // 20 of the 2,000 nodes still grow: their grow calls may have
        // half a twentieth of the account's 5/s (GROWERS_HEADROOM), at
        // once; reads and releases keep a 2,000th.
        b.set_growers(Some(20), t0);
        assert_eq!(b.rate("CreateNetworkInterface", t0), 0.125);
        let later = t0 + Duration::from_secs(RECOVER_SECS as u64);
        assert_eq!(b.rate("CreateNetworkInterface", later), 0.125);
        assert_eq!(b.rate("AttachNetworkInterface", later), 0.125);
        assert_eq!(b.rate("DescribeNetworkInterfaces", later), 20.0 / 2000.0);
        assert_eq!(b.rate("DeleteNetworkInterface", later), 5.0 / 2000.0);
        // More grow: cut at once. Never more than the node count, never
        // fewer than one.
        b.set_growers(Some(200), later);
        assert_eq!(b.rate("CreateNetworkInterface", later), 0.0125);
        b.set_growers(Some(50_000), later);
        assert_eq!(b.rate("CreateNetworkInterface", later), 5.0 / 2000.0);
        // Fewer grow: raised at once, at the fraction of its share the
        // node's throttling left it; it climbs back from there.
        b.throttled("CreateNetworkInterface", later);
        assert_eq!(b.rate("CreateNetworkInterface", later), 5.0 / 4000.0);
        b.set_growers(Some(0), later);
        assert_eq!(
            b.rate("CreateNetworkInterface", later),
            1.25,
            "half of 2.5/s"
        );
        // A count that rises and falls back leaves the node halved, cut
        // and raised by the same fraction of its share.
        b.set_growers(Some(200), later);
        assert_eq!(b.rate("CreateNetworkInterface", later), 0.00625);
        b.set_growers(Some(0), later);
        assert_eq!(b.rate("CreateNetworkInterface", later), 1.25);
        let much_later = later + Duration::from_secs(RECOVER_SECS as u64);
        assert_eq!(b.rate("CreateNetworkInterface", much_later), 2.5);
        // Forgotten (a node that starts growing again): every node's
        // share, at once.
        b.set_growers(None, much_later);
        assert_eq!(b.rate("CreateNetworkInterface", much_later), 5.0 / 2000.0);
    }
}
