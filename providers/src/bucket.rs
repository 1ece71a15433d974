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
}

/// Seconds an adaptive bucket takes to climb back from its floor to the
/// documented rate when nothing is throttled (additive increase).
pub const RECOVER_SECS: f64 = 300.0;
/// The lowest share of the documented rate an adaptive bucket goes down to.
pub const MIN_SHARE: f64 = 1.0 / 2000.0;

/// Buckets keyed by API name: an account's (the cloud's side), or one
/// node's client-side view of it.
///
/// A client-side bucket may be *adaptive*: every node of an account starts
/// believing it may use the account's whole documented rate, which 2,000
/// nodes together cannot. On a throttled answer the node halves its rate
/// and burst (multiplicative decrease) and empties the bucket; without
/// throttling the rate climbs back linearly, over [`RECOVER_SECS`], to the
/// documented one (additive increase). Nodes thus share the account's
/// budget without a central operator, as TCP flows share a link.
#[derive(Debug)]
pub struct Buckets {
    spec: fn(&str) -> BucketSpec,
    adaptive: bool,
    buckets: HashMap<String, Bucket>,
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
        }
    }

    /// Client-side buckets sized by `spec` that adapt to throttling (see
    /// the type's documentation).
    pub fn adaptive(spec: fn(&str) -> BucketSpec) -> Self {
        Self {
            adaptive: true,
            ..Self::with_spec(spec)
        }
    }

    fn bucket(&mut self, api: &str, now: Instant) -> &mut Bucket {
        let spec_of = self.spec;
        let adaptive = self.adaptive;
        let b = self.buckets.entry(api.to_string()).or_insert_with(|| {
            let spec = spec_of(api);
            Bucket {
                spec,
                tokens: spec.burst,
                at: now,
                rate: spec.refill_per_sec,
                burst: spec.burst,
            }
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        if adaptive {
            b.rate = (b.rate + elapsed * b.spec.refill_per_sec / RECOVER_SECS)
                .min(b.spec.refill_per_sec);
            b.burst = (b.burst + elapsed * b.spec.burst / RECOVER_SECS).min(b.spec.burst);
        }
        b.tokens = (b.tokens + elapsed * b.rate).min(b.burst);
        b.at = now;
        b
    }

    /// The cloud throttled a call to `api`: an adaptive bucket halves its
    /// rate and burst and empties; others do nothing.
    pub fn throttled(&mut self, api: &str, now: Instant) {
        if !self.adaptive {
            return;
        }
        let b = self.bucket(api, now);
        b.rate = (b.rate / 2.0).max(b.spec.refill_per_sec * MIN_SHARE);
        b.burst = (b.burst / 2.0).max(1.0);
        b.tokens = b.tokens.min(0.0);
    }

    /// The refill rate in force for `api`, per second.
    pub fn rate(&mut self, api: &str, now: Instant) -> f64 {
        self.bucket(api, now).rate
    }

    /// Takes a token for `api` if there is one; otherwise says how long
    /// until there will be (a client waits that long instead of being
    /// throttled by the cloud).
    pub fn take_or_wait(&mut self, api: &str, now: Instant) -> Option<std::time::Duration> {
        if self.try_take(api, now) {
            return None;
        }
        let b = &self.buckets[api];
        let missing = 1.0 - b.tokens;
        Some(std::time::Duration::from_secs_f64(missing / b.rate))
    }

    /// Takes a token for `api`; false means the call is throttled.
    pub fn try_take(&mut self, api: &str, now: Instant) -> bool {
        let b = self.bucket(api, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
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
}
