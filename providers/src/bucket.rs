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

#[derive(Debug)]
struct Bucket {
    spec: BucketSpec,
    tokens: f64,
    at: Instant,
}

/// One account's buckets, keyed by API name.
#[derive(Debug)]
pub struct Buckets {
    spec: fn(&str) -> BucketSpec,
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
            buckets: HashMap::new(),
        }
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
        Some(std::time::Duration::from_secs_f64(
            missing / b.spec.refill_per_sec,
        ))
    }

    /// Takes a token for `api`; false means the call is throttled.
    pub fn try_take(&mut self, api: &str, now: Instant) -> bool {
        let spec_of = self.spec;
        let b = self.buckets.entry(api.to_string()).or_insert_with(|| {
            let spec = spec_of(api);
            Bucket {
                spec,
                tokens: spec.burst,
                at: now,
            }
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * b.spec.refill_per_sec).min(b.spec.burst);
        b.at = now;
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
}
